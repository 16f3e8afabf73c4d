"""What every launcher does first."""
import os

import jax
from absl import app, flags, logging
from ml_collections import ConfigDict

DISTRIBUTED = flags.DEFINE_bool("distributed", False, "Multi-process run: call jax.distributed.initialize() "
                                "with the three flags below, or the JAX_* variables, or what JAX auto-detects "
                                "(TPU VMs, SLURM, Open MPI).")
COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (or JAX_COORDINATOR_ADDRESS).")
NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes (or JAX_NUM_PROCESSES).")
PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index (or JAX_PROCESS_ID).")


def distributed_args() -> dict:
    """`jax.distributed.initialize` kwargs from the flags, else the JAX_* variables; `{}`:
    auto-detect. Given partly: a usage error naming what is missing."""
    given = {"coordinator_address": COORDINATOR.value or os.environ.get("JAX_COORDINATOR_ADDRESS"),
             "num_processes": NUM_PROCESSES.value if NUM_PROCESSES.value is not None
             else os.environ.get("JAX_NUM_PROCESSES"),
             "process_id": PROCESS_ID.value if PROCESS_ID.value is not None else os.environ.get("JAX_PROCESS_ID")}
    if all(v is None for v in given.values()):
        return {}
    missing = [k for k, v in given.items() if v is None]
    if missing:
        raise app.UsageError("--distributed: give all of --coordinator_address, --num_processes, --process_id "
                             "(or JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID); missing: "
                             + ", ".join(f"--{k}" for k in missing))
    try:
        n, i = int(given["num_processes"]), int(given["process_id"])
    except ValueError:
        raise app.UsageError(f"--num_processes={given['num_processes']!r} / --process_id={given['process_id']!r} "
                             "must be integers") from None
    if n < 1 or not 0 <= i < n:
        raise app.UsageError(f"--process_id={i} must lie in [0, --num_processes={n})")
    return {"coordinator_address": given["coordinator_address"], "num_processes": n, "process_id": i}


def setup_jax(distributed: bool | None = None) -> None:
    """Logging, the compile cache, and with `distributed` (default: the --distributed flag)
    `jax.distributed.initialize`; CPU processes talk through gloo (tests, CPU clusters)."""
    # Orbax logs every checkpoint step at INFO; keep the console for progress and results.
    logging.set_verbosity(logging.WARNING)
    if DISTRIBUTED.value if distributed is None else distributed:
        kwargs = distributed_args()
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(**kwargs)
    # Persist compiled programs across runs; CPU compiles of the models take tens of seconds.
    jax.config.update("jax_compilation_cache_dir", "/tmp/jaxaudio_jit_cache")
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


def user_errors() -> tuple[type, ...]:
    """Errors about the user's input whose message says everything (file, line, key): a
    launcher prints the message alone, without a traceback, and exits 2."""
    from jaxaudio.data.manifest import ManifestError
    from jaxaudio.data.validate import DataError
    from jaxaudio.train.checkpoint import CheckpointMismatch
    from jaxaudio.train.run_config import ConfigDrift
    from jaxaudio.train.settings import SettingsError
    return CheckpointMismatch, ConfigDrift, DataError, ManifestError, SettingsError


REQUIRED_SECTIONS = ("task", "model", "data", "train", "optim", "mesh")


def check_config(config: ConfigDict) -> ConfigDict:
    """Fail early, naming the missing section."""
    missing = [s for s in REQUIRED_SECTIONS if s not in config]
    if missing:
        raise ValueError(f"config is missing the section(s) {missing}")
    return config


def parse_flags(argv: list[str]) -> list[str]:
    """absl flag parsing that turns a bad `--config.x.y` override into a one-line error.

    ml_collections raises a bare AttributeError/KeyError deep inside its parser; name
    the flag instead.
    """
    import sys

    from absl import flags
    try:
        return flags.FLAGS(argv)
    except (AttributeError, KeyError, TypeError, ValueError, flags.Error) as e:
        text = str(e).strip("'\"").replace("\\n", " ").replace("\n", " ").replace("\\'", "'")
        key = text.split("'")[1] if text.count("'") >= 2 else text
        culprit = [a for a in argv[1:] if a.startswith("--config.") and key in a.split("=")[0]]
        where = f" in {culprit[0]}" if culprit else ""
        if isinstance(e, (AttributeError, KeyError)):
            hint = text.split("'", 2)[-1].strip() if text.count("'") >= 2 else ""
            text = f"unknown config key {key!r}" + (f" ({hint})" if hint else "")
        sys.stderr.write(f"{argv[0]}: bad flag{where}: {text}\n")
        sys.exit(2)


def emit_report(text: str, report: dict, json_path: str | None) -> None:
    """Print a launcher's report; also write it as JSON to `json_path` when one is given."""
    import json
    print(text)
    if json_path:
        with open(json_path, "w") as f:
            json.dump(report, f, indent=1)

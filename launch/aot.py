"""Compile a config's steps ahead of time for a target and say whether they fit, before paying
for the chips (as maxtext's `train_compile.py`).

    python -m launch.aot --config=configs/bat.py:3 --topology=v5e:2x2 --config.mesh.fsdp=4
    python -m launch.aot --config=configs/salmonn_7b.py:1 --topology=v5e:2x4 --batch=8 --steps=train,eval
    python -m launch.aot --config=configs/spatial_ast_tiny.py --json=aot.json   # the local devices

`--topology` names a TPU slice (`v5e:2x2`, `v5p:2x2x1`, `v6e:2x2`, `v4:2x2x1`, ...): the
program is compiled here, without the chips, by `libtpu` (`pip install libtpu`, the version
`jax[tpu]` pins for the installed jax). Without it, the local devices are the target. The
mesh is the config's (`config.mesh`, e.g. `--config.mesh.fsdp=4`), the batch
`train.batch_size` (`--batch` overrides it; the eval step uses `train.eval_batch_size`).

Per device, for each step (`train`: the trainer's own train step, state donated; `eval`: the
task's eval step, which for BAT and SALMONN holds the beam-search decoding loop): parameter
and optimizer-state bytes (from the shardings), XLA's argument, output and temporary bytes,
the peak (arguments + outputs not aliased to them + temporaries + code) against the chip's
memory, whether it fits, compile seconds and XLA's FLOPs per step (per device).
"""
import os
import sys

os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")  # no TPU metadata server here: libtpu must not wait for one
# Deviceless compiles hold no chip: two of them (or a test beside a run) may share the host.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from launch.common import check_config, emit_report, parse_flags, setup_jax, user_errors  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (get_config()).", lock_config=True)
_TOPOLOGY = flags.DEFINE_string("topology", None, "A TPU slice by name (v5e:2x2, v5p:2x2x1, v6e:2x2, ...), "
                                "compiled for without the chips; default: the local devices.")
_CHIPS_PER_HOST = flags.DEFINE_string("chips_per_host", None, "The slice's host shape (2x2, 2x4); default: "
                                       "libtpu's, or the whole slice when it is smaller (v5e:1x1, v5e:2x4).")
_BATCH = flags.DEFINE_integer("batch", None, "Global train batch (default: config.train.batch_size).")
_STEPS = flags.DEFINE_list("steps", ["train"], "Which steps: train, eval.")
_JSON = flags.DEFINE_string("json", None, "Also write the report here.")
_MEMORY = flags.DEFINE_float("chip_memory_gib", None, "The chip's memory (default: known per chip kind).")
flags.mark_flags_as_required(["config"])


def main(argv):
    del argv
    if _TOPOLOGY.value:
        os.environ.setdefault("JAX_PLATFORMS", "cpu")  # compiled here for the slice; nothing runs on it
    setup_jax()
    import jax
    # The persistent cache holds executables for this host's client; a deviceless TPU
    # compile can neither load nor reuse them.
    jax.config.update("jax_enable_compilation_cache", not _TOPOLOGY.value)
    config = check_config(_CONFIG.value)
    from jaxaudio.train.aot import AotError, compile_steps, format_report, target_devices
    try:
        report = compile_steps(config, target_devices(_TOPOLOGY.value, _CHIPS_PER_HOST.value), _STEPS.value, _BATCH.value, _MEMORY.value)
    except (AotError, *user_errors()) as e:
        sys.stderr.write(f"{e}\n")
        sys.exit(2)
    report["topology"] = _TOPOLOGY.value or "local"
    emit_report(format_report(report), report, _JSON.value)


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)

"""Train any jaxaudio task from an ml_collections config file.

    python -m launch.train --config=configs/spatial_ast_tiny.py --workdir=workdir/tiny \
        --config.train.steps=100

Re-running with the same --workdir resumes from its latest checkpoint (the data position is
the step), on any mesh and any number of processes; a restart whose config changes the
results is refused (`--allow_config_change` goes on). SIGTERM / SIGINT: the step in progress
finishes and is saved, one line says so, and the exit status is 128 + the signal number.
Multi-process: `--distributed` (with `--coordinator_address`, `--num_processes`,
`--process_id`, or the JAX_* variables, or JAX's auto-detection); launch/tpu and launch/gpu
start it on every host.
"""
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from launch.common import check_config, parse_flags, setup_jax, user_errors

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (get_config()).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Checkpoints, TensorBoard events and results go here.")
_ALLOW = flags.DEFINE_bool("allow_config_change", False, "Resume even if the config changes the results "
                           "(the workdir's config.json is updated; the old one is kept beside it).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    del argv
    setup_jax()
    config = check_config(_CONFIG.value)
    from jaxaudio.train.loop import train_and_evaluate
    from jaxaudio.train.preemption import Preempted
    try:
        metrics = train_and_evaluate(config, _WORKDIR.value, _ALLOW.value)
    except Preempted as e:
        sys.stderr.write(f"{e}\n")
        sys.exit(128 + e.signum)
    except user_errors() as e:
        sys.stderr.write(f"{e}\n")
        sys.exit(2)
    logging.info("final eval: %s", metrics)
    print("final eval: " + ", ".join(f"{k}={v:.4f}" for k, v in metrics.items()))


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)

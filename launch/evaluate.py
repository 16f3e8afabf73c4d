"""Evaluate a trained (or converted) model on the config's evaluation set.

    python -m launch.evaluate --config=configs/spatial_ast_tiny.py --workdir=workdir/tiny
    python -m launch.evaluate --config=configs/spatial_ast.py --checkpoint=converted/spatial_ast

Prints the task's metrics next to chance (the task's own table if it has `format_results`).
"""
import sys

from absl import app, flags
from ml_collections import config_flags

from launch.common import check_config, parse_flags, setup_jax, user_errors

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (get_config()).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "A training run's workdir: its latest checkpoint is evaluated.")
_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Or: a converted checkpoint (launch/convert.py).")
flags.mark_flags_as_required(["config"])


def format_table(metrics: dict[str, float]) -> str:
    """Metrics beside their baselines: `chance_<name>` (guessing) and, where a task gives
    one, `prior_<name>` (the best input-blind answer)."""
    baselines = ("chance", "prior")
    shown = [b for b in baselines if any(k.startswith(f"{b}_") for k in metrics)]
    names = [k for k in metrics if not k.startswith(tuple(f"{b}_" for b in baselines))]
    width = max([20, *(len(k) + 2 for k in names)])
    rows = [f"{'metric':<{width}}{'model':>12}" + "".join(f"{b:>12}" for b in shown)]
    for k in names:
        cells = [metrics.get(f"{b}_{k}") for b in shown]
        rows.append(f"{k:<{width}}{metrics[k]:>12.4f}"
                    + "".join(f"{c:>12.4f}" if c is not None else f"{'':>12}" for c in cells))
    return "\n".join(rows)


def main(argv):
    del argv
    if bool(_WORKDIR.value) == bool(_CHECKPOINT.value):
        raise app.UsageError("pass exactly one of --workdir or --checkpoint")
    setup_jax()
    config = check_config(_CONFIG.value)
    from jaxaudio.train.loop import Trainer
    with config.unlocked():
        config.init.checkpoint = _CHECKPOINT.value or ""
    try:
        trainer = Trainer(config, _WORKDIR.value or "/tmp/jaxaudio_eval")
        if _WORKDIR.value:
            # Only reads: a damaged checkpoint is skipped, not moved (the run may still be going).
            step = trainer.restore_or_init(move_damaged=False)
            if step == 0:
                raise app.UsageError(f"--workdir={_WORKDIR.value} holds no checkpoint")
        metrics = trainer.evaluate()
    except user_errors() as e:
        sys.stderr.write(f"{e}\n")
        sys.exit(2)
    task_table = getattr(trainer.task, "format_results", None)
    print(task_table(metrics) if task_table else format_table(metrics))


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)

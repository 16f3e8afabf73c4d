"""End to end: the launchers on the tiny config with generated binaural scenes."""
import json
import os

import pytest

from launch_util import run_module

TINY = ["--config=configs/spatial_ast_tiny.py", "--config.model.embed_dim=64", "--config.model.depth=2",
        "--config.model.num_heads=2", "--config.data.num_train=96", "--config.data.num_eval=24",
        "--config.data.clip_seconds=0.5", "--config.train.batch_size=16", "--config.train.eval_batch_size=12",
        "--config.train.log_every=5", "--config.train.checkpoint_every=20", "--config.optim.lr=2e-3",
        "--config.optim.warmup_steps=5"]


def _run(module, *args):
    return run_module(module, *args, timeout=900)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("e2e")
    workdir, data = str(tmp / "work"), str(tmp / "data")
    steps = ["--config.train.steps=60", "--config.train.eval_every=60", "--config.optim.total_steps=60"]
    proc = _run("launch.train", *TINY, *steps, f"--workdir={workdir}", f"--config.data.root={data}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return workdir, data, proc


def _records(workdir, split):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if r["split"] == split]


def test_train_generates_data_and_loss_falls(run):
    workdir, data, proc = run
    assert os.path.exists(os.path.join(data, "train.jsonl")) and os.path.exists(os.path.join(data, "eval.jsonl"))
    train = _records(workdir, "train")
    first, last = train[0]["loss"], train[-1]["loss"]
    assert last < 0.8 * first, (first, last)
    assert "final eval:" in proc.stdout and "mae_deg" in proc.stdout
    assert os.listdir(os.path.join(workdir, "tensorboard"))


def test_evaluate_prints_metrics_and_chance(run):
    workdir, data, _ = run
    proc = _run("launch.evaluate", *TINY, f"--workdir={workdir}", f"--config.data.root={data}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "mae_deg" in proc.stdout and "chance" in proc.stdout
    header = next(line.split() for line in proc.stdout.splitlines() if line.startswith("metric"))
    assert header == ["metric", "model", "chance", "prior"]  # prior: the best input-blind distance
    evals = _records(workdir, "eval")
    mae = float(next(line.split()[1] for line in proc.stdout.splitlines() if line.startswith("mae_deg")))
    assert abs(mae - evals[-1]["mae_deg"]) < 1e-3  # the restored checkpoint is the trained one


def test_rerun_resumes_and_continues(run):
    workdir, data, _ = run
    steps = ["--config.train.steps=70", "--config.train.eval_every=0", "--config.optim.total_steps=60"]
    proc = _run("launch.train", *TINY, *steps, f"--workdir={workdir}", f"--config.data.root={data}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    steps_logged = [r["step"] for r in _records(workdir, "train")]
    assert steps_logged[-3:] == [60, 65, 70]  # continued from step 60, not from 0


def test_bad_config_key_is_named(tmp_path):
    proc = _run("launch.train", "--config=configs/spatial_ast_tiny.py", f"--workdir={tmp_path}",
                "--config.train.stepz=3")
    assert proc.returncode != 0
    assert "unknown config key 'stepz'" in proc.stderr and "--config.train.stepz=3" in proc.stderr
    assert "Traceback" not in proc.stderr

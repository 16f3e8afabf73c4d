"""End to end: a tiny CLAP trained on the generated captioned sounds, evaluated, and its
retrieval index built, queried, extended and misused, through the launchers."""
import json
import os
import shutil

import pytest

from launch_util import run_module

TINY = ["--config=configs/clap_tiny.py", "--config.model.audio.embed_dim=16", "--config.model.audio.depths=(1,1)",
        "--config.model.text.hidden_size=32", "--config.model.text.num_layers=1", "--config.model.text.num_heads=2",
        "--config.model.text.intermediate_size=64", "--config.model.projection_dim=32",
        "--config.data.num_train=96", "--config.data.num_eval=24", "--config.train.batch_size=16",
        "--config.train.eval_batch_size=12", "--config.train.log_every=5", "--config.optim.warmup_steps=5"]


def _run(module, *args):
    return run_module(module, *args, timeout=900)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("clap")
    workdir, data = str(tmp / "work"), str(tmp / "data")
    steps = ["--config.train.steps=40", "--config.train.eval_every=40", "--config.train.checkpoint_every=20",
             "--config.optim.total_steps=40"]
    proc = _run("launch.train", *TINY, *steps, f"--workdir={workdir}", f"--config.data.root={data}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return workdir, data, proc


def _model(workdir, data):
    return [*TINY, f"--workdir={workdir}", f"--config.data.root={data}"]


def test_train_generates_data_and_loss_falls(run):
    workdir, data, proc = run
    for name in ("train.jsonl", "eval.jsonl", "classes.txt", "tokenizer.json"):
        assert os.path.exists(os.path.join(data, name)), name
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        train = [r for r in map(json.loads, f) if r["split"] == "train"]
    assert train[-1]["loss"] < train[0]["loss"] - 0.1, (train[0]["loss"], train[-1]["loss"])
    assert all(0.0 <= r["logit_scale_a"] <= 100.0 + 1e-3 for r in train)  # exp of the clamped scale
    assert "t2a_R@1" in proc.stdout and "zero_shot_acc" in proc.stdout


def test_evaluate_prints_retrieval_and_chance(run):
    workdir, data, _ = run
    proc = _run("launch.evaluate", *_model(workdir, data))
    assert proc.returncode == 0, proc.stderr[-3000:]
    header = next(line.split() for line in proc.stdout.splitlines() if line.startswith("metric"))
    assert header == ["metric", "model", "chance"]
    rows = {line.split()[0]: line.split()[1:] for line in proc.stdout.splitlines()[1:] if line.strip()}
    assert float(rows["t2a_R@1"][1]) == pytest.approx(1 / 24, abs=1e-4)  # chance: 1 of 24 held-out clips
    assert float(rows["zero_shot_acc"][1]) == pytest.approx(1 / 16, abs=1e-4)


def test_index_build_query_append_and_errors(run, tmp_path):
    workdir, data, _ = run
    index = str(tmp_path / "index")
    model = _model(workdir, data)
    proc = _run("launch.index", "build", *model, f"--manifest={data}/eval.jsonl", f"--index={index}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(os.path.join(index, "header.json")) as f:
        header = json.load(f)
    assert header["count"] == 24 and header["features"]["sample_rate"] == 48000

    query = ["query", *model, f"--index={index}", "--k=3"]
    proc = _run("launch.index", *query, "--text=a loud bell rings", f"--audio={data}/eval/000000.wav")
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert lines[0] == "text: a loud bell rings" and lines[4].startswith("audio: ")
    assert lines[5].split()[2].endswith("000000.wav")  # a clip is its own nearest neighbour
    assert float(lines[5].split()[1]) == pytest.approx(1.0, abs=1e-4)

    # Appending the training clips' first folder, then the bad inputs: each one line, nothing lost.
    extra = tmp_path / "extra"
    extra.mkdir()
    for i in range(3):
        shutil.copy(os.path.join(data, "train", f"{i:06d}.wav"), extra / f"{i}.wav")
    (extra / "broken.wav").write_bytes(b"RIFF not really")
    proc = _run("launch.index", "append", *model, f"--folder={extra}", f"--index={index}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "broken.wav" in proc.stdout + proc.stderr
    with open(os.path.join(index, "header.json")) as f:
        assert json.load(f)["count"] == 27

    for flags, message in (
            (["--text=a bell", "--k=100"], "k=100 is larger than"),
            (["--text=  "], "empty"),
    ):
        proc = _run("launch.index", *query, *flags)
        assert proc.returncode == 1 and message in proc.stderr, proc.stderr[-2000:]
        assert "Traceback" not in proc.stderr

    with open(os.path.join(index, "header.json")) as f:
        other = json.load(f)
    other["model"]["fingerprint"] = "0123456789abcdef"
    with open(os.path.join(index, "header.json"), "w") as f:
        json.dump(other, f)
    proc = _run("launch.index", *query, "--text=a bell")
    assert proc.returncode == 1 and "was built with" in proc.stderr and "Traceback" not in proc.stderr

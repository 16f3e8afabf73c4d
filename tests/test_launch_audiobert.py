"""End to end: AudioBERT's whole tiny chain through the launchers — the generated corpus, a
CLAP trained on its clips, the index, the span detector on the real MiniLM BERT, AudioBERT
(pitch) with retrieval and injection, and its evaluation table — on a few steps each."""
import csv
import json
import os

import pytest

from launch_util import run_module


def _run(module, *args):
    return run_module(module, *args, timeout=900)


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    base = str(tmp_path_factory.mktemp("audiobert"))
    cfg = f"configs/audiobert_tiny.py:{{}}@{base}"
    short = ["--config.train.log_every=5", "--config.train.eval_every=0"]
    proc = _run("launch.train", f"--config={cfg.format('clap')}", f"--workdir={base}/clap", *short,
                "--config.train.steps=20", "--config.train.checkpoint_every=20", "--config.optim.total_steps=20")
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = _run("launch.index", "build", f"--config={cfg.format('clap')}", f"--workdir={base}/clap",
                f"--manifest={base}/data/clips.jsonl", f"--index={base}/index")
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = _run("launch.train", f"--config={cfg.format('detector')}", f"--workdir={base}/detector",
                "--config.train.log_every=3", "--config.train.eval_every=6", "--config.train.eval_batch_size=32",
                "--config.train.steps=6", "--config.train.checkpoint_every=6", "--config.train.batch_size=8",
                "--config.optim.total_steps=6", "--config.optim.lr=1e-3", "--config.optim.min_lr=1e-3")
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = _run("launch.train", f"--config={cfg.format('pitch')}", f"--workdir={base}/pitch",
                "--config.train.log_every=3", "--config.train.steps=12", "--config.train.eval_every=12",
                "--config.train.checkpoint_every=12", "--config.train.batch_size=8", "--config.optim.total_steps=12",
                "--config.optim.warmup_steps=2", "--config.train.eval_batch_size=32")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return base, cfg, proc


def test_chain_trains_and_reports_both_span_sources(chain):
    base, _, proc = chain
    for name in ("pitch_train.csv", "pitch_test.csv", "animal_train.csv", "clips.jsonl"):
        assert os.path.exists(os.path.join(base, "data", name)), name
    with open(os.path.join(base, "retrieval.json")) as f:
        table = json.load(f)["table"]
    assert table and all(os.path.exists(path) for path, _ in table.values())  # retrieved clips of the index
    with open(os.path.join(base, "pitch", "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    train = [r for r in rows if r["split"] == "train"]
    assert train[-1]["loss"] < train[0]["loss"]
    final = [r for r in rows if r["split"] == "eval"][-1]
    for key in ("acc_gold_spans", "acc_detected_spans", "acc_majority"):
        assert 0.0 <= final[key] <= 1.0, key
    assert abs(final["acc_majority"] - 0.5) < 0.1  # the generated pitch answers are balanced


def test_detector_metrics_and_evaluate_table(chain):
    base, cfg, _ = chain
    with open(os.path.join(base, "detector", "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    final = [r for r in rows if r["split"] == "eval"][-1]
    assert {"weighted_f1", "span_precision", "span_recall", "span_f1"} <= set(final)
    proc = _run("launch.evaluate", f"--config={cfg.format('pitch')}", f"--workdir={base}/pitch",
                "--config.train.eval_batch_size=32")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "AudioBERT, gold spans" in proc.stdout and "AudioBERT, detected spans" in proc.stdout
    assert "majority" in proc.stdout


def test_infer_fills_the_mask_and_names_bad_input(chain):
    base, cfg, _ = chain
    with open(os.path.join(base, "data", "pitch_test.csv"), newline="") as f:
        sentence = next(csv.DictReader(f))["sentence"]
    proc = _run("launch.infer", f"--config={cfg.format('pitch')}", f"--workdir={base}/pitch", f"--text={sentence}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("detected spans:")
    answer = next(line for line in lines if line.startswith("answer:")).split()[-1]
    assert answer in ("higher", "lower")
    assert next(line for line in lines if line.startswith("filled:")) == f"filled: {sentence.replace('[MASK]', answer)}"
    proc = _run("launch.infer", f"--config={cfg.format('pitch')}", f"--workdir={base}/pitch",
                "--text=No mask in this sentence.")
    assert proc.returncode == 1 and "has no [MASK]" in proc.stderr and "Traceback" not in proc.stderr


def test_frozen_ast_trains_on_cached_vectors(chain):
    """`model.freeze_ast`: a next stage from the pitch run keeps its AST bitwise, its batches
    carry the cached vectors (no AST input), and those give the logits the clips give."""
    import jax
    import numpy as np

    from jaxaudio.tasks.audiobert import AudioBertTask, load_config
    from jaxaudio.train.loop import load_run_variables
    base, cfg, _ = chain
    proc = _run("launch.train", f"--config={cfg.format('pitch')}", f"--workdir={base}/pitch_frozen",
                "--config.model.freeze_ast=True", f"--config.init.checkpoint={base}/pitch",
                "--config.train.log_every=2", "--config.train.steps=4", "--config.train.eval_every=4",
                "--config.train.checkpoint_every=4", "--config.train.batch_size=8", "--config.optim.total_steps=4",
                "--config.optim.warmup_steps=1", "--config.train.eval_batch_size=32")
    assert proc.returncode == 0, proc.stderr[-3000:]
    before, after = load_run_variables(f"{base}/pitch"), load_run_variables(f"{base}/pitch_frozen")
    flat = lambda t: dict(jax.tree_util.tree_leaves_with_path(t))  # noqa: E731
    for path, x in flat(before["params"]["ast"]).items():
        np.testing.assert_array_equal(flat(after["params"]["ast"])[path], x)
    lora = lambda v: v["params"]["bert"]["layers_0"]["attention"]["query"]["lora_b"]  # noqa: E731
    assert not np.array_equal(lora(before), lora(after))  # the adapters trained

    config = load_config(cfg.format("pitch"))
    config.model.freeze_ast = True
    task = AudioBertTask(config)
    assert "ast/.*" in config.optim.frozen
    task.bind_variables(before)
    cached = task._source("train")[0]
    assert "audio" not in cached and cached["audio_vectors"].shape == (2, task.ast_width)
    config.model.freeze_ast = False
    plain = AudioBertTask(config)
    clips = plain._source("train")[0]
    batch = lambda ex: {k: np.asarray(v)[None] for k, v in ex.items()}  # noqa: E731
    want = plain._logits(before["params"], {}, batch(clips), False)
    got = task._logits(before["params"], {}, batch(cached), False)
    np.testing.assert_allclose(got, want, atol=1e-4)
    with open(os.path.join(base, "data", "pitch_test.csv"), newline="") as f:
        sentence = next(csv.DictReader(f))["sentence"]
    proc = _run("launch.infer", f"--config={cfg.format('pitch')}", f"--workdir={base}/pitch_frozen",
                "--config.model.freeze_ast=True", f"--text={sentence}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert next(line for line in proc.stdout.splitlines() if line.startswith("answer:")).split()[-1] in (
        "higher", "lower")

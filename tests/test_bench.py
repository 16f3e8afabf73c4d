"""launch/bench.py end to end: the tiny Spatial-AST train step in JAX and PyTorch."""
import json
import math
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_bench_tiny_writes_json(tmp_path):
    out = tmp_path / "bench.json"
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)  # conftest's 8 fake devices are not wanted here: one real device
    proc = subprocess.run(
        [sys.executable, "-m", "launch.bench", "--size=tiny", "--steps=2", "--warmup=1", "--batch=2",
         f"--json={out}"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    rows = {r["framework"]: r for r in result["results"]}
    assert set(rows) == {"jax", "torch"}
    for r in rows.values():
        assert r["size"] == "tiny" and r["batch"] == 2
        assert r["samples_per_s"] > 0 and r["ms_per_step"] > 0
        assert math.isfinite(r["loss"])
    ratio = result["ratio_jax_over_torch"]["tiny"]
    assert ratio > 0
    assert math.isclose(ratio, rows["jax"]["samples_per_s"] / rows["torch"]["samples_per_s"], rel_tol=1e-9)
    # XLA's FLOP count of the step agrees with the analytic matmul/conv count (within 25%).
    assert rows["jax"]["flops_per_step"] > 0
    assert 0.75 < rows["jax"]["flops_per_step"] / rows["jax"]["analytic_flops_per_step"] < 1.25
    assert "ms/step" in proc.stdout and "samples/s" in proc.stdout


def test_bench_backbone_forward_against_transformers(tmp_path):
    """`--model=<backbone>`: converted weights, JAX and transformers forwards, same output."""
    out = tmp_path / "bench.json"
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    proc = subprocess.run(
        [sys.executable, "-m", "launch.bench", "--model=llama_tiny", "--steps=2", "--warmup=1", f"--json={out}"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (row,) = json.loads(out.read_text())["results"]
    assert row["model"] == "llama_tiny" and row["batch"] == 2
    assert row["jax_ms"] > 0 and row["torch_ms"] > 0
    assert math.isclose(row["ratio"], row["torch_ms"] / row["jax_ms"], rel_tol=1e-9)
    assert row["max_abs_diff"] < 1e-4  # the same converted weights give the same logits
    assert "llama_tiny" in proc.stdout and "ratio" in proc.stdout
    # --xla_options=auto (the default) timed every CPU candidate and kept the fastest.
    from jaxaudio.autotune import candidates
    assert set(row["candidate_ms"]) == set(candidates("cpu"))
    assert row["candidate_ms"][row["xla_options"]] == min(row["candidate_ms"].values())
    assert f"{row['xla_options']} (" in proc.stdout


def test_bench_names_a_bad_xla_options_value():
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    proc = subprocess.run([sys.executable, "-m", "launch.bench", "--model=llama_tiny", "--xla_options=fastest"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "--xla_options=fastest: expected auto or one of ynnpack, eigen on cpu" in proc.stderr


def test_bench_beats_against_own_torch_reference(tmp_path):
    """`--model=beats_tiny`: our PyTorch BEATs (checked first against the original's golden
    features) and the JAX BEATs converted from its state dict give the same features."""
    from launch.bench_beats import golden_max_error
    err = golden_max_error(os.path.join(ROOT, "tests", "golden", "beats_tiny.npz"))
    assert err < 1e-4, f"torch reference vs the original's features: max abs err {err:.2e} >= 1e-4"
    out = tmp_path / "bench.json"
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    proc = subprocess.run(
        [sys.executable, "-m", "launch.bench", "--model=beats_tiny", "--steps=2", "--warmup=1", f"--json={out}"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (row,) = json.loads(out.read_text())["results"]
    assert row["model"] == "beats_tiny" and row["batch"] == 2 and row["dtype"] == "float32"
    assert row["tokens"] == 2 * 12 * 8  # 2 s: 198 fbank frames -> 12 time x 8 frequency patches
    assert row["params"] > 0 and row["compile_s"] > 0 and row["torch_device"] == "cpu"
    assert row["jax_ms"] > 0 and row["torch_ms"] > 0
    assert math.isclose(row["jax_tokens_per_s"], row["tokens"] / (row["jax_ms"] / 1e3), rel_tol=1e-9)
    assert math.isclose(row["ratio"], row["torch_ms"] / row["jax_ms"], rel_tol=1e-9)
    assert row["max_abs_diff"] < 1e-4, f"JAX vs torch features: max abs diff {row['max_abs_diff']:.2e} >= 1e-4"
    assert row["xla_options"] in row["candidate_ms"]
    assert "beats_tiny" in proc.stdout and "ratio" in proc.stdout


def test_take_turns_alternates_who_goes_first():
    """After the warm-up, JAX goes first in even rounds and torch in odd ones, so a drift in
    the machine's speed falls on both alike."""
    from launch.bench_backbones import take_turns
    events = []

    class Worker:
        def time_call(self):
            events.append("torch")
            return 0.5

    jax_times, torch_times = take_turns(lambda: events.append("jax"), Worker(), warmup=1, steps=4)
    assert events == ["jax", "torch", "jax", "torch", "torch", "jax", "jax", "torch", "torch", "jax"]
    assert torch_times == [0.5] * 4 and len(jax_times) == 4 and all(t >= 0 for t in jax_times)
    assert take_turns(lambda: None, None, warmup=1, steps=3)[1] == []


def test_torch_worker_reports_its_failure():
    """A worker whose build fails raises here with the worker's own traceback."""
    import pytest

    from launch.bench_backbones import TorchWorker, torch_forward
    with pytest.raises(RuntimeError, match="no_such_backbone"):
        TorchWorker(torch_forward, "no_such_backbone", "/nonexistent", "/nonexistent.npz", "float32", 1)


def test_compile_forward_says_which_option_set_was_skipped(monkeypatch, capsys):
    """An option set that does not compile is named on stdout; the others are still timed."""
    import numpy as np

    import jaxaudio.autotune as autotune
    from launch.bench_backbones import compile_forward
    monkeypatch.setitem(autotune.CANDIDATES, "cpu", {"plain": {}, "bogus": {"xla_no_such_option": 1}})
    variables = {"params": {"w": np.eye(4, dtype=np.float32)}}
    call, facts, output = compile_forward(lambda v, x: v["params"]["w"] @ x, variables, np.ones((4, 2), np.float32))
    call()
    np.testing.assert_array_equal(output(), np.ones((4, 2), np.float32))
    assert facts["xla_options"] == "plain" and facts["candidate_ms"] == {}
    assert "XLA option set bogus {'xla_no_such_option': 1} did not compile, skipped" in capsys.readouterr().out


def test_bench_clap_search_against_faiss(tmp_path):
    """`--model=clap_search`: the index search and faiss IndexFlatIP on the same database agree."""
    out = tmp_path / "bench.json"
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    proc = subprocess.run(
        [sys.executable, "-m", "launch.bench", "--model=clap_search", "--index_sizes=3000,5000", "--queries=16",
         "--steps=2", "--warmup=1", f"--json={out}"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = json.loads(out.read_text())["search"]
    assert [r["n"] for r in rows] == [3000, 5000]
    for r in rows:
        assert r["topk_overlap"] == 1.0 and r["max_score_diff"] < 1e-5
        assert r["jax_qps"] > 0 and r["faiss_qps"] > 0
        assert math.isclose(r["ratio"], r["faiss_ms"] / r["jax_ms"], rel_tol=1e-9)
    assert "faiss ms" in proc.stdout

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

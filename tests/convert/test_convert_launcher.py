"""`python -m launch.convert` end to end, in subprocesses (as a user runs it).

A tiny original-named Spatial-AST state dict (configs/spatial_ast_tiny.py sizes, depth 2)
is `torch.save`d, converted by the launcher, read back with `load_converted`, and its eval
forward compared with the variables converted directly in this process.
"""
import argparse
import functools
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from configs import spatial_ast_tiny
from jaxaudio.convert import convert, load_converted
from jaxaudio.convert.spatial_ast import key_map
from jaxaudio.models.spatial_ast import SpatialAST
from jaxaudio.tasks.spatial_ast import model_kwargs
from convert.test_spatial_ast_convert import expected_variables, original_state_dict  # tests/ is on sys.path

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEPTH = 2


# The original's architecture (its 1-channel stem, no IPD statistics), at the tiny sizes.
ORIGINAL = dict(depth=DEPTH, stem_channels=1, normalize_ipd=False)


def _model_config():
    c = spatial_ast_tiny.get_config().model
    c.update(ORIGINAL)
    return c


@functools.lru_cache(maxsize=None)
def _model_and_checkpoint():
    model = SpatialAST(**model_kwargs(_model_config()))
    return model, original_state_dict(model, seed=3)


def _launch(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "launch.convert", "--config=configs/spatial_ast_tiny.py",
           *(f"--config.model.{k}={v}" for k, v in ORIGINAL.items()), *args]
    full_env = {**os.environ, "JAX_PLATFORMS": "cpu", **(env or {})}
    full_env.pop("XLA_FLAGS", None)  # one CPU device is enough here
    return subprocess.run(cmd, cwd=REPO, env=full_env, capture_output=True, text=True, timeout=300)


def _save(path, state_dict, **extra):
    torch.save({"model": {k: torch.from_numpy(np.asarray(v)) for k, v in state_dict.items()}, **extra}, str(path))


def test_launcher_converts_and_the_result_runs(tmp_path):
    model, sd = _model_and_checkpoint()
    src = tmp_path / "finetuned.pth"
    _save(src, sd, epoch=3)
    out = tmp_path / "converted"
    proc = _launch("--model=spatial_ast", f"--source={src}", f"--output={out}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    n_params = sum(int(np.prod(v.shape)) for k, v in sd.items()
                   if "running" not in k and "num_batches" not in k and "extractor" not in k)
    n_params -= sd["pos_embed"].shape[-1]  # the CLS slot of pos_embed is dropped
    assert f"{n_params:,} parameters (float32)" in proc.stdout, proc.stdout
    assert str(out) in proc.stdout

    variables, config = load_converted(str(out))
    assert config == _model_config().to_dict()
    direct = convert(sd, key_map(model), expected_variables(model))
    assert jax.tree.structure(jax.tree.map(np.asarray, variables)) == jax.tree.structure(direct)
    for a, b in zip(jax.tree.leaves(variables), jax.tree.leaves(direct)):
        np.testing.assert_array_equal(np.asarray(a), b)

    # The config written next to the variables rebuilds the model; both forwards agree.
    rebuilt = SpatialAST(**model_kwargs(config))
    assert rebuilt == model
    wave = jnp.asarray(0.1 * np.random.default_rng(0).standard_normal((2, 2, 16000)), jnp.float32)
    forward = jax.jit(lambda v, x: model.apply(v, x, train=False))
    got, want = forward(variables, wave), forward(direct, wave)
    for name in ("classifier", "distance", "azimuth", "elevation", "tokens"):
        np.testing.assert_allclose(np.asarray(got[name]), np.asarray(want[name]), atol=1e-6, err_msg=name)
    assert np.std(np.asarray(want["azimuth"])) > 1e-2  # not a degenerate forward


def test_launcher_refuses_pickles_without_the_flag(tmp_path):
    _, sd = _model_and_checkpoint()
    src = tmp_path / "checkpoint-99.pth"
    _save(src, sd, epoch=99, args=argparse.Namespace(batch_size=64))
    out = tmp_path / "converted"
    proc = _launch(f"--source={src}", f"--output={out}")  # --model defaults to config.task
    assert proc.returncode != 0
    assert "--allow_pickle" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert not out.exists()

    proc = _launch(f"--source={src}", f"--output={out}", "--allow_pickle", "--state_key=model",
                   "--dtype=bfloat16")
    assert proc.returncode == 0, proc.stderr[-3000:]
    variables, config = load_converted(str(out))
    assert config["param_dtype"] == "bfloat16"
    assert {np.asarray(a).dtype for a in jax.tree.leaves(variables["params"])} == {jnp.dtype(jnp.bfloat16)}
    assert {np.asarray(a).dtype for a in jax.tree.leaves(variables["batch_stats"])} == {np.dtype(np.float32)}


def test_launcher_reports_conversion_problems(tmp_path):
    _, sd = _model_and_checkpoint()
    src = tmp_path / "finetuned.pth"
    _save(src, {k: v for k, v in sd.items() if not k.startswith("blocks.1.")})
    proc = _launch(f"--source={src}", f"--output={tmp_path / 'out'}")
    assert proc.returncode != 0
    assert "12 missing variables" in proc.stderr and "params/blocks_1/attn/qkv/kernel" in proc.stderr, proc.stderr
    assert not (tmp_path / "out").exists()


def test_hub_id_offline_is_a_clear_error(tmp_path):
    proc = _launch("--source=no-such-org/no-such-model", f"--output={tmp_path / 'out'}",
                   env={"HF_HUB_OFFLINE": "1"})
    assert proc.returncode != 0
    assert "Hugging Face hub id" in proc.stderr and "needs network access" in proc.stderr, proc.stderr[-3000:]
    assert "local file or directory" in proc.stderr


@pytest.mark.parametrize("source", ["configs", "configs/spatial_ast.py"])
def test_existing_paths_are_not_hub_ids(tmp_path, source):
    """`dir/file` that exists is read as a path (here it holds no weights, so that is the error)."""
    proc = _launch(f"--source={source}", f"--output={tmp_path / 'out'}")
    assert proc.returncode != 0
    assert "hub id" not in proc.stderr
    assert ("no weights file found" in proc.stderr) or ("unknown checkpoint format" in proc.stderr), proc.stderr


def test_bad_config_override_is_named(tmp_path):
    proc = _launch("--source=x.pth", f"--output={tmp_path / 'out'}", "--config.model.nope=3")
    assert proc.returncode != 0
    assert "--config.model.nope" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-2000:]

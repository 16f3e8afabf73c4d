"""The CLAP task: LAION's contrastive loss, the loss over a batch sharded on 8 devices equal to
one device's (the global-batch negatives LAION gathers by hand), clamped logit scales in a
train step, and the config errors."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from jax.sharding import NamedSharding, PartitionSpec as P

from configs import clap_tiny
from jaxaudio.tasks.clap import CLAPTask, contrastive_loss, fingerprint
from jaxaudio.train.mesh import make_mesh
from launch_util import override

SMALL = {"model.audio.embed_dim": 16, "model.audio.depths": (1, 1), "model.text.hidden_size": 32,
         "model.text.num_layers": 1, "model.text.num_heads": 2, "model.text.intermediate_size": 64,
         "model.projection_dim": 16, "data.generate": False}


def _config(**kw):
    return override(clap_tiny.get_config(), {**SMALL, **kw})


@pytest.fixture(scope="module")
def task_and_vars():
    task = CLAPTask(_config())
    variables = jax.jit(task.init_variables)(jax.random.PRNGKey(0))
    import flax.linen as nn
    return task, nn.unbox(variables)


def _batch(task, n, seed=0):
    rng = np.random.default_rng(seed)
    b = task.dummy_batch(n)
    b["input_features"] = (rng.standard_normal(b["input_features"].shape) * 20 - 40).astype(np.float32)
    b["input_ids"] = rng.integers(4, 1000, b["input_ids"].shape).astype(np.int32)
    lengths = rng.integers(4, b["input_ids"].shape[1], n)
    b["attention_mask"] = (np.arange(b["input_ids"].shape[1])[None] < lengths[:, None]).astype(np.int32)
    b["input_ids"] = np.where(b["attention_mask"] == 1, b["input_ids"], 1)
    return b


def test_contrastive_loss_matches_laion_clip_loss_in_torch():
    rng = np.random.default_rng(0)
    a, t = rng.standard_normal((2, 6, 5)).astype(np.float32) * 3
    # LAION's ClipLoss (no mlp loss): (CE(logits_per_audio, arange) + CE(logits_per_text, arange)) / 2
    ta, tt = torch.from_numpy(a), torch.from_numpy(t)
    la, lt = ta @ tt.T, tt @ ta.T
    labels = torch.arange(6)
    want = (torch.nn.functional.cross_entropy(la, labels) + torch.nn.functional.cross_entropy(lt, labels)) / 2
    got = contrastive_loss(jnp.asarray(la.numpy()), jnp.asarray(lt.numpy()))
    np.testing.assert_allclose(float(got), float(want), rtol=1e-6)


def test_loss_over_a_sharded_batch_equals_one_device(task_and_vars):
    """Every clip meets every caption of the global batch, whichever device holds them."""
    task, variables = task_and_vars
    params, extra = variables["params"], {k: v for k, v in variables.items() if k != "params"}
    batch = _batch(task, 16)
    grad = jax.jit(jax.value_and_grad(lambda p, e, b: task.loss_fn(p, e, b, jax.random.PRNGKey(1))[0]))
    loss1, g1 = grad(params, extra, {k: jnp.asarray(v) for k, v in batch.items()})
    mesh = make_mesh({"data": 8})
    rows = NamedSharding(mesh, P("data"))
    sharded = {k: jax.device_put(v, rows) for k, v in batch.items()}
    loss8, g8 = grad(jax.device_put(params, NamedSharding(mesh, P())), extra, sharded)
    np.testing.assert_allclose(float(loss8), float(loss1), rtol=1e-5)
    for a, b in zip(jax.tree.leaves(g8), jax.tree.leaves(g1)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=1e-4)
    # And the loss is not the mean of per-device losses (which would drop cross-device negatives).
    local = [task.loss_fn(params, extra, {k: jnp.asarray(v[i:i + 2]) for k, v in batch.items()},
                          jax.random.PRNGKey(1))[0] for i in range(0, 16, 2)]
    assert abs(float(np.mean(local)) - float(loss1)) > 0.1


def test_fingerprint_tells_models_apart(task_and_vars):
    task, variables = task_and_vars
    params = variables["params"]
    changed = jax.tree.map(lambda x: x, params)
    changed["logit_scale_a"] = params["logit_scale_a"] + 1e-3
    assert fingerprint(params) == fingerprint(jax.tree.map(np.asarray, params))
    assert fingerprint(params) != fingerprint(changed)


@pytest.mark.parametrize("overrides, message", [
    ({"train.accum_steps": 2}, "accum_steps=2"),
    ({"data.features.truncation": "fusion"}, "enable_fusion is False"),
    ({"data.features.hop": 10}, "unknown fields"),
])
def test_bad_configs_are_named(overrides, message):
    with pytest.raises(ValueError, match=message):
        CLAPTask(_config(**overrides))

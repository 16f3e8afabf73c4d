"""The shared train step on a toy least-squares task: accumulation, NaN guard, frozen params."""
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from ml_collections import ConfigDict

from jaxaudio.layers.quant import QTensor, quantize, quantized_contract
from jaxaudio.train.loop import make_train_step
from jaxaudio.train.optim import make_optimizer, trainable_mask
from jaxaudio.train.state import TrainState


def _loss(params, extra, batch, rng):
    pred = batch["x"] @ params["w"] + params["b"] + params["offset"]
    loss = jnp.mean((pred - batch["y"]) ** 2)
    return loss, ({"mse": loss}, extra)


TASK = types.SimpleNamespace(loss_fn=_loss)


def _optim(frozen=""):
    return ConfigDict(dict(lr=0.1, min_lr=0.0, warmup_steps=0, total_steps=10, b1=0.9, b2=0.999, eps=1e-8,
                           weight_decay=0.0, max_grad_norm=0.0, trainable=".*", frozen=frozen, no_decay=".*b"))


def _setup(frozen=""):
    rng = np.random.default_rng(0)
    params = {"w": jnp.asarray(rng.standard_normal((3, 2)), jnp.float32), "b": jnp.zeros(2),
              "offset": jnp.ones(2)}
    cfg = _optim(frozen)
    tx, _ = make_optimizer(cfg, params)
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params), extra={},
                       rng=jax.random.PRNGKey(0))
    batch = {"x": jnp.asarray(rng.standard_normal((8, 3)), jnp.float32),
             "y": jnp.asarray(rng.standard_normal((8, 2)), jnp.float32)}
    return cfg, tx, state, batch


def test_accumulation_equals_one_big_batch():
    cfg, tx, state, batch = _setup()
    one, m1 = jax.jit(make_train_step(TASK, tx, accum_steps=1))(state, batch)
    two, m2 = jax.jit(make_train_step(TASK, tx, accum_steps=2))(state, batch)
    np.testing.assert_allclose(m1["loss"], m2["loss"], rtol=1e-6)
    np.testing.assert_allclose(m1["grad_norm"], m2["grad_norm"], rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), one.params, two.params)


def test_nan_batch_is_skipped():
    cfg, tx, state, batch = _setup()
    bad = dict(batch, y=batch["y"].at[0, 0].set(jnp.nan))
    new, metrics = jax.jit(make_train_step(TASK, tx))(state, bad)
    assert float(metrics["skipped"]) == 1.0 and int(new.step) == 1
    jax.tree.map(np.testing.assert_array_equal, new.params, state.params)
    jax.tree.map(np.testing.assert_array_equal, new.opt_state, state.opt_state)
    good, metrics = jax.jit(make_train_step(TASK, tx))(state, batch)
    assert float(metrics["skipped"]) == 0.0
    assert not np.allclose(good.params["w"], state.params["w"])


def test_frozen_parameters_stay_put_without_optimizer_state():
    cfg, tx, state, batch = _setup(frozen="offset")
    mask = trainable_mask(cfg, state.params)
    assert mask == {"w": True, "b": True, "offset": False}
    new, _ = jax.jit(make_train_step(TASK, tx, trainable=mask))(state, batch)
    np.testing.assert_array_equal(new.params["offset"], state.params["offset"])
    assert not np.allclose(new.params["b"], state.params["b"])
    moments = [x for x in jax.tree.leaves(state.opt_state) if getattr(x, "shape", ()) == (2,)]
    assert len(moments) == 2  # mu and nu of `b` only; `offset` has none
    # The mask changes nothing about the trainable parameters' update.
    ref, _ = jax.jit(make_train_step(TASK, tx))(state, batch)
    jax.tree.map(np.testing.assert_array_equal, new.params, ref.params)


def _quantized_loss(params, extra, batch, rng):
    pred = quantized_contract(batch["x"], params["w"], 1, jnp.float32) + params["b"]
    loss = jnp.mean((pred - batch["y"]) ** 2)
    return loss, ({"mse": loss}, extra)


def test_int8_frozen_kernel_with_accumulation():
    """An int8-stored frozen kernel (a `QTensor`) is not differentiated and passes through;
    accumulating over micro-batches still equals one big batch."""
    cfg, _, state, batch = _setup(frozen="w")
    floats = {"w": state.params["w"], "b": state.params["b"]}
    tx, _ = make_optimizer(cfg, floats)  # as the trainer: labels from the float parameters
    mask = trainable_mask(cfg, floats)
    params = dict(floats, w=quantize(floats["w"], (0,)))
    state = state.replace(params=params, opt_state=tx.init(params))
    task = types.SimpleNamespace(loss_fn=_quantized_loss)
    one, m1 = jax.jit(make_train_step(task, tx, accum_steps=1, trainable=mask))(state, batch)
    two, m2 = jax.jit(make_train_step(task, tx, accum_steps=2, trainable=mask))(state, batch)
    np.testing.assert_allclose(m1["grad_norm"], m2["grad_norm"], rtol=1e-5)
    np.testing.assert_allclose(one.params["b"], two.params["b"], rtol=1e-5, atol=1e-7)
    assert not np.allclose(one.params["b"], params["b"])
    for new in (one, two):
        assert isinstance(new.params["w"], QTensor) and new.params["w"].q.dtype == jnp.int8
        np.testing.assert_array_equal(new.params["w"].q, params["w"].q)


def test_mask_must_match_something():
    cfg = _optim()
    cfg.trainable = "nothing"
    with pytest.raises(ValueError, match="config.optim.trainable='nothing'"):
        trainable_mask(cfg, {"w": jnp.zeros(1)})


def test_layer_scale_and_no_decay():
    """Layer-wise lr scale multiplies the update; `no_decay` parameters get no weight decay."""
    params = {"w": jnp.ones((2, 2)), "b": jnp.ones(2)}
    cfg = _optim()
    cfg.weight_decay = 0.5
    tx, _ = make_optimizer(cfg, params, layer_scale=lambda p: 0.5 if p == "w" else 1.0)
    zero = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zero, tx.init(params), params)
    # zero gradient: Adam's step is 0, so the update is -lr * scale * wd * p for decayed params
    np.testing.assert_allclose(updates["w"], -0.1 * 0.5 * 0.5 * np.ones((2, 2)), rtol=1e-6)
    np.testing.assert_array_equal(updates["b"], np.zeros(2))

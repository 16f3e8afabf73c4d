"""The generic trainer: sharded step equals single-device step; resume equals uninterrupted."""
import jax
import numpy as np
import pytest

from jaxaudio.train.loop import Trainer
from train.fixtures import make_clips, tiny_config


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("clips"))
    make_clips(root)
    return root


def _params(trainer):
    return jax.tree.map(np.asarray, jax.device_get(trainer.state.params))


def _losses(trainer):
    return [h["loss"] for h in trainer.history]


def test_sharded_step_equals_single_device(data_root, tmp_path):
    assert jax.device_count() == 8, "conftest sets 8 fake CPU devices"
    single = tiny_config(data_root, steps=2)
    sharded = tiny_config(data_root, steps=2)
    sharded.mesh.update(dict(data=2, fsdp=2, tensor=2))
    # The attention key bias has an exactly zero gradient (softmax ignores a shift), so its
    # "gradient" is rounding noise that differs with the reduction order; Adam with a tiny
    # eps would scale that noise up to +-lr. A larger eps keeps the comparison about sharding.
    for c in (single, sharded):
        c.optim.eps = 1e-3
    a = Trainer(single, str(tmp_path / "single"))
    b = Trainer(sharded, str(tmp_path / "sharded"))
    assert a.mesh.devices.size == 1 and b.mesh.devices.shape == (2, 2, 2)
    a.train()
    b.train()
    # fsdp and tensor really split parameters: the qkv kernel is sharded on `embed` and `heads`.
    qkv = b.state.params["blocks_0"]["attn"]["qkv"]["kernel"]
    assert len({str(s.index) for s in qkv.addressable_shards}) == 4
    np.testing.assert_allclose(_losses(a), _losses(b), rtol=1e-5)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6), _params(a), _params(b))


def test_resume_equals_uninterrupted(data_root, tmp_path):
    full = Trainer(tiny_config(data_root, steps=4), str(tmp_path / "full"))
    full.train()

    # The interrupted run: the same config, stopped after step 2 (its schedule spans 4 steps).
    cut = tiny_config(data_root, steps=2)
    cut.optim.total_steps = 4
    first = Trainer(cut, str(tmp_path / "resumed"))
    first.train()
    second = Trainer(tiny_config(data_root, steps=4), str(tmp_path / "resumed"))
    assert second.restore_or_init() == 2
    # The data position is the step: the batches from step 3 on are the uninterrupted run's.
    nxt = next(second.batches(2))
    ref = full.batches(0)
    for _ in range(3):
        ref_batch = next(ref)
    np.testing.assert_array_equal(nxt["wave"], ref_batch["wave"])

    resumed = Trainer(tiny_config(data_root, steps=4), str(tmp_path / "resumed"))
    resumed.train()
    np.testing.assert_allclose(_losses(first) + _losses(resumed), _losses(full), rtol=1e-6)
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(x, y), _params(full), _params(resumed))
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)),
                 jax.device_get(full.state.extra), jax.device_get(resumed.state.extra))


def test_init_from_converted_checkpoint(data_root, tmp_path):
    """`config.init.checkpoint`: loaded variables replace the fresh ones; a checkpoint may
    declare some variables fresh (a pretraining checkpoint without heads); others missing
    is an error naming them."""
    from jaxaudio.convert import flatten, save_converted, unflatten

    source = Trainer(tiny_config(data_root, steps=1), str(tmp_path / "src"))
    params = jax.tree.map(lambda x: np.asarray(x) + 1.0, jax.device_get(source.state.params))
    flat = {k: v for k, v in flatten(params).items() if not k.startswith("head/")}
    save_converted(str(tmp_path / "ckpt"), {"params": unflatten(flat), **jax.device_get(source.state.extra)},
                   {"fresh": r"params/head/.*"})
    cfg = tiny_config(data_root, steps=1)
    cfg.init.checkpoint = str(tmp_path / "ckpt")
    t = Trainer(cfg, str(tmp_path / "dst"))
    got = flatten(_params(t))
    for k, v in flat.items():
        np.testing.assert_array_equal(got[k], v)
    np.testing.assert_array_equal(got["head/kernel"], flatten(_params(source))["head/kernel"])

    save_converted(str(tmp_path / "bad"), {"params": unflatten(flat), **jax.device_get(source.state.extra)}, {})
    cfg.init.checkpoint = str(tmp_path / "bad")
    with pytest.raises(ValueError, match="missing params/head/kernel"):
        Trainer(cfg, str(tmp_path / "dst2"))

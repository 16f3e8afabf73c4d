"""`optim.clamp`: parameters kept inside a range after every update, as PyTorch's in-place
`clamp_` after `optimizer.step()` (LAION-CLAP's logit scales)."""
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from ml_collections import ConfigDict

from jaxaudio.train.optim import make_optimizer


def _cfg(**kw) -> ConfigDict:
    base = dict(lr=0.5, min_lr=0.5, warmup_steps=0, total_steps=10, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0,
                max_grad_norm=0.0, trainable=".*", frozen="w_frozen", no_decay="(?!)")
    return ConfigDict(dict(base, **kw))


def test_clamped_parameter_matches_torch_adam_with_clamp():
    params = {"logit_scale_a": jnp.float32(4.5), "w": jnp.ones(3), "w_frozen": jnp.ones(2)}
    tx, _ = make_optimizer(_cfg(clamp=((r"logit_scale_a", 0.0, float(np.log(100))),)), params)
    state = tx.init(params)
    t_scale, t_w = torch.nn.Parameter(torch.tensor(4.5)), torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.Adam([t_scale, t_w], lr=0.5, betas=(0.9, 0.999), eps=1e-8)
    for step in range(6):
        # The scale is pushed up (then down), the unclamped weights keep moving freely.
        sign = -1.0 if step < 4 else 1.0
        grads = {"logit_scale_a": jnp.float32(sign), "w": jnp.full(3, 0.3), "w_frozen": jnp.ones(2)}
        updates, state = tx.update(grads, state, params)
        params = optax.apply_updates(params, updates)
        opt.zero_grad()
        t_scale.grad, t_w.grad = torch.tensor(sign), torch.full((3,), 0.3)
        opt.step()
        with torch.no_grad():
            t_scale.clamp_(0, float(np.log(100)))
        # float32 Adam in two libraries: ~1e-5 apart after a few steps of lr 0.5.
        np.testing.assert_allclose(float(params["logit_scale_a"]), float(t_scale.detach()), atol=5e-5)
        np.testing.assert_allclose(np.asarray(params["w"]), t_w.detach().numpy(), atol=5e-5)
        assert 0.0 <= float(params["logit_scale_a"]) <= np.log(100) + 1e-6
    np.testing.assert_array_equal(np.asarray(params["w_frozen"]), np.ones(2))  # frozen: untouched


@pytest.mark.parametrize("clamp, message", [
    (((r"nothing_here", 0.0, 1.0),), "matches no parameter"),
    (((r"w", 2.0, 1.0),), "lo=2.0 > hi=1.0"),
])
def test_bad_clamp_is_named(clamp, message):
    with pytest.raises(ValueError, match=message):
        make_optimizer(_cfg(clamp=clamp), {"w": jnp.ones(3)})

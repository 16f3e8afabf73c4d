"""`PatchEmbed`: the strided patch convolution as one matrix product, against torch's
`conv2d` (values and gradients) and against flax's `nn.Conv` (parameters and their init)."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from jaxaudio.layers import PatchEmbed

AXES = ("conv_h", "conv_w", "conv_in", "embed")


def _torch_conv(x, kernel, bias, patch):
    """NHWC numpy in and out; torch's conv2d with stride = kernel size, no padding."""
    xt = torch.tensor(np.asarray(x)).permute(0, 3, 1, 2).requires_grad_()
    wt = torch.tensor(np.asarray(kernel)).permute(3, 2, 0, 1).requires_grad_()
    bt = None if bias is None else torch.tensor(np.asarray(bias)).requires_grad_()
    y = torch.nn.functional.conv2d(xt, wt, bt, stride=patch)
    torch.sin(y).sum().backward()
    grads = dict(x=xt.grad.permute(0, 2, 3, 1).numpy(), kernel=wt.grad.permute(2, 3, 1, 0).numpy())
    if bt is not None:
        grads["bias"] = bt.grad.numpy()
    return y.detach().permute(0, 2, 3, 1).numpy(), grads


@pytest.mark.parametrize("use_bias", [True, False])
def test_patch_embed_matches_torch_conv2d(use_bias):
    # 35 x 21 with 4 x 4 patches: the last 3 rows and the last column are a partial patch, dropped.
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 35, 21, 3))
    layer = PatchEmbed(8, 4, AXES, use_bias=use_bias, bias_init=nn.initializers.normal(1.0))
    params = nn.unbox(layer.init(jax.random.PRNGKey(0), x))["params"]
    y = layer.apply({"params": params}, x)
    y_ref, g_ref = _torch_conv(x, params["kernel"], params.get("bias"), 4)
    assert y.shape == (2, 8, 5, 8)
    np.testing.assert_allclose(np.asarray(y), y_ref, atol=1e-5)

    def loss(p, x):
        return jnp.sum(jnp.sin(layer.apply({"params": p}, x)))
    g_params, g_x = jax.grad(loss, argnums=(0, 1))(params, x)
    np.testing.assert_allclose(np.asarray(g_x), g_ref["x"], atol=1e-5)
    for name, g in g_params.items():
        np.testing.assert_allclose(np.asarray(g), g_ref[name], atol=1e-4, err_msg=name)
    assert set(g_params) == ({"kernel", "bias"} if use_bias else {"kernel"})


def test_patch_embed_has_nn_conv_parameters_and_init():
    """Same names, shapes and (for the same rng) values as the nn.Conv it replaces, so
    checkpoints and converters do not change; the kernel carries the logical axis names."""
    x = jnp.zeros((1, 16, 8, 4))
    init = nn.initializers.xavier_uniform()
    conv = nn.Conv(12, (8, 8), strides=(8, 8), padding="VALID", kernel_init=init)
    want = conv.init(jax.random.PRNGKey(3), x)["params"]
    boxed = PatchEmbed(12, 8, AXES, kernel_init=init).init(jax.random.PRNGKey(3), x)["params"]
    got = nn.unbox(boxed)
    assert jax.tree.map(jnp.shape, got) == jax.tree.map(jnp.shape, want)
    for name in want:
        np.testing.assert_array_equal(np.asarray(got[name]), np.asarray(want[name]), err_msg=name)
    assert boxed["kernel"].names == AXES and boxed["bias"].names == ("embed",)


def test_patch_embed_names_a_wrong_rank():
    with pytest.raises(ValueError, match=r"PatchEmbed expects \[batch, h, w, channels\]; got shape \(2, 16, 8\)"):
        PatchEmbed(4, 4, AXES).init(jax.random.PRNGKey(0), jnp.zeros((2, 16, 8)))

"""`BatchNorm` and `layer_norm` against PyTorch's `BatchNorm2d` and `LayerNorm`.

Our BatchNorm is channels-last (`[batch, time, freq, channels]`); PyTorch's is NCHW, so
the inputs are transposed between the two. Inputs have a non-zero mean and a scale far
from 1 per channel, so mixing up biased and unbiased variance, or normalising over the
wrong axes, shows up far above the 1e-5 tolerance.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from jaxaudio.layers import BatchNorm, layer_norm

ATOL = 1e-5
C = 3


def _nhwc(seed: int, shape=(4, 6, 5, C)) -> np.ndarray:
    rng = np.random.default_rng(seed)
    offset = np.array([2.0, -1.0, 0.5])[:C]
    scale = np.array([3.0, 0.5, 1.5])[:C]
    return (offset + scale * rng.standard_normal(shape)).astype(np.float32)


def _nchw(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def _to_nhwc(t: torch.Tensor) -> np.ndarray:
    return t.detach().numpy().transpose(0, 2, 3, 1)


def _pair(affine: bool, seed: int = 0):
    """Our BatchNorm with its variables, and a torch BatchNorm2d with the same affine params."""
    ours = BatchNorm(affine=affine)
    variables = nn.unbox(ours.init(jax.random.PRNGKey(0), jnp.asarray(_nhwc(99)), train=True))
    torch_bn = torch.nn.BatchNorm2d(C, eps=1e-5, momentum=0.1, affine=affine)
    if affine:
        rng = np.random.default_rng(seed)
        scale = (1 + 0.3 * rng.standard_normal(C)).astype(np.float32)
        bias = (0.5 * rng.standard_normal(C)).astype(np.float32)
        variables["params"] = {"scale": jnp.asarray(scale), "bias": jnp.asarray(bias)}
        with torch.no_grad():
            torch_bn.weight.copy_(torch.from_numpy(scale))
            torch_bn.bias.copy_(torch.from_numpy(bias))
    return ours, variables, torch_bn


def test_init_does_not_update_statistics():
    _, variables, _ = _pair(affine=True)
    np.testing.assert_array_equal(variables["batch_stats"]["mean"], np.zeros(C))
    np.testing.assert_array_equal(variables["batch_stats"]["var"], np.ones(C))


@pytest.mark.parametrize("affine", [True, False])
def test_batchnorm_train_matches_torch_over_two_steps(affine):
    ours, variables, torch_bn = _pair(affine)
    assert ("params" in variables) == affine
    torch_bn.train()
    for step in range(2):
        x = _nhwc(step)
        y, updated = ours.apply(variables, jnp.asarray(x), train=True, mutable=["batch_stats"])
        variables = {**variables, **updated}
        y_ref = _to_nhwc(torch_bn(_nchw(x)))
        np.testing.assert_allclose(np.asarray(y), y_ref, atol=ATOL, err_msg=f"output, step {step}")
        stats = variables["batch_stats"]
        np.testing.assert_allclose(np.asarray(stats["mean"]), torch_bn.running_mean.numpy(), atol=ATOL,
                                   err_msg=f"running mean, step {step}")
        # PyTorch keeps the *unbiased* variance (n / (n - 1), n = 4*6*5 = 120) in running_var.
        np.testing.assert_allclose(np.asarray(stats["var"]), torch_bn.running_var.numpy(), atol=ATOL,
                                   err_msg=f"running var, step {step}")
    # Guard the test: flax's nn.BatchNorm would keep the biased variance; that differs
    # from PyTorch's running_var by far more than ATOL on these inputs.
    b0, b1 = (_nhwc(i).reshape(-1, C).var(0) for i in range(2))
    biased_running_var = 0.9 * (0.9 + 0.1 * b0) + 0.1 * b1
    assert np.max(np.abs(biased_running_var - torch_bn.running_var.numpy())) > 1e-3


@pytest.mark.parametrize("affine", [True, False])
def test_batchnorm_eval_uses_given_statistics(affine):
    ours, variables, torch_bn = _pair(affine, seed=1)
    mean = np.array([1.5, -0.7, 0.2], np.float32)
    var = np.array([4.0, 0.3, 2.2], np.float32)
    variables["batch_stats"] = {"mean": jnp.asarray(mean), "var": jnp.asarray(var)}
    with torch.no_grad():
        torch_bn.running_mean.copy_(torch.from_numpy(mean))
        torch_bn.running_var.copy_(torch.from_numpy(var))
    torch_bn.eval()
    x = _nhwc(3)
    y, updated = ours.apply(variables, jnp.asarray(x), train=False, mutable=["batch_stats"])
    np.testing.assert_allclose(np.asarray(y), _to_nhwc(torch_bn(_nchw(x))), atol=ATOL)
    # Evaluation leaves the statistics alone.
    np.testing.assert_array_equal(np.asarray(updated["batch_stats"]["mean"]), mean)
    np.testing.assert_array_equal(np.asarray(updated["batch_stats"]["var"]), var)


@pytest.mark.parametrize("use_params", [False, True])
def test_layer_norm_matches_torch(use_params):
    dim = 48
    rng = np.random.default_rng(5)
    x = (3.0 + 2.0 * rng.standard_normal((2, 7, dim))).astype(np.float32)
    ln = layer_norm(1e-6)
    variables = nn.unbox(ln.init(jax.random.PRNGKey(0), jnp.asarray(x)))
    torch_ln = torch.nn.LayerNorm(dim, eps=1e-6)
    if use_params:
        scale = (1 + 0.2 * rng.standard_normal(dim)).astype(np.float32)
        bias = (0.3 * rng.standard_normal(dim)).astype(np.float32)
        variables = {"params": {"scale": jnp.asarray(scale), "bias": jnp.asarray(bias)}}
        with torch.no_grad():
            torch_ln.weight.copy_(torch.from_numpy(scale))
            torch_ln.bias.copy_(torch.from_numpy(bias))
    y = np.asarray(ln.apply(variables, jnp.asarray(x)))
    y_ref = torch_ln(torch.from_numpy(x)).detach().numpy()
    np.testing.assert_allclose(y, y_ref, atol=ATOL)


def test_layer_norm_eps_matters():
    """A tiny-variance input separates eps=1e-6 from flax's default 1e-5 (guards the eps wiring)."""
    x = (1e-3 * np.random.default_rng(0).standard_normal((3, 16))).astype(np.float32)
    ln = layer_norm(1e-6)
    variables = nn.unbox(ln.init(jax.random.PRNGKey(0), jnp.asarray(x)))
    y = np.asarray(ln.apply(variables, jnp.asarray(x)))
    ref = torch.nn.LayerNorm(16, eps=1e-6)(torch.from_numpy(x)).detach().numpy()
    wrong = torch.nn.LayerNorm(16, eps=1e-5)(torch.from_numpy(x)).detach().numpy()
    np.testing.assert_allclose(y, ref, atol=ATOL)
    assert np.max(np.abs(y - wrong)) > 1e-2


def test_batchnorm_mask_takes_statistics_from_the_masked_rows_like_torch_on_the_subset():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((5, 3, 2, 4)).astype(np.float32) * 2 + 1
    rows = np.array([True, False, True, True, False])
    bn = BatchNorm()
    variables = bn.init(jax.random.PRNGKey(0), jnp.asarray(x), False)
    out, upd = bn.apply(variables, jnp.asarray(x), True, jnp.asarray(rows)[:, None, None], mutable=["batch_stats"])
    ref = torch.nn.BatchNorm2d(4).train()
    want = ref(torch.from_numpy(x[rows]).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).detach().numpy()
    np.testing.assert_allclose(np.asarray(out)[rows], want, atol=1e-5)
    np.testing.assert_allclose(upd["batch_stats"]["mean"], ref.running_mean.numpy(), atol=1e-6)
    np.testing.assert_allclose(upd["batch_stats"]["var"], ref.running_var.numpy(), atol=1e-6)
    _, none = bn.apply(variables, jnp.asarray(x), True, jnp.zeros((5, 1, 1), bool), mutable=["batch_stats"])
    np.testing.assert_array_equal(none["batch_stats"]["var"], variables["batch_stats"]["var"])  # untouched

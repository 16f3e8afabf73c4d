"""`flops.jaxpr_matmul_flops`: matrix-product FLOPs from the jaxpr, a scan's body counted once
per iteration (XLA's cost analysis counts it once in all)."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from jaxaudio.models.llama import Llama
from jaxaudio.train.flops import compiled_flops, jaxpr_matmul_flops

KW = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4)
IDS = jnp.zeros((2, 5), jnp.int32)


def _analytic_forward() -> float:
    tokens, d, f, heads, length = 10, 32, 48, 4, 5
    per_layer = 2 * tokens * (4 * d * d + 3 * d * f) + 2 * 2 * (2 * heads * length * length * (d // heads))
    return 3 * per_layer + 2 * tokens * d * 64  # + lm_head


@pytest.mark.parametrize("scan", [False, True])
def test_counts_every_layer(scan):
    model, remat = Llama(**KW, scan_layers=scan), Llama(**KW, scan_layers=scan, remat="full")
    variables = jax.eval_shape(lambda: nn.unbox(model.init(jax.random.PRNGKey(0), IDS)))
    forward, exact = jaxpr_matmul_flops(lambda v: model.apply(v, IDS), variables)
    assert exact and forward == _analytic_forward()
    # Backward: the input and the weight gradients, twice the forward; with remat a second
    # forward of the blocks (less what the backward does not need) on top.
    grad, _ = jaxpr_matmul_flops(jax.grad(lambda v: model.apply(v, IDS).sum()), variables)
    assert grad == 3 * forward
    regrad, _ = jaxpr_matmul_flops(jax.grad(lambda v: remat.apply(v, IDS).sum()), variables)
    assert 3.5 * forward < regrad < 4 * forward


def test_xla_counts_a_scan_once_and_loops_are_flagged():
    model = Llama(**KW, scan_layers=True)
    variables = nn.unbox(model.init(jax.random.PRNGKey(0), IDS))
    xla = compiled_flops(jax.jit(lambda v: model.apply(v, IDS)).lower(variables).compile())
    assert xla < 0.6 * _analytic_forward()  # why the jaxpr count exists
    _, exact = jaxpr_matmul_flops(lambda x: jax.lax.while_loop(lambda c: c[1] < 3, lambda c: (c[0] @ c[0], c[1] + 1),
                                                               (x, 0))[0], jnp.ones((4, 4)))
    assert not exact

"""`PreNormBlock` against timm's ViT `Block`, through the real Spatial-AST key map; `DropPath`.

The timm block is loaded with random tensors (not its initialisation: LayerNorm scales
and all biases are non-trivial), the same tensors go through `jaxaudio.convert.convert`
with `jaxaudio.convert.spatial_ast.key_map` under a `blocks.0.` prefix, so a wrong
transpose or qkv split in the key map fails here as well as a wrong block.
"""
import functools
from functools import partial

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from jaxaudio.convert import convert
from jaxaudio.convert.spatial_ast import key_map
from jaxaudio.layers import DropPath, PreNormBlock
from jaxaudio.models.spatial_ast import SpatialAST
from launch.torch_compat import import_timm


@functools.lru_cache(maxsize=None)
def _spatial_ast_key_map():
    return key_map(SpatialAST())


def _random_state_dict(block: torch.nn.Module, seed: int) -> dict[str, np.ndarray]:
    """Random tensors in `block`'s own names and shapes: O(1) activations through the block."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, t in block.state_dict().items():
        shape = tuple(t.shape)
        if name.endswith("weight") and len(shape) == 1:  # LayerNorm scale
            val = 1.0 + 0.2 * rng.standard_normal(shape)
        elif name.endswith("bias"):
            val = 0.1 * rng.standard_normal(shape)
        else:
            val = rng.standard_normal(shape) / np.sqrt(shape[1])
        out[name] = val.astype(np.float32)
    return out


def _timm_block(dim: int, heads: int, mlp_ratio: float, seed: int):
    timm = import_timm()
    del timm
    from timm.models.vision_transformer import Block
    torch.manual_seed(seed)
    block = Block(dim, heads, mlp_ratio, qkv_bias=True, norm_layer=partial(torch.nn.LayerNorm, eps=1e-6)).eval()
    state = _random_state_dict(block, seed)
    block.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()}, strict=True)
    return block, state


@pytest.mark.parametrize("dim,heads,tokens,batch", [(64, 4, 10, 2), (768, 12, 16, 1)], ids=["small", "vit_b"])
def test_pre_norm_block_matches_timm(dim, heads, tokens, batch):
    mlp_ratio = 4.0
    block, state = _timm_block(dim, heads, mlp_ratio, seed=dim)
    ours = PreNormBlock(num_heads=heads, mlp_dim=int(dim * mlp_ratio))
    x = np.random.default_rng(1).standard_normal((batch, tokens, dim)).astype(np.float32)
    expected = nn.unbox(jax.eval_shape(ours.init, jax.random.PRNGKey(0), jnp.asarray(x)))
    variables = convert({f"blocks.0.{k}": v for k, v in state.items()}, _spatial_ast_key_map(),
                        {"params": {"blocks_0": expected["params"]}})
    params = variables["params"]["blocks_0"]
    # fused qkv: torch's [3*dim, dim] rows are (q|k|v, head, head_dim).
    np.testing.assert_array_equal(params["attn"]["qkv"]["kernel"][:, 1, 2, :],
                                  state["attn.qkv.weight"][dim + 2 * (dim // heads):dim + 3 * (dim // heads)].T)
    y = np.asarray(jax.jit(lambda p, x: ours.apply({"params": p}, x))(params, jnp.asarray(x)))
    with torch.no_grad():
        y_ref = block(torch.from_numpy(x)).numpy()
    err = np.max(np.abs(y - y_ref))
    assert err <= 1e-5, f"max abs error {err:.2e}"
    # Guard: the block is far from the identity on these weights.
    assert np.max(np.abs(y_ref - x)) > 0.5


def test_drop_path_deterministic_is_identity():
    x = jnp.asarray(np.random.default_rng(0).standard_normal((8, 5, 3)), jnp.float32)
    y = DropPath(0.5).apply({}, x, deterministic=True)
    np.testing.assert_array_equal(np.asarray(y), np.asarray(x))
    # rate 0 is the identity even in training (and needs no rng)
    np.testing.assert_array_equal(np.asarray(DropPath(0.0).apply({}, x, deterministic=False)), np.asarray(x))


def test_drop_path_training_drops_whole_examples():
    rate, n = 0.3, 4000
    x = jnp.ones((n, 3, 2), jnp.float32)
    y = np.asarray(DropPath(rate).apply({}, x, deterministic=False, rngs={"dropout": jax.random.PRNGKey(0)}))
    per_example = y.reshape(n, -1)
    # Each example is either all zero or all 1 / (1 - rate): the mask is per example.
    dropped = np.all(per_example == 0, axis=1)
    kept = np.all(np.isclose(per_example, 1 / (1 - rate), rtol=1e-6, atol=0), axis=1)
    assert np.all(dropped | kept)
    # Binomial(4000, 0.3): std of the fraction 0.007, so 0.03 is > 4 sigma.
    assert abs(dropped.mean() - rate) < 0.03, dropped.mean()
    # The expectation is preserved.
    assert abs(y.mean() - 1.0) < 0.05
    # Another rng drops other examples.
    y2 = np.asarray(DropPath(rate).apply({}, x, deterministic=False, rngs={"dropout": jax.random.PRNGKey(1)}))
    assert np.any((y2.reshape(n, -1)[:, 0] == 0) != dropped)


def test_pre_norm_block_drop_path_is_active_in_training():
    block = PreNormBlock(num_heads=2, mlp_dim=16, drop_path=0.5)
    x = jnp.asarray(np.random.default_rng(0).standard_normal((64, 3, 8)), jnp.float32)
    variables = block.init(jax.random.PRNGKey(0), x)
    a = np.asarray(block.apply(variables, x, train=False))
    b = np.asarray(block.apply(variables, x, train=True, rngs={"dropout": jax.random.PRNGKey(2)}))
    # With both branches dropped an example passes through unchanged; that happens for ~1/4.
    unchanged = np.all(np.isclose(b, np.asarray(x), atol=1e-6), axis=(1, 2))
    assert 0.05 < unchanged.mean() < 0.5, unchanged.mean()
    assert np.max(np.abs(a - b)) > 1e-3  # the freshly initialised branches are O(1e-2)

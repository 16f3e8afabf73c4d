"""Rotary embeddings against transformers' LLaMA RoPE, and `MultiHeadAttention(rope_theta=...)`
against a torch computation (projections, HF's `apply_rotary_pos_emb`, grouped kv heads, SDPA).

The attention checks cover what the KV cache adds: keys are rotated before they are
cached, default positions continue from the cache index, and explicit positions (a
left-padded prompt) are honoured.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from jaxaudio.layers import MultiHeadAttention
from jaxaudio.layers.rotary import apply_rotary, rotary_cos_sin, rotary_inv_freq, rotate_half

ATOL = 1e-5
B, L, E, H, KV, D = 2, 7, 32, 4, 2, 8


def _hf_rope():
    from transformers import LlamaConfig
    from transformers.models.llama import modeling_llama
    return LlamaConfig, modeling_llama


def _x(seed, shape, scale=1.0) -> np.ndarray:
    return (scale * np.random.default_rng(seed).standard_normal(shape)).astype(np.float32)


@pytest.mark.parametrize("theta", [10000.0, 500000.0])
def test_cos_sin_match_transformers(theta):
    LlamaConfig, hf = _hf_rope()
    config = LlamaConfig(hidden_size=64, num_attention_heads=4, rope_theta=theta)
    rope = hf.LlamaRotaryEmbedding(config)
    positions = np.array([[0, 1, 2, 3, 100, 2047], [5, 0, 0, 17, 1000, 4095]])
    cos_ref, sin_ref = rope(torch.zeros(1, dtype=torch.float32), torch.from_numpy(positions))
    np.testing.assert_allclose(np.asarray(rotary_inv_freq(16, theta)), rope.inv_freq.numpy(), rtol=1e-6)
    cos, sin = rotary_cos_sin(jnp.asarray(positions), 16, theta)
    assert cos.dtype == jnp.float32 and cos.shape == (2, 6, 16)
    # Angles reach 4095 rad; float32 cos/sin of such arguments agree to a few ulps of the angle.
    err = max(np.abs(np.asarray(cos) - cos_ref.numpy()).max(), np.abs(np.asarray(sin) - sin_ref.numpy()).max())
    assert err <= 1e-4, f"cos/sin max abs error {err:.2e} > 1e-4"


def test_apply_rotary_matches_transformers():
    LlamaConfig, hf = _hf_rope()
    rope = hf.LlamaRotaryEmbedding(LlamaConfig(hidden_size=4 * D, num_attention_heads=4))
    q = _x(0, (B, L, H, D))
    positions = np.stack([np.arange(L), np.maximum(np.arange(L) - 3, 0)])
    cos, sin = rope(torch.zeros(1), torch.from_numpy(positions))
    q_t = torch.from_numpy(q).transpose(1, 2)  # HF's [batch, heads, len, head_dim]
    ref, _ = hf.apply_rotary_pos_emb(q_t, q_t, cos, sin)
    got = np.asarray(apply_rotary(jnp.asarray(q), jnp.asarray(positions), 10000.0))
    np.testing.assert_allclose(got, ref.transpose(1, 2).numpy(), atol=ATOL)
    # Guard: the interleaved (2i, 2i+1) pairing of Meta's code gives something else.
    pairs = q.reshape(B, L, H, D // 2, 2)
    angle = positions[:, :, None, None] * np.asarray(rotary_inv_freq(D, 10000.0))
    inter = np.stack([pairs[..., 0] * np.cos(angle) - pairs[..., 1] * np.sin(angle),
                      pairs[..., 1] * np.cos(angle) + pairs[..., 0] * np.sin(angle)], -1).reshape(q.shape)
    assert np.abs(inter - got).max() > 1e-2


def test_rotation_properties():
    x = jnp.asarray(_x(1, (1, 5, 2, D)))
    np.testing.assert_allclose(np.asarray(rotate_half(rotate_half(x))), -np.asarray(x))
    # A rotation keeps norms, and q.k depends on the position difference only.
    pos = jnp.arange(5)[None]
    rx = apply_rotary(x, pos, 10000.0)
    np.testing.assert_allclose(np.linalg.norm(rx, axis=-1), np.linalg.norm(x, axis=-1), rtol=1e-5)
    q, k = x[:, :1], x[:, 1:2]

    def dot(m, n):
        return float(jnp.sum(apply_rotary(q, jnp.array([[m]]), 1e4) * apply_rotary(k, jnp.array([[n]]), 1e4)))
    assert abs(dot(3, 1) - dot(10, 8)) < 1e-4
    assert abs(dot(3, 1) - dot(3, 2)) > 1e-3


def test_bfloat16_input_keeps_its_dtype():
    x = _x(2, (B, L, H, D))
    pos = jnp.broadcast_to(jnp.arange(L), (B, L)) + 300
    got = apply_rotary(jnp.asarray(x, jnp.bfloat16), pos, 10000.0)
    assert got.dtype == jnp.bfloat16
    ref = apply_rotary(jnp.asarray(jnp.asarray(x, jnp.bfloat16), jnp.float32), pos, 10000.0)
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(ref), atol=2e-2)


def _random_params(module, *args, seed=0, **kwargs):
    params = nn.unbox(module.init(jax.random.PRNGKey(0), *args, **kwargs))["params"]
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda p: jnp.asarray(0.3 * rng.standard_normal(p.shape), jnp.float32), params)


def _torch_rope_attention(params, x, positions, key_mask=None):
    """Reference: Linear q/k/v (no bias), HF's rotary, repeat_interleave kv heads, causal SDPA."""
    _, hf = _hf_rope()
    t = lambda a: torch.from_numpy(np.array(a, np.float32))  # noqa: E731
    xt = t(x)

    def proj(name, heads):
        w = t(params[name]["kernel"]).reshape(E, -1)
        return (xt @ w).reshape(B, -1, heads, D).transpose(1, 2)

    q, k, v = proj("query", H), proj("key", KV), proj("value", KV)
    angles = torch.from_numpy(np.array(positions))[..., None].float() * t(rotary_inv_freq(D, 10000.0))
    emb = torch.cat([angles, angles], -1)
    q, k = hf.apply_rotary_pos_emb(q, k, emb.cos(), emb.sin())
    k, v = k.repeat_interleave(H // KV, 1), v.repeat_interleave(H // KV, 1)
    n = x.shape[1]
    mask = torch.tril(torch.ones(n, n, dtype=torch.bool))[None, None]
    if key_mask is not None:
        mask = mask & torch.from_numpy(key_mask)[:, None, None, :]
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2).reshape(B, n, -1)
    return (o @ t(params["out"]["kernel"]).reshape(H * D, E)).numpy()


@pytest.fixture(scope="module")
def rope_mha():
    mha = MultiHeadAttention(H, head_dim=D, num_kv_heads=KV, use_bias=False, rope_theta=10000.0)
    x = _x(3, (B, L, E))
    return mha, _random_params(mha, jnp.asarray(x), seed=3), x


def test_attention_with_rotary_matches_torch(rope_mha):
    mha, params, x = rope_mha
    pos = np.broadcast_to(np.arange(L), (B, L))
    got = np.asarray(mha.apply({"params": params}, jnp.asarray(x), is_causal=True))  # default positions 0..L-1
    ref = _torch_rope_attention(params, x, pos)
    np.testing.assert_allclose(got, ref, atol=ATOL)
    plain = MultiHeadAttention(H, head_dim=D, num_kv_heads=KV, use_bias=False)
    assert np.abs(np.asarray(plain.apply({"params": params}, jnp.asarray(x), is_causal=True)) - ref).max() > 1e-2


def test_cached_decoding_continues_positions_from_the_cache_index(rope_mha):
    mha, params, x = rope_mha
    want = np.asarray(mha.apply({"params": params}, jnp.asarray(x), is_causal=True))
    dec = mha.clone(decode=True)
    cache = dec.init(jax.random.PRNGKey(0), jnp.asarray(x))["cache"]
    step = jax.jit(lambda c, chunk: dec.apply({"params": params, "cache": c}, chunk, mutable=["cache"]))
    outs, start = [], 0
    for n in (4, 1, 1, 1):
        y, upd = step(cache, jnp.asarray(x[:, start:start + n]))
        cache, start = upd["cache"], start + n
        outs.append(np.asarray(y))
    np.testing.assert_allclose(np.concatenate(outs, 1), want, atol=ATOL)


def test_cached_decoding_with_left_padding_and_explicit_positions(rope_mha):
    """Example 1 has 3 pad slots in front: its positions start at 0 on the first real token."""
    mha, params, x = rope_mha
    keep = np.ones((B, L), bool)
    keep[1, :3] = False
    pos = np.where(keep, np.cumsum(keep, 1) - 1, 0)
    ref = _torch_rope_attention(params, x, pos, key_mask=keep)
    dec = mha.clone(decode=True)
    cache = dec.init(jax.random.PRNGKey(0), jnp.asarray(x))["cache"]
    mask = jnp.asarray(keep)[:, None, None, :]
    y0, upd = dec.apply({"params": params, "cache": cache}, jnp.asarray(x[:, :5]), mask=mask,
                        positions=jnp.asarray(pos[:, :5]), mutable=["cache"])
    y1, _ = dec.apply({"params": params, **upd}, jnp.asarray(x[:, 5:]), mask=mask, positions=jnp.asarray(pos[:, 5:]),
                      mutable=["cache"])
    got = np.concatenate([np.asarray(y0), np.asarray(y1)], 1)
    np.testing.assert_allclose(got[keep], ref[keep], atol=ATOL)  # padded query rows attend to nothing


def test_rotary_refuses_cross_attention():
    mha = MultiHeadAttention(H, rope_theta=10000.0)
    with pytest.raises(ValueError, match="rope_theta"):
        mha.init(jax.random.PRNGKey(0), jnp.zeros((1, 3, E)), jnp.zeros((1, 4, E)))

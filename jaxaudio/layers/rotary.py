"""Rotary position embeddings (RoPE) in Hugging Face's rotate-half layout.

LLaMA checkpoints converted from Hugging Face have their q/k projection rows permuted
so that each rotated pair is `(i, i + head_dim / 2)`, not `(2i, 2i + 1)` as in Meta's
original code; the rotation here must use the same pairing or the converted weights
attend to the wrong positions.
"""
import jax
import jax.numpy as jnp


def rotary_inv_freq(head_dim: int, theta: float) -> jax.Array:
    """`[head_dim // 2]` inverse frequencies `1 / theta**(2i / head_dim)`, float32."""
    if head_dim % 2:
        raise ValueError(f"rotary embeddings need an even head_dim, got {head_dim}")
    exponents = jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim
    return 1.0 / (jnp.float32(theta) ** exponents)


def rotary_cos_sin(positions: jax.Array, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
    """cos and sin `[batch, len, head_dim]` (float32) for integer `positions [batch, len]`;
    each frequency appears twice, once per half."""
    freqs = positions.astype(jnp.float32)[..., None] * rotary_inv_freq(head_dim, theta)
    # cos and sin before the concatenation, not after (the same values): XLA's CPU backend
    # fuses cheap cos/sin into every consumer, and the consumers broadcast over heads, so
    # each q and k rotation in every layer would evaluate them per head again (3% of
    # LLaMA-134M's forward). A concatenation along the minor axis is never fused into its
    # consumers, so this way they are computed once per forward.
    cos, sin = jnp.cos(freqs), jnp.sin(freqs)
    return jnp.concatenate([cos, cos], axis=-1), jnp.concatenate([sin, sin], axis=-1)


def rotate_half(x: jax.Array) -> jax.Array:
    """`[x1, x2] -> [-x2, x1]` over the last axis."""
    x1, x2 = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([-x2, x1], axis=-1)


def apply_rotary(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
    """Rotate `x [batch, len, heads, head_dim]` by `positions [batch, len]`.

    The rotation runs in float32 (bf16 angles lose whole positions past a few hundred
    tokens); the result has `x`'s dtype.
    """
    cos, sin = rotary_cos_sin(positions, x.shape[-1], theta)
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]  # broadcast over heads
    xf = x.astype(jnp.float32)
    return (xf * cos + rotate_half(xf) * sin).astype(x.dtype)

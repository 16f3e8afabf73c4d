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
    angles = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


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

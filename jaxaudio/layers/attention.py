"""The one attention implementation shared by every model.

`MultiHeadAttention` projects queries, keys and values (fused like timm's `qkv`, or as
separate `query`/`key`/`value` like Hugging Face), calls `jax.nn.dot_product_attention`
(XLA everywhere, cuDNN flash attention on GPU when `implementation="cudnn"`; on CPU, long
sequences go through `chunked_attention`), and
projects back. It takes a boolean mask, an additive bias (relative positions), grouped
key/value heads, cross-attention context, rotary position embeddings (`rope_theta`),
dropout on the attention probabilities (BERT's `attention_probs_dropout_prob`) and an
autoregressive KV cache (`decode=True`).
"""
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxaudio.layers.dense import dense
from jaxaudio.layers.rotary import apply_rotary


# On CPU, XLA's attention over long sequences is bound by the `[heads, q, kv]` logits going
# through memory: for Whisper's 1500 frames, computing them for 128 queries at a time is
# 2.7x faster (175 -> 66 ms per layer on 2 cores), with the same result bit for bit.
CPU_CHUNK_MIN_LEN = 512
CHUNK_LEN = 128


def _chunk_rows(x: jax.Array | None, q_len: int, chunks: int, chunk: int) -> jax.Array | None:
    """`[..., q_len or 1, kv]` mask/bias -> `[chunks, ..., chunk or 1, kv]` row blocks."""
    if x is None or x.ndim < 2 or x.shape[-2] == 1:
        return None if x is None else jnp.broadcast_to(x, (chunks,) + x.shape)
    pad = [(0, 0)] * x.ndim
    pad[-2] = (0, chunks * chunk - q_len)
    x = jnp.pad(x, pad).reshape(x.shape[:-2] + (chunks, chunk, x.shape[-1]))
    return jnp.moveaxis(x, -3, 0)


def chunked_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, mask: jax.Array | None = None,
                      bias: jax.Array | None = None, is_causal: bool = False, chunk: int = CHUNK_LEN
                      ) -> jax.Array:
    """`dot_product_attention` computed for `chunk` queries at a time (`lax.map`), heads-major.

    Every query row still sees all keys in one exact softmax (no online rescaling), so the
    result equals the unchunked one; only the `[batch, heads, chunk, kv_len]` logits of one
    block exist at a time, which keeps them in cache on CPU. Shapes, mask (True = attend,
    a fully masked row attends uniformly, as XLA's) and bias as `dot_product_attention`;
    `is_causal` aligns the triangle top-left, as `jax.nn.dot_product_attention`.
    """
    batch, q_len, heads, head_dim = q.shape
    kv_len, groups = k.shape[1], heads // k.shape[2]
    chunks = -(-q_len // chunk)
    k, v = (jnp.repeat(x, groups, axis=2).transpose(0, 2, 1, 3) for x in (k, v))  # [b, h, kv, d]
    qc = jnp.pad(q, ((0, 0), (0, chunks * chunk - q_len), (0, 0), (0, 0)))
    qc = qc.reshape(batch, chunks, chunk, heads, head_dim).transpose(1, 0, 3, 2, 4)  # [n, b, h, c, d]
    scale = 1.0 / jnp.sqrt(jnp.float32(head_dim))

    def block(xs):
        qb, mask_b, bias_b, start = xs
        logits = jnp.einsum("bhqd,bhkd->bhqk", qb, k).astype(jnp.float32) * scale
        if bias_b is not None:
            logits = logits + bias_b.astype(jnp.float32)
        keep = mask_b
        if is_causal:
            causal = (start + jnp.arange(chunk))[:, None] >= jnp.arange(kv_len)[None, :]
            keep = causal if keep is None else jnp.logical_and(keep, causal)
        if keep is not None:
            logits = jnp.where(keep, logits, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
        return jnp.einsum("bhqk,bhkd->bhqd", probs, v)

    starts = jnp.arange(chunks) * chunk
    out = jax.lax.map(block, (qc, _chunk_rows(mask, q_len, chunks, chunk),
                              _chunk_rows(bias, q_len, chunks, chunk), starts))  # [n, b, h, c, d]
    return out.transpose(1, 0, 3, 2, 4).reshape(batch, chunks * chunk, heads, head_dim)[:, :q_len]


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, mask: jax.Array | None = None,
                          bias: jax.Array | None = None, is_causal: bool = False,
                          implementation: str | None = None, dropout_rate: float = 0.0,
                          dropout_rng: jax.Array | None = None) -> jax.Array:
    """Scaled dot-product attention.

    q `[batch, q_len, heads, head_dim]`, k/v `[batch, kv_len, kv_heads, head_dim]` with
    `heads % kv_heads == 0`; mask (True = attend) and bias broadcast to
    `[batch, heads, q_len, kv_len]`. Returns `[batch, q_len, heads, head_dim]`.
    With `dropout_rng`, the probabilities are dropped at `dropout_rate` (training only;
    `jax.nn.dot_product_attention` has no dropout, so this path spells the softmax out).
    """
    if dropout_rng is None or dropout_rate == 0.0:
        if implementation is None and jax.default_backend() == "cpu" and q.shape[1] >= CPU_CHUNK_MIN_LEN:
            implementation = "chunked"
        if implementation == "chunked":
            return chunked_attention(q, k, v, mask=mask, bias=bias, is_causal=is_causal)
        return jax.nn.dot_product_attention(q, k, v, bias=bias, mask=mask, is_causal=is_causal,
                                            implementation=implementation)
    groups = q.shape[2] // k.shape[2]
    k, v = jnp.repeat(k, groups, axis=2), jnp.repeat(v, groups, axis=2)
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) / jnp.sqrt(q.shape[-1]).astype(jnp.float32)
    if bias is not None:
        logits = logits + bias.astype(jnp.float32)
    if is_causal:
        causal = jnp.tril(jnp.ones((q.shape[1], k.shape[1]), bool))
        mask = causal if mask is None else jnp.logical_and(mask, causal)
    if mask is not None:
        logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1)
    keep = jax.random.bernoulli(dropout_rng, 1.0 - dropout_rate, probs.shape)
    probs = jnp.where(keep, probs / (1.0 - dropout_rate), 0.0).astype(v.dtype)
    return jnp.einsum("bhqk,bkhd->bqhd", probs, v)


class MultiHeadAttention(nn.Module):
    """Multi-head attention over `x [batch, q_len, embed]`.

    With `context [batch, kv_len, ctx_embed]` it is cross-attention. With `decode=True`
    keys and values are appended to a cache (collection `cache`) whose length is set by
    the input length at `init`; each call may add one or more tokens. The caller keeps
    the total within that length (`generate` stops there): past it, XLA's
    `dynamic_update_slice` would clamp the write onto the last slots.

    With `rope_theta` set, queries and keys are rotated (rotate-half RoPE) by
    `positions [batch, q_len]` before the keys enter the cache, so cached keys keep their
    own positions. Without `positions` they count from 0, or, when decoding, from the
    cache index (right for unpadded or right-padded prompts; left-padded ones pass
    positions that skip the padding).
    """
    num_heads: int
    head_dim: int | None = None
    num_kv_heads: int | None = None
    fused_qkv: bool = False
    use_bias: bool = True
    key_bias: bool | None = None  # None: as use_bias (Whisper's k_proj has none)
    rope_theta: float | None = None  # None: no rotary embeddings
    out_features: int | None = None
    dropout_rate: float = 0.0  # on the attention probabilities, when deterministic=False
    decode: bool = False
    implementation: str | None = None
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array | None = None, *, mask: jax.Array | None = None,
                 bias: jax.Array | None = None, is_causal: bool = False,
                 positions: jax.Array | None = None, deterministic: bool = True,
                 bias_fn: Callable[[jax.Array], jax.Array] | None = None) -> jax.Array:
        """`bias_fn(q)`, given the projected queries `[batch, q_len, heads, head_dim]` (before
        scaling), returns an extra additive bias (BEATs' query-gated relative positions)."""
        embed = x.shape[-1]
        head_dim = self.head_dim or embed // self.num_heads
        kv_heads = self.num_kv_heads or self.num_heads
        kw = dict(use_bias=self.use_bias, dtype=self.dtype, param_dtype=self.param_dtype)
        if self.fused_qkv:
            if context is not None or kv_heads != self.num_heads:
                raise ValueError("fused_qkv supports self-attention with as many kv heads as heads")
            qkv = dense((3, self.num_heads, head_dim), ("embed", "qkv", "heads", "kv"), name="qkv", **kw)(x)
            q, k, v = qkv[..., 0, :, :], qkv[..., 1, :, :], qkv[..., 2, :, :]
        else:
            src = x if context is None else context
            q = dense((self.num_heads, head_dim), ("embed", "heads", "kv"), name="query", **kw)(x)
            k_kw = kw if self.key_bias is None else {**kw, "use_bias": self.key_bias}
            k = dense((kv_heads, head_dim), ("embed", "heads", "kv"), name="key", **k_kw)(src)
            v = dense((kv_heads, head_dim), ("embed", "heads", "kv"), name="value", **kw)(src)
        if self.rope_theta is not None:
            if context is not None:
                raise ValueError("rotary embeddings (rope_theta) need self-attention, not a context")
            if positions is None:
                positions = self._default_positions(x.shape[0], x.shape[1])
            q = apply_rotary(q, positions, self.rope_theta)
            k = apply_rotary(k, positions, self.rope_theta)
        if bias_fn is not None:
            extra = bias_fn(q)
            bias = extra if bias is None else bias + extra
        if self.decode:
            k, v, mask = self._update_cache(k, v, mask)
            is_causal = False  # the cache mask already encodes causality
        dropout_rng = None
        if self.dropout_rate > 0.0 and not deterministic:
            dropout_rng = self.make_rng("dropout")
        out = dot_product_attention(q, k, v, mask=mask, bias=bias, is_causal=is_causal,
                                    implementation=self.implementation, dropout_rate=self.dropout_rate,
                                    dropout_rng=dropout_rng)
        return dense(self.out_features or embed, ("heads", "kv", "embed"), axis=(-2, -1), name="out", **kw)(out)

    def _default_positions(self, batch: int, length: int) -> jax.Array:
        """`[batch, length]`: 0.. for a full pass; from the cache index when decoding."""
        start = 0
        if self.decode and self.has_variable("cache", "cache_index"):
            start = self.get_variable("cache", "cache_index")
        return jnp.broadcast_to(start + jnp.arange(length, dtype=jnp.int32), (batch, length))

    def _update_cache(self, k, v, mask):
        """Write k/v at the cache index; return the whole cache and a causal mask over it."""
        # Names differ from the `key`/`value` projections, which share this scope.
        initialized = self.has_variable("cache", "cached_key")
        ck = self.variable("cache", "cached_key", jnp.zeros, k.shape, k.dtype)
        cv = self.variable("cache", "cached_value", jnp.zeros, v.shape, v.dtype)
        index = self.variable("cache", "cache_index", lambda: jnp.array(0, jnp.int32))
        if not initialized:  # init only sizes the cache
            return k, v, mask
        step = k.shape[1]
        start = index.value
        ck.value = jax.lax.dynamic_update_slice_in_dim(ck.value, k.astype(ck.value.dtype), start, axis=1)
        cv.value = jax.lax.dynamic_update_slice_in_dim(cv.value, v.astype(cv.value.dtype), start, axis=1)
        index.value = start + step
        q_pos = start + jnp.arange(step)
        k_pos = jnp.arange(ck.value.shape[1])
        causal = (k_pos[None, :] <= q_pos[:, None])[None, None]
        mask = causal if mask is None else jnp.logical_and(mask, causal)
        return ck.value, cv.value, mask

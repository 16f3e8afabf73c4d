"""The one attention implementation shared by every model.

`MultiHeadAttention` projects queries, keys and values (fused like timm's `qkv`, or as
separate `query`/`key`/`value` like Hugging Face), calls `dot_product_attention` (on CPU
the C++ kernel of `cpu_kernel` unless there is a bias or dropout, our `blocked_attention` for the
rest, both faster there; elsewhere `jax.nn.dot_product_attention`, with cuDNN flash
attention on GPU when `implementation="cudnn"`), and projects back. It takes a
boolean mask, an additive bias (relative positions), grouped key/value heads,
cross-attention context, rotary position embeddings (`rope_theta`), dropout on the
attention probabilities (BERT's `attention_probs_dropout_prob`) and an autoregressive KV
cache (`decode=True`).
"""
import functools
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxaudio.layers import cpu_kernel
from jaxaudio.layers.dense import dense
from jaxaudio.layers.platform import target_platform
from jaxaudio.layers.rotary import apply_rotary


# On CPU, `jax.nn.dot_product_attention` leaves speed on the table; `blocked_attention` does
# the same sum with three changes, measured on 2 cores against it:
# - heads-major operands (`[batch, heads, len, dim]`) for both batched matmuls: BERT-base
#   shapes 11 -> 5.5 ms per layer, LLaMA (4 x 256, causal) 28 -> 16 ms;
# - queries scaled before `q k^T` and rows normalised after `p v` (the flash-attention
#   order), which drops two passes over the `[heads, q, kv]` logits;
# - queries in blocks (a `fori_loop`) when the `[batch, heads, q, kv]` logits would pass
#   `CPU_LOGITS_BUDGET` elements, so only one block's logits exist at a time: Whisper-small
#   (1500 frames, 12 heads) 280 -> ~90 ms per layer, BEATs (4 x 496 tokens with a bias)
#   -15% for the whole forward.
# Each query row still takes one exact softmax over all keys: no online rescaling.
CPU_LOGITS_BUDGET = 1 << 22  # 16 MiB of float32 logits per block
MIN_CHUNK, MAX_CHUNK = 64, 256  # blocks of 320 or more queries were slower for Whisper


def cpu_chunk(batch: int, heads: int, q_len: int, kv_len: int) -> int:
    """Queries per block on CPU: all of them while the logits fit `CPU_LOGITS_BUDGET`, else
    the most that fit, in multiples of `MIN_CHUNK` between `MIN_CHUNK` and `MAX_CHUNK`."""
    rows = CPU_LOGITS_BUDGET // (batch * heads * kv_len)
    return q_len if rows >= q_len else min(MAX_CHUNK, max(MIN_CHUNK, rows // MIN_CHUNK * MIN_CHUNK))


def _rows(x: jax.Array | None, start: jax.Array, chunk: int) -> jax.Array | None:
    """Rows `start:start + chunk` of a `[..., q_len or 1, kv]` mask/bias (broadcast rows stay)."""
    if x is None or x.ndim < 2 or x.shape[-2] == 1:
        return x
    return jax.lax.dynamic_slice_in_dim(x, start, chunk, axis=x.ndim - 2)


def blocked_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, mask: jax.Array | None = None,
                      bias: jax.Array | None = None, is_causal: bool = False, chunk: int | None = None,
                      dropout_rate: float = 0.0, dropout_rng: jax.Array | None = None) -> jax.Array:
    """Attention spelled out in XLA ops, heads-major, queries in blocks (see the note above).

    Shapes, mask (True = attend; a fully masked row attends uniformly, as XLA's) and bias
    as `dot_product_attention`; `is_causal` aligns the triangle top-left, as
    `jax.nn.dot_product_attention`. With `chunk`, queries go `chunk` at a time (the last
    block ends at the last query, overlapping the one before); without it, `cpu_chunk`'s
    on CPU and one block elsewhere. Logits and softmax are float32.
    With `dropout_rng`, each probability is dropped at `dropout_rate` and the kept ones
    scaled by `1 / (1 - dropout_rate)`, as `torch.nn.Dropout` on the probabilities.
    """
    batch, q_len, heads, head_dim = q.shape
    kv_len, groups = k.shape[1], heads // k.shape[2]
    if chunk is None:
        chunk = cpu_chunk(batch, heads, q_len, kv_len) if target_platform() == "cpu" else q_len
    chunk = min(chunk, q_len)
    chunks = -(-q_len // chunk)
    k, v = (jnp.repeat(x, groups, axis=2).transpose(0, 2, 1, 3) for x in (k, v))  # [b, h, kv, d]
    q = q * jnp.asarray(1.0 / jnp.sqrt(jnp.float32(head_dim)), q.dtype)
    drop = dropout_rng is not None and dropout_rate > 0.0

    def block(qb, mask_b, bias_b, start):
        """qb `[b, h, c, d]` -> `[b, h, c, d]`."""
        logits = jnp.einsum("bhqd,bhkd->bhqk", qb, k).astype(jnp.float32)
        if bias_b is not None:
            logits = logits + bias_b.astype(jnp.float32)
        keep = mask_b
        if is_causal:
            causal = (start + jnp.arange(qb.shape[2]))[:, None] >= jnp.arange(kv_len)[None, :]
            keep = causal if keep is None else jnp.logical_and(keep, causal)
        if keep is not None:
            logits = jnp.where(keep, logits, jnp.finfo(jnp.float32).min)
        unnormalized = jnp.exp(logits - jax.lax.stop_gradient(logits.max(-1, keepdims=True)))
        total = unnormalized.sum(-1, keepdims=True)
        if drop:  # normalised first, as torch: a row with one key then gets exactly no gradient
            kept = jax.random.bernoulli(jax.random.fold_in(dropout_rng, start), 1.0 - dropout_rate,
                                        unnormalized.shape)
            probs = jnp.where(kept, unnormalized / total / (1.0 - dropout_rate), 0.0)
            return jnp.einsum("bhqk,bhkd->bhqd", probs.astype(v.dtype), v)
        out = jnp.einsum("bhqk,bhkd->bhqd", unnormalized.astype(v.dtype), v)
        return (out / total).astype(v.dtype)

    q = q.transpose(0, 2, 1, 3)  # [b, h, q, d]
    if chunks == 1:
        return block(q, mask, bias, 0).transpose(0, 2, 1, 3)

    def step(i, out):
        # The last block ends at the last query (overlapping the one before) rather than
        # padding q, mask and bias to whole blocks: no copies of the `[.., q, kv]` bias.
        start = jnp.minimum(i * chunk, q_len - chunk)
        qb = jax.lax.dynamic_slice_in_dim(q, start, chunk, axis=2)
        ob = block(qb, _rows(mask, start, chunk), _rows(bias, start, chunk), start)
        return jax.lax.dynamic_update_slice_in_dim(out, ob, start, axis=2)
    out = jax.lax.fori_loop(0, chunks, step, jnp.zeros_like(q, dtype=v.dtype))
    return out.transpose(0, 2, 1, 3)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def kernel_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None = None,
                     is_causal: bool = False) -> jax.Array:
    """Attention by the C++ CPU kernel (`cpu_kernel`), shapes and mask as
    `dot_product_attention`. Under differentiation the forward runs `blocked_attention`
    instead and its own backward follows, so training pays no recomputation."""
    return cpu_kernel.attention(q, k, v, mask, is_causal)


def _kernel_attention_fwd(q, k, v, mask, is_causal):
    # The vjp closure is a pytree of arrays, so it can be the residuals.
    return jax.vjp(functools.partial(blocked_attention, mask=mask, is_causal=is_causal), q, k, v)


kernel_attention.defvjp(_kernel_attention_fwd, lambda is_causal, vjp, g: (*vjp(g), None))  # no mask cotangent


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, mask: jax.Array | None = None,
                          bias: jax.Array | None = None, is_causal: bool = False,
                          implementation: str | None = None, dropout_rate: float = 0.0,
                          dropout_rng: jax.Array | None = None) -> jax.Array:
    """Scaled dot-product attention.

    q `[batch, q_len, heads, head_dim]`, k/v `[batch, kv_len, kv_heads, head_dim]` with
    `heads % kv_heads == 0`; mask (True = attend) and bias broadcast to
    `[batch, heads, q_len, kv_len]`. Returns `[batch, q_len, heads, head_dim]`.
    `implementation`: None (CPU: `kernel_attention` when there is no bias or dropout and
    the kernel builds, else `blocked_attention`; elsewhere
    `jax.nn.dot_product_attention` with XLA's choice), "cpu_kernel", "blocked", or any of
    `jax.nn.dot_product_attention`'s ("xla", "cudnn"). With `dropout_rng`, the probabilities are dropped at `dropout_rate` (training
    only; `jax.nn.dot_product_attention` has no dropout, so that always takes the blocked path).
    """
    dropout = dropout_rng is not None and dropout_rate > 0.0
    if implementation is None and target_platform() == "cpu":
        implementation = "blocked"
        if bias is None and not dropout and cpu_kernel.supports(q, k, v, mask) and cpu_kernel.available():
            implementation = "cpu_kernel"
    if implementation == "cpu_kernel":
        if bias is not None or dropout:
            raise ValueError("implementation='cpu_kernel' takes no additive bias and no dropout; "
                             "use 'blocked' (or None, which chooses) for those")
        return kernel_attention(q, k, v, mask, is_causal)
    if implementation == "blocked" or dropout:
        return blocked_attention(q, k, v, mask=mask, bias=bias, is_causal=is_causal,
                                 dropout_rate=dropout_rate, dropout_rng=dropout_rng)
    return jax.nn.dot_product_attention(q, k, v, bias=bias, mask=mask, is_causal=is_causal,
                                        implementation=implementation)


class MultiHeadAttention(nn.Module):
    """Multi-head attention over `x [batch, q_len, embed]`.

    With `context [batch, kv_len, ctx_embed]` it is cross-attention. With `decode=True`
    keys and values are appended to a cache (collection `cache`) whose length is set by
    the input length at `init`; each call may add one or more tokens. The caller keeps
    the total within that length (`generate` stops there): past it, XLA's
    `dynamic_update_slice` would clamp the write onto the last slots. A scanned stack of
    layers passes its cache in instead (`stacked_cache`, see `__call__`).

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
                 bias_fn: Callable[[jax.Array], jax.Array] | None = None,
                 stacked_cache: tuple | None = None):
        """`bias_fn(q)`, given the projected queries `[batch, q_len, heads, head_dim]` (before
        scaling), returns an extra additive bias (BEATs' query-gated relative positions).

        `stacked_cache = (keys, values, layer, start)`: the KV cache of a whole scanned stack
        (`[layers, batch, cache_len, kv_heads, head_dim]` each), which this call writes at
        `[layer, :, start:]` and attends over; returns `(output, (keys, values))`. Carried
        through the layer scan, the stack is updated in place; as per-layer `cache`
        variables the scan would read one stack and write another (twice the cache)."""
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
        if stacked_cache is not None:
            k, v, mask, stacked_cache = _write_stacked(k, v, mask, *stacked_cache, self.is_initializing())
            is_causal = False
        elif self.decode:
            k, v, mask = self._update_cache(k, v, mask)
            is_causal = False  # the cache mask already encodes causality
        dropout_rng = None
        if self.dropout_rate > 0.0 and not deterministic:
            dropout_rng = self.make_rng("dropout")
        out = dot_product_attention(q, k, v, mask=mask, bias=bias, is_causal=is_causal,
                                    implementation=self.implementation, dropout_rate=self.dropout_rate,
                                    dropout_rng=dropout_rng)
        out = dense(self.out_features or embed, ("heads", "kv", "embed"), axis=(-2, -1), name="out", **kw)(out)
        return out if stacked_cache is None else (out, stacked_cache)

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
        return ck.value, cv.value, _causal_cache_mask(mask, start, step, ck.value.shape[1])


def _causal_cache_mask(mask, start, step: int, cache_len: int):
    """`mask` and'ed with causality for queries at cache slots `start..start + step`."""
    q_pos = start + jnp.arange(step)
    causal = (jnp.arange(cache_len)[None, :] <= q_pos[:, None])[None, None]
    return causal if mask is None else jnp.logical_and(mask, causal)


def _write_stacked(k, v, mask, keys, values, layer, start, initializing: bool):
    """Write `k`, `v [batch, step, kv_heads, head_dim]` into layer `layer` of the stacked
    cache at slot `start`; `(this layer's keys, values, the causal mask, (keys, values))`.
    At init (which only sizes caches) nothing is written."""
    if initializing:
        return k, v, mask, (keys, values)
    step, at = k.shape[1], (layer, 0, start, 0, 0)
    keys = jax.lax.dynamic_update_slice(keys, k[None].astype(keys.dtype), at)
    values = jax.lax.dynamic_update_slice(values, v[None].astype(values.dtype), at)
    k = jax.lax.dynamic_index_in_dim(keys, layer, 0, keepdims=False)
    v = jax.lax.dynamic_index_in_dim(values, layer, 0, keepdims=False)
    return k, v, _causal_cache_mask(mask, start, step, keys.shape[2]), (keys, values)

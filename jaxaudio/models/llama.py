"""LLaMA / Vicuna (Hugging Face `LlamaForCausalLM`) in Flax Linen.

  input_ids [batch, len] -> embed_tokens, or inputs_embeds [batch, len, hidden]
  -> num_hidden_layers x pre-RMSNorm blocks:
       x + attn(input_layernorm(x))          rotary q/k, grouped kv heads, no biases
       x + mlp(post_attention_layernorm(x))  down(silu(gate(x)) * up(x))
  -> norm -> lm_head (embed_tokens transposed when tied) -> logits [batch, len, vocab] float32

Module paths (`layers_3/attn/query`, `layers_3/mlp/gate`, ...) are what LoRA targets
match, so they are part of the interface. With `scan_layers=True` the blocks run under
`nn.scan` as one module `layers` whose parameters have a leading layer axis
(`layers/attn/query/kernel [layers, embed, heads, head_dim]`): compiled once instead of
once per layer (`jaxaudio.layers.scan`; either layout loads into either model). With
`decode=True` every attention layer keeps a KV cache (collection `cache`) sized at
`init`; `jaxaudio.generate` drives it. A scanned stack keeps one cache for all its layers
(`kv_cache/cached_key [layers, batch, len, kv_heads, head_dim]`), carried through the
layer scan and written in place: as per-layer variables of the scan it was read from one
stack and written to another, twice the cache (SALMONN-13B's beam-4 decode on one v5e
chip: XLA needed 16.60 GiB; with the carried cache see README "Will it fit?").
"""
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from jaxaudio.layers.attention import MultiHeadAttention
from jaxaudio.layers.dense import Dense, dense
from jaxaudio.layers.norms import RMSNorm
from jaxaudio.layers.partitioning import constrain, param
from jaxaudio.layers.remat import remat_block
from jaxaudio.layers.scan import scanned_block

ACT = ("act_batch", "act_length", "act_embed")


class SwiGLU(nn.Module):
    """`[..., embed] -> [..., embed]`: `down(silu(gate(x)) * up(x))`."""
    intermediate_size: int
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = dict(use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype)
        gate = dense(self.intermediate_size, ("embed", "mlp"), name="gate", **kw)(x)
        up = dense(self.intermediate_size, ("embed", "mlp"), name="up", **kw)(x)
        return dense(x.shape[-1], ("mlp", "embed"), name="down", **kw)(nn.silu(gate) * up)


class LlamaBlock(nn.Module):
    """One decoder layer: `x [batch, len, embed]` -> same shape.

    `mask` (key padding, True = attend) broadcasts to `[batch, heads, len, kv_len]`;
    causality comes from the attention (or its cache). `positions [batch, len]` are the
    rotary positions.
    """
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    rms_norm_eps: float
    rope_theta: float
    decode: bool = False
    attention_impl: str | None = None
    scanned: bool = False  # under nn.scan: return (x, None), the carry and no per-layer output
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, mask: jax.Array | None, positions: jax.Array | None, start: jax.Array | None = None):
        """Scanned and decoding, the carry `x` is `(x, keys, values, layer)`: the stack's KV
        cache goes through the scan with the activations (`MultiHeadAttention`'s
        `stacked_cache`), written at slot `start`."""
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        stacked = self.scanned and self.decode
        if stacked:
            x, keys, values, layer = x
        x = constrain(x, ACT)
        h = RMSNorm(self.rms_norm_eps, name="input_layernorm", **kw)(x)
        attn = MultiHeadAttention(self.num_heads, head_dim=self.head_dim, num_kv_heads=self.num_kv_heads,
                                  use_bias=False, rope_theta=self.rope_theta, decode=self.decode and not stacked,
                                  implementation=self.attention_impl, name="attn", **kw)
        if stacked:
            h, (keys, values) = attn(h, mask=mask, positions=positions, is_causal=True,
                                     stacked_cache=(keys, values, layer, start))
        else:
            h = attn(h, mask=mask, positions=positions, is_causal=True)
        x = x + h
        h = RMSNorm(self.rms_norm_eps, name="post_attention_layernorm", **kw)(x)
        x = x + SwiGLU(self.intermediate_size, name="mlp", **kw)(h)
        x = constrain(x, ACT)
        if stacked:
            return (x, keys, values, layer + 1), None
        return (x, None) if self.scanned else x


class StackedKVCache(nn.Module):
    """A scanned stack's decoding cache (collection `cache`): keys and values
    `[layers, batch, cache_len, kv_heads, head_dim]`, sized by the input at `init`."""
    layers: int
    kv_heads: int
    head_dim: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, batch: int, length: int, update: tuple | None = None) -> tuple[jax.Array, jax.Array]:
        shape = (self.layers, batch, length, self.kv_heads, self.head_dim)
        keys = self.variable("cache", "cached_key", jnp.zeros, shape, self.dtype)
        values = self.variable("cache", "cached_value", jnp.zeros, shape, self.dtype)
        if update is not None:
            keys.value, values.value = update
        return keys.value, values.value


class Llama(nn.Module):
    """LLaMA causal language model; fields mirror Hugging Face's `LlamaConfig`.

    `__call__(input_ids [batch, len] | inputs_embeds [batch, len, hidden], attention_mask
    [batch, len] (1 = token, 0 = padding, left or right), positions [batch, len])` ->
    logits `[batch, len, vocab]` float32 (or `(logits, hidden [batch, len, hidden])` with
    `return_hidden=True`). Positions default to `cumsum(mask) - 1` (0 on padding), as
    HF's `generate` makes them; HF's plain forward counts 0.. across left padding instead,
    which changes nothing without padding.

    With `decode=True`, `attention_mask` covers the whole cache `[batch, cache_len]`, and
    the call writes its tokens at the cache index; default positions then continue the
    mask's count at that index.
    """
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None  # None: as num_attention_heads
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_position_embeddings: int = 2048  # informational: rotary positions have no table
    tie_word_embeddings: bool = False
    head_dim: int | None = None  # None: hidden_size // num_attention_heads
    remat: str | bool = "none"  # jaxaudio.layers.remat: none, full, dots, dots_no_batch (True = full)
    scan_layers: bool = False  # one compiled block for all layers (jaxaudio.layers.scan)
    decode: bool = False
    attention_impl: str | None = None
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    def setup(self):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.embed_tokens = nn.Embed(self.vocab_size, self.hidden_size,
                                     embedding_init=param(nn.initializers.normal(0.02), ("vocab", "embed")), **kw)
        # Decoding takes no gradient: nothing to save memory for.
        policy = "none" if self.decode else self.remat
        args = (self.num_attention_heads, self.num_key_value_heads or self.num_attention_heads,
                self.head_dim or self.hidden_size // self.num_attention_heads, self.intermediate_size,
                self.rms_norm_eps, self.rope_theta)
        block_kw = dict(decode=self.decode, attention_impl=self.attention_impl, **kw)
        if self.scan_layers:  # the attribute name makes it the module `layers` (scan.STACK)
            self.layers = scanned_block(LlamaBlock, self.num_hidden_layers, policy, n_broadcast=3,
                                        field="Llama.remat")(*args, scanned=True, **block_kw)
            if self.decode:
                self.kv_cache = StackedKVCache(self.num_hidden_layers, args[1], args[2], self.dtype)
        else:
            block = remat_block(LlamaBlock, policy, field="Llama.remat")
            self.layers = [block(*args, **block_kw) for _ in range(self.num_hidden_layers)]
        self.norm = RMSNorm(self.rms_norm_eps, **kw)
        if not self.tie_word_embeddings:
            # setup() names submodules by attribute, so `dense(..., name=)` cannot be used here.
            self.lm_head = Dense((self.vocab_size,), ("embed", "vocab"), use_bias=False, **kw)
        # Where the next tokens go in the cache; only under `decode`, and only where a cache
        # exists or is being made, so that `embed` still runs with parameters alone.
        if self.decode and (self.is_mutable_collection("cache") or self.has_variable("cache", "index")):
            self.cache_index = self.variable("cache", "index", lambda: jnp.array(0, jnp.int32))

    def embed(self, input_ids: jax.Array) -> jax.Array:
        """`[batch, len]` token ids -> `[batch, len, hidden]` (to build `inputs_embeds`)."""
        return self.embed_tokens(input_ids)

    def logits(self, hidden: jax.Array) -> jax.Array:
        """Final-norm hidden states `[..., hidden]` -> float32 logits `[..., vocab]`."""
        if self.tie_word_embeddings:
            return self.embed_tokens.attend(hidden).astype(jnp.float32)
        return self.lm_head(hidden).astype(jnp.float32)

    def __call__(self, input_ids: jax.Array | None = None, *, inputs_embeds: jax.Array | None = None,
                 attention_mask: jax.Array | None = None, positions: jax.Array | None = None,
                 deterministic: bool = True, return_hidden: bool = False, logits_to_keep: int = 0):
        """`deterministic` is accepted for the common model interface: LLaMA has no dropout.
        `logits_to_keep > 0` computes logits for the last that many positions only."""
        del deterministic
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Llama: pass exactly one of input_ids and inputs_embeds")
        x = self.embed(input_ids) if inputs_embeds is None else inputs_embeds.astype(self.dtype)
        mask, positions, start = self._mask_and_positions(attention_mask, positions, *x.shape[:2])
        if self.scan_layers and self.decode:
            keys, values = self.kv_cache(*x.shape[:2])
            (x, keys, values, _), _ = self.layers((x, keys, values, jnp.int32(0)), mask, positions, start)
            if not self.is_initializing():
                self.kv_cache(*x.shape[:2], update=(keys, values))
        elif self.scan_layers:
            x, _ = self.layers(x, mask, positions, None)
        else:
            for layer in self.layers:
                x = layer(x, mask, positions)
        hidden = self.norm(x)
        logits = self.logits(hidden[:, -logits_to_keep:] if logits_to_keep else hidden)
        return (logits, hidden) if return_hidden else logits

    def _mask_and_positions(self, attention_mask, positions, batch: int, length: int):
        """The key padding mask (`[batch, 1, 1, kv]`, True = attend), rotary positions, and
        the cache slot this call's tokens start at (0 without `decode`)."""
        start = 0
        if self.decode:  # this call's tokens go to cache slots start..start + length
            start = self.cache_index.value
            if not self.is_initializing():
                self.cache_index.value = start + length
        if attention_mask is None:
            if positions is None:
                positions = jnp.broadcast_to(start + jnp.arange(length, dtype=jnp.int32), (batch, length))
            return None, positions, start
        keep = attention_mask.astype(bool)
        if positions is None:
            positions = jax.lax.dynamic_slice_in_dim(positions_from_mask(keep), start, length, axis=1)
        return keep[:, None, None, :], positions, start


def positions_from_mask(keep: jax.Array) -> jax.Array:
    """Hugging Face's generation positions: `cumsum(mask) - 1`, and 0 on padding."""
    return jnp.where(keep, jnp.cumsum(keep, axis=-1, dtype=jnp.int32) - 1, 0)


def causal_lm_loss(logits: jax.Array, labels: jax.Array, ignore_index: int = -100) -> tuple[jax.Array, jax.Array]:
    """Next-token cross-entropy, Hugging Face's shift: logits at `t` predict `labels[t + 1]`.

    logits `[batch, len, vocab]`, labels `[batch, len]` (`ignore_index` where no loss, e.g.
    the prompt and padding). Returns `(mean loss over counted tokens, token count)`; the
    loss is 0 when no token counts (HF would give NaN).
    """
    logits = logits[:, :-1].astype(jnp.float32)
    targets = labels[:, 1:]
    valid = targets != ignore_index
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.where(valid, targets, 0))
    count = valid.sum()
    return jnp.sum(jnp.where(valid, ce, 0.0)) / jnp.maximum(count, 1), count

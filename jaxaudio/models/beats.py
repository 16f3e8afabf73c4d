"""BEATs (Chen et al., 2023), the audio encoder of SALMONN, in Flax Linen, as microsoft/unilm `beats/`.

  waveform [batch, samples] at 16 kHz (in [-1, 1]) and padding_mask [batch, samples] (True = pad)
  -> beats_fbank: x * 2**15, Kaldi fbank (128 bins, 25/10 ms, povey, pre-emphasis 0.97,
     dither 0, snip_edges), (x - 15.41663) / (2 * 6.55582)            [batch, frames, 128]
  -> Conv2d 1 -> embed_dim, kernel = stride = input_patch_size, tokens time-major
     (token = time_patch * 8 + freq_patch) -> LayerNorm               [batch, tokens, embed_dim]
  -> post_extract_proj (when embed_dim != encoder_embed_dim)          [batch, tokens, encoder_embed_dim]
  -> padded tokens zeroed; + GELU(weight-normed grouped Conv1d(conv_pos), last frame dropped)
  -> encoder LayerNorm (before the layers unless layer_norm_first)
  -> encoder_layers layers: post-LN DeepNorm (x * alpha + f(x), alpha = (2 L)^(1/4)) or
     pre-LN; attention with a bucketed relative position bias (computed once, from layer
     0's table), gated per layer and query from the projected query (`gru_rel_pos`)
  -> (layer_norm_first) final LayerNorm                               features
  -> (finetuned_model) predictor Linear, mean over unpadded tokens    logits [batch, classes]

The padding mask follows the original exactly, odd as it is: the sample mask is cut to a
multiple of the frame count and reduced with `all` over equal chunks (a chunk is
`samples // frames` samples, not the 160-sample hop), then the frame mask the same way
to tokens, as if tokens were a time sequence (they are time-major patches).
"""
import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxaudio.features.kaldi import kaldi_fbank
from jaxaudio.layers import MultiHeadAttention, PatchEmbed, constrain, dense, layer_norm, param, remat_block

FBANK_MEAN = 15.41663  # the BEATs recipe's AudioSet fbank statistics
FBANK_STD = 6.55582
NUM_MEL_BINS = 128
SAMPLE_RATE = 16000
EPS = 1e-5  # every LayerNorm of the original is PyTorch's default
ACT = ("act_batch", "act_length", "act_embed")

ACTIVATIONS = {
    "gelu": lambda x: nn.gelu(x.astype(jnp.float32), approximate=False).astype(x.dtype),  # fp32, as the original
    "gelu_accurate": lambda x: nn.gelu(x, approximate=True),
    "gelu_fast": lambda x: nn.gelu(x, approximate=True),
    "relu": nn.relu,
    "tanh": jnp.tanh,
    "linear": lambda x: x,
}


def reduce_padding_mask(mask: jax.Array, length: int) -> jax.Array:
    """The original's `forward_padding_mask`: `[batch, n] -> [batch, length]`; the last
    `n % length` entries are dropped, the rest split into `length` equal chunks, and a
    position is padding when its whole chunk is."""
    n = mask.shape[1]
    if n < length:
        raise ValueError(f"padding mask of {n} entries cannot be reduced to {length} positions")
    mask = mask[:, :n - n % length]
    return mask.reshape(mask.shape[0], length, -1).all(-1)


def beats_tokens(samples: int, input_patch_size: int = 16) -> int:
    """Tokens BEATs makes of `samples` (1496 for 30 s): whole patches of Kaldi frames x mel bands."""
    frames = 1 + (samples - 400) // 160 if samples >= 400 else 0
    return frames // input_patch_size * (NUM_MEL_BINS // input_patch_size)


def clip_token_padding(lengths: jax.Array, num_tokens: int, input_patch_size: int = 16) -> jax.Array:
    """`[batch]` real samples per clip -> `[batch, num_tokens]` True at the tokens of patches
    that reach past the clip: the exact token mask of a clip zero-padded at the end.

    With it, a padded clip's real tokens equal those of the clip run alone (the padding is
    zeroed before the positional conv and never attended to), which the original's coarser
    reduction of a sample mask (`reduce_padding_mask`) does not give.
    """
    frames = jnp.where(lengths >= 400, 1 + (lengths - 400) // 160, 0)  # Kaldi frames, snip_edges
    bands = NUM_MEL_BINS // input_patch_size
    return (jnp.arange(num_tokens)[None, :] // bands) >= (frames // input_patch_size)[:, None]


def beats_fbank(wave: jax.Array, padding_mask: jax.Array | None = None) -> tuple[jax.Array, jax.Array | None]:
    """`wave [batch, samples]` at 16 kHz -> normalised fbank `[batch, frames, 128]` (float32),
    frames = 1 + (samples - 400) // 160, and the frame padding mask `[batch, frames]`
    (None without `padding_mask [batch, samples]`, True = padding)."""
    fbank = kaldi_fbank(jnp.asarray(wave, jnp.float32) * 2.0 ** 15, sample_rate=SAMPLE_RATE,
                        num_mel_bins=NUM_MEL_BINS, frame_length_ms=25.0, frame_shift_ms=10.0)
    fbank = (fbank - FBANK_MEAN) / (2 * FBANK_STD)
    if padding_mask is None:
        return fbank, None
    return fbank, reduce_padding_mask(jnp.asarray(padding_mask, bool), fbank.shape[1])


def relative_position_buckets(length: int, num_buckets: int, max_distance: int) -> np.ndarray:
    """Bucket of `key - query` for every pair, int32 `[length, length]` (static, numpy).

    Bidirectional: half the buckets per sign (positive offsets take the upper half);
    within a half, distances below a quarter of the buckets are exact and the rest
    log-spaced up to `max_distance`, capped at the half's last bucket. The log runs in
    float32 and truncates, as the original's `torch.log(...).to(torch.long)`.
    """
    rel = np.arange(length)[None, :] - np.arange(length)[:, None]
    return offset_buckets(length, num_buckets, max_distance)[rel + length - 1]


def offset_buckets(length: int, num_buckets: int, max_distance: int) -> np.ndarray:
    """`relative_position_buckets` per offset: `[2 * length - 1]` for `key - query` =
    -(length - 1) .. length - 1. The model expands it inside the program, so a compiled
    program holds 2L numbers instead of an L x L table (9 MB at 30 s)."""
    rel = np.arange(-(length - 1), length)
    half = num_buckets // 2
    exact = half // 2
    dist = np.abs(rel)
    with np.errstate(divide="ignore"):
        scaled = (np.log(dist.astype(np.float32) / np.float32(exact))
                  / np.float32(math.log(max_distance / exact)) * np.float32(half - exact))
    large = exact + np.where(dist < exact, 0, scaled).astype(np.int64)
    large = np.minimum(large, half - 1)
    return ((rel > 0) * half + np.where(dist < exact, dist, large)).astype(np.int32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def grad_multiply(x: jax.Array, scale: float) -> jax.Array:
    """Identity whose gradient is scaled (fairseq's `GradMultiply`, layer-wise gradient decay)."""
    return x


def _grad_multiply_fwd(x, scale):
    return x, None


def _grad_multiply_bwd(scale, _, g):
    return (g * scale,)


grad_multiply.defvjp(_grad_multiply_fwd, _grad_multiply_bwd)


class BEATsLayer(nn.Module):
    """One encoder layer: `x [batch, tokens, embed]` -> same shape.

    `pos_bias [heads, tokens, tokens]` is the ungated relative position bias (None without
    relative positions); `mask [batch, 1, 1, tokens]` True where a key may be attended.
    """
    num_heads: int
    ffn_dim: int
    activation_fn: str = "gelu"
    layer_norm_first: bool = False
    deep_norm_alpha: float = 1.0
    gated_bias: bool = False  # gru_rel_pos with a relative position bias
    dropout: float = 0.0
    attention_dropout: float = 0.0
    activation_dropout: float = 0.0
    attention_impl: str | None = None
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array | None, pos_bias: jax.Array | None,
                 train: bool = False) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = constrain(x, ACT)
        attn = MultiHeadAttention(self.num_heads, dropout_rate=self.attention_dropout,
                                  implementation=self.attention_impl, name="self_attn", **kw)
        drop = nn.Dropout(self.dropout, deterministic=not train)
        residual = x
        h = layer_norm(EPS, name="self_attn_layer_norm", **kw)(x) if self.layer_norm_first else x
        bias, bias_fn = self._bias(pos_bias)
        h = attn(h, mask=mask, bias=bias, bias_fn=bias_fn, deterministic=not train)
        h = drop(h)
        if self.layer_norm_first:
            x = residual + h
            x = x + drop(self._ffn(layer_norm(EPS, name="final_layer_norm", **kw)(x), train))
        else:
            x = layer_norm(EPS, name="self_attn_layer_norm", **kw)(residual * self.deep_norm_alpha + h)
            x = layer_norm(EPS, name="final_layer_norm", **kw)(x * self.deep_norm_alpha + drop(self._ffn(x, train)))
        return constrain(x, ACT)

    def _ffn(self, x: jax.Array, train: bool) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = ACTIVATIONS[self.activation_fn](dense(self.ffn_dim, ("embed", "mlp"), name="fc1", **kw)(x))
        h = nn.Dropout(self.activation_dropout, deterministic=not train)(h)
        return dense(x.shape[-1], ("mlp", "embed"), name="fc2", **kw)(h)

    def _bias(self, pos_bias: jax.Array | None):
        """`(bias, bias_fn)` for the attention: the plain relative bias `[1, heads, tokens,
        tokens]`, or (gru_rel_pos) a function of the projected query that gates it per token."""
        if pos_bias is None:
            return None, None
        pos_bias = pos_bias[None].astype(self.dtype)
        if not self.gated_bias:
            return pos_bias, None
        # Made here, called inside the attention: the parameters stay this layer's.
        grep_linear = dense(8, ("kv", "qkv"), name="grep_linear", dtype=self.dtype, param_dtype=self.param_dtype)
        grep_a = self.param("grep_a", param(nn.initializers.ones, ("heads",)), (self.num_heads,),
                            self.param_dtype).astype(self.dtype)

        def gated(q: jax.Array) -> jax.Array:  # q [batch, tokens, heads, head_dim], unscaled
            # grep_linear maps each head's query to 8 numbers: two gates of 4 summed logits.
            g = grep_linear(q)
            g = jax.nn.sigmoid(g.reshape(*g.shape[:-1], 2, 4).sum(-1))  # [batch, tokens, heads, 2]
            factor = g[..., 0] * (g[..., 1] * grep_a - 1.0) + 2.0  # [batch, tokens, heads]
            return jnp.swapaxes(factor, 1, 2)[..., None] * pos_bias
        return None, gated


class BEATs(nn.Module):
    """`__call__(wave [batch, samples], padding_mask [batch, samples] | None, train, return_logits)`
    -> `(features [batch, tokens, encoder_embed_dim], token_padding_mask [batch, tokens])`, plus
    `logits [batch, predictor_class]` (float32; the original's `extract_features` returns
    their sigmoid) with `return_logits=True` on a fine-tuned model.

    `padding_mask` is True at padded samples; without it no token is padding. tokens =
    (frames // input_patch_size) * (128 // input_patch_size). Field names are the original
    `BEATsConfig`'s; defaults are the iter3+ AS2M fine-tuned checkpoint SALMONN uses.
    Training with dropout or `encoder_layerdrop` needs an rng `dropout`.
    """
    input_patch_size: int = 16
    embed_dim: int = 512
    conv_bias: bool = False
    encoder_layers: int = 12
    encoder_embed_dim: int = 768
    encoder_ffn_embed_dim: int = 3072
    encoder_attention_heads: int = 12
    activation_fn: str = "gelu"
    layer_wise_gradient_decay_ratio: float = 0.6
    layer_norm_first: bool = False
    deep_norm: bool = True
    dropout: float = 0.1
    attention_dropout: float = 0.1
    activation_dropout: float = 0.0
    encoder_layerdrop: float = 0.0
    dropout_input: float = 0.0
    conv_pos: int = 128
    conv_pos_groups: int = 16
    relative_position_embedding: bool = True
    num_buckets: int = 320
    max_distance: int = 800
    gru_rel_pos: bool = True
    finetuned_model: bool = True
    predictor_dropout: float = 0.1
    predictor_class: int = 527
    remat: str | bool = "none"  # jaxaudio.layers.remat: none, full, dots, dots_no_batch (True = full)
    attention_impl: str | None = None
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    def _check(self, wave: jax.Array, padding_mask: jax.Array | None, return_logits: bool) -> None:
        if wave.ndim != 2:
            raise ValueError(f"BEATs expects a waveform [batch, samples] at 16 kHz; got shape {wave.shape}")
        if padding_mask is not None and padding_mask.shape != wave.shape:
            raise ValueError(f"padding_mask {padding_mask.shape} must match the waveform {wave.shape}")
        if self.deep_norm and self.layer_norm_first:
            raise ValueError("deep_norm and layer_norm_first exclude each other (as in the original)")
        if self.activation_fn not in ACTIVATIONS:
            raise ValueError(f"activation_fn={self.activation_fn!r}: choose one of {sorted(ACTIVATIONS)}")
        if return_logits and not self.finetuned_model:
            raise ValueError("return_logits needs finetuned_model=True (the predictor)")
        if NUM_MEL_BINS % self.input_patch_size:
            raise ValueError(f"input_patch_size={self.input_patch_size} must divide {NUM_MEL_BINS} mel bins")
        min_samples = 400 + 160 * (self.input_patch_size - 1)
        if wave.shape[1] < min_samples:
            raise ValueError(f"BEATs needs at least {min_samples} samples ({self.input_patch_size} fbank frames); "
                             f"got {wave.shape[1]}")

    @nn.compact
    def __call__(self, wave: jax.Array, padding_mask: jax.Array | None = None, train: bool = False,
                 return_logits: bool = False, token_padding: jax.Array | None = None):
        """`token_padding [batch, tokens]` (True = padding; `clip_token_padding`) replaces the
        mask the original derives from `padding_mask`."""
        self._check(wave, padding_mask, return_logits)
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        p, dim, heads = self.input_patch_size, self.encoder_embed_dim, self.encoder_attention_heads
        fbank, frame_mask = beats_fbank(wave, padding_mask)

        x = PatchEmbed(self.embed_dim, p, ("conv_h", "conv_w", "conv_in", "conv_out"), use_bias=self.conv_bias,
                       name="patch_embedding", **kw)(fbank[..., None])
        batch, tokens = x.shape[0], x.shape[1] * x.shape[2]
        x = layer_norm(EPS, name="layer_norm", **kw)(x.reshape(batch, tokens, self.embed_dim))
        if token_padding is not None:
            if token_padding.shape != (batch, tokens):
                raise ValueError(f"BEATs: token_padding {token_padding.shape} must be [batch, tokens] = "
                                 f"{(batch, tokens)}")
            pad = token_padding.astype(bool)
        else:
            pad = (jnp.zeros((batch, tokens), bool) if frame_mask is None
                   else reduce_padding_mask(frame_mask, tokens))
        if self.embed_dim != dim:
            x = dense(dim, ("conv_out", "embed"), name="post_extract_proj", **kw)(x)
        x = nn.Dropout(self.dropout_input, deterministic=not train)(x)

        x = jnp.where(pad[..., None], 0, x)
        k = self.conv_pos
        conv = nn.Conv(dim, (k,), padding=[(k // 2, k // 2)], feature_group_count=self.conv_pos_groups,
                       name="pos_conv",
                       kernel_init=param(nn.initializers.normal(math.sqrt(4.0 / (k * dim))),
                                         ("conv_w", "conv_in", "embed")),
                       bias_init=param(nn.initializers.zeros, ("embed",)), **kw)(x)
        x = x + nn.gelu(conv[:, :tokens], approximate=False)  # SamePad: an even kernel yields one extra frame
        if not self.layer_norm_first:
            x = layer_norm(EPS, name="encoder_layer_norm", **kw)(x)
        x = nn.Dropout(self.dropout, deterministic=not train)(x)
        x = constrain(x, ACT)

        pos_bias = None
        if self.relative_position_embedding:
            table = self.param("relative_attention_bias", param(nn.initializers.normal(0.02), ("vocab", "heads")),
                               (self.num_buckets, heads), self.param_dtype)
            per_offset = table[offset_buckets(tokens, self.num_buckets, self.max_distance)]  # [2T - 1, heads]
            rel = jnp.arange(tokens)[None, :] - jnp.arange(tokens)[:, None] + (tokens - 1)
            pos_bias = jnp.transpose(per_offset[rel], (2, 0, 1))  # [heads, tokens, tokens]
        mask = None if frame_mask is None and token_padding is None else ~pad[:, None, None, :]
        layer_cls = remat_block(BEATsLayer, self.remat, static_argnums=(4,), field="BEATs.remat")
        alpha = math.pow(2 * self.encoder_layers, 0.25) if self.deep_norm else 1.0
        for i in range(self.encoder_layers):
            if self.layer_wise_gradient_decay_ratio != 1.0:
                x = grad_multiply(x, self.layer_wise_gradient_decay_ratio)
            y = layer_cls(heads, self.encoder_ffn_embed_dim, self.activation_fn, self.layer_norm_first, alpha,
                          self.gru_rel_pos and self.relative_position_embedding, self.dropout,
                          self.attention_dropout, self.activation_dropout, self.attention_impl,
                          name=f"layers_{i}", **kw)(x, mask, pos_bias, train)
            if train and self.encoder_layerdrop > 0.0:
                keep = jax.random.uniform(self.make_rng("dropout")) > self.encoder_layerdrop
                y = jnp.where(keep, y, x)
            x = y
        if self.layer_norm_first:
            x = layer_norm(EPS, name="encoder_layer_norm", **kw)(x)

        if not (self.finetuned_model and (return_logits or self.is_initializing())):
            return x, pad
        h = nn.Dropout(self.predictor_dropout, deterministic=not train)(x)
        per_token = dense(self.predictor_class, ("embed", "classes"), name="predictor", **kw)(h).astype(jnp.float32)
        keep = (~pad).astype(jnp.float32)[..., None]
        logits = jnp.sum(per_token * keep, axis=1) / jnp.sum(keep, axis=1)
        return (x, pad, logits) if return_logits else (x, pad)

"""CLAP (Wu et al., 2023; LAION-AI/CLAP): an HTSAT audio tower and a RoBERTa text tower in
one embedding space, as Hugging Face's `ClapModel` (reference/clap.md §1).

Audio (`HTSAT`, the Swin transformer of HTS-AT):

  input_features [batch, channels, frames, mel] dB log-mel (channels 1, or 4 with fusion:
  the whole clip shrunk, then three crops)
  -> BatchNorm over the mel bins (running statistics in `batch_stats`)
  -> reshape_mel2img: time resized (torch bicubic, align_corners) to spec_size * freq_ratio
     frames, then folded: freq_ratio blocks of frames stacked along frequency
     -> image [batch, spec_size, spec_size, channels]
  -> patch embed (4 x 4 / stride 4 conv as one matmul, LayerNorm); with fusion, rows with
     `is_longer` mix in the three crops (conv (4, 12) / stride (4, 12)) through an AFF block
  -> Swin stages: window attention (relative-position bias, shifted windows every second
     block), patch merging between stages
  -> LayerNorm -> mean over tokens: pooled [batch, hidden]

Text: `jaxaudio.models.bert.Bert` with RoBERTa's position ids (`pad + cumsum(not pad)`),
its pooler (tanh(dense(first token))). Each tower ends in a projection Linear-ReLU-Linear
and an L2 normalisation; the logits are cosine similarities times exp(logit_scale_{a,t}).
"""
import dataclasses
import json
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxaudio.features.resize import resize_axis
from jaxaudio.layers import (BatchNorm, DropPath, Mlp, MultiHeadAttention, PatchEmbed, constrain, dense, layer_norm,
                             param, remat_block)
from jaxaudio.models.audio_llm import part_kwargs
from jaxaudio.models.bert import Bert

# Sizes of the LAION checkpoints' audio towers (`create_htsat_model`); other fields default.
HTSAT_TINY = dict(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(4, 8, 16, 32))
HTSAT_BASE = dict(embed_dim=128, depths=(2, 2, 12, 2), num_heads=(4, 8, 16, 32))
# Activations at block boundaries: [batch, height, width, channels] of the Swin grid.
GRID = ("act_batch", "act_length", None, "act_embed")
TOKENS = ("act_batch", "act_length", "act_embed")
# HF / LAION fill masked (other shift region) logits with -100, not -inf; additive, kept as is.
SHIFT_MASK_VALUE = -100.0
# Every LayerNorm outside the Swin blocks (patch embed, patch merging, final) is nn.LayerNorm's default.
TORCH_LN_EPS = 1e-5


def relative_position_index(window: int) -> np.ndarray:
    """`[window**2, window**2]` int: the row of the bias table for each (query, key) pair of a
    window, as Swin's `relative_position_index` buffer (row-major (dh, dw), both offset)."""
    coords = np.stack(np.meshgrid(np.arange(window), np.arange(window), indexing="ij")).reshape(2, -1)
    rel = (coords[:, :, None] - coords[:, None, :]).transpose(1, 2, 0) + (window - 1)
    return rel[..., 0] * (2 * window - 1) + rel[..., 1]


def shift_mask(height: int, width: int, window: int, shift: int) -> np.ndarray:
    """`[num_windows, window**2, window**2]` float32 additive mask of shifted-window attention:
    0 between tokens of the same region of the rolled grid, -100 between regions (they
    were not neighbours before the cyclic shift)."""
    def regions(n):
        i = np.arange(n)
        return (i >= n - window).astype(np.int64) + (i >= n - shift)
    img = (regions(height)[:, None] * 3 + regions(width)[None, :])[None, :, :, None]
    windows = window_partition(img, window)[..., 0]  # [nW, N]
    diff = windows[:, None, :] - windows[:, :, None]
    return np.where(diff != 0, SHIFT_MASK_VALUE, 0.0).astype(np.float32)


def window_partition(x, window: int):
    """`[batch, h, w, c] -> [batch * num_windows, window**2, c]`, windows row-major within
    each example (numpy or jax arrays)."""
    b, h, w, c = x.shape
    x = x.reshape(b, h // window, window, w // window, window, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b * (h // window) * (w // window), window * window, c)


def window_reverse(windows: jax.Array, window: int, height: int, width: int) -> jax.Array:
    """Inverse of `window_partition`: `[batch * num_windows, window**2, c] -> [batch, h, w, c]`."""
    c = windows.shape[-1]
    x = windows.reshape(-1, height // window, width // window, window, window, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, height, width, c)


class SwinBlock(nn.Module):
    """One Swin block on the grid `x [batch, h, w, dim]` -> same shape.

    `x + drop_path(window_attention(LN(x)))`, `x + drop_path(mlp(LN(x)))`. Windows of
    `window_size`**2 tokens attend among themselves through the shared
    `MultiHeadAttention`, with the relative-position bias (a learned
    `[(2w-1)**2, heads]` table gathered per pair) and, for a shifted block (the grid rolled
    by `-shift_size` first, rolled back after), the -100 region mask, both as its additive
    `bias`. When the grid is no larger than the window (HTSAT-tiny's last stage: 8 x 8), the
    whole grid is one window and nothing is shifted, as HF's `set_shift_and_window_size`.
    """
    dim: int
    num_heads: int
    window_size: int
    shift_size: int
    mlp_ratio: float = 4.0
    eps: float = 1e-5
    hidden_act: str = "gelu"
    dropout: float = 0.0
    attention_dropout: float = 0.0
    drop_path: float = 0.0
    attention_impl: str | None = None
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        batch, height, width, dim = x.shape
        window, shift = self.window_size, self.shift_size
        if min(height, width) <= window:
            if min(height, width) < window:
                # HF would index a window**2 bias with fewer tokens and fail; so do we, clearly.
                raise ValueError(f"SwinBlock: grid {height}x{width} is smaller than window_size={window}")
            shift = 0
        if height % window or width % window:
            raise ValueError(f"SwinBlock: grid {height}x{width} is not a multiple of window_size={window}")
        x = constrain(x, GRID)
        h = layer_norm(self.eps, name="norm1", **kw)(x)
        if shift:
            h = jnp.roll(h, (-shift, -shift), axis=(1, 2))
        windows = window_partition(h, window)  # [batch * nW, N, dim]

        table = self.param("relative_position_bias_table", param(nn.initializers.truncated_normal(0.02),
                                                                 ("tokens", "heads")),
                           ((2 * window - 1) ** 2, self.num_heads), self.param_dtype)
        n = window * window
        bias = jnp.take(table.astype(jnp.float32), relative_position_index(window).reshape(-1), axis=0)
        bias = bias.reshape(n, n, self.num_heads).transpose(2, 0, 1)[None]  # [1, heads, N, N]
        if shift:
            # The mask differs per window, the same for every example: [batch * nW, heads, N, N]
            # (a broadcast XLA fuses into the logits' add rather than storing).
            mask = jnp.asarray(shift_mask(height, width, window, shift))[:, None]  # [nW, 1, N, N]
            bias = jnp.broadcast_to((bias + mask)[None], (batch,) + (mask.shape[0], self.num_heads, n, n))
            bias = bias.reshape(-1, self.num_heads, n, n)
        h = MultiHeadAttention(self.num_heads, dropout_rate=self.attention_dropout,
                               implementation=self.attention_impl, name="attn", **kw)(
            windows, bias=bias, deterministic=not train)
        h = nn.Dropout(self.dropout)(h, deterministic=not train)
        h = window_reverse(h, window, height, width)
        if shift:
            h = jnp.roll(h, (shift, shift), axis=(1, 2))
        x = x + DropPath(self.drop_path)(h, deterministic=not train)
        h = layer_norm(self.eps, name="norm2", **kw)(x)
        h = Mlp(int(self.mlp_ratio * dim), self.hidden_act, self.dropout, name="mlp", **kw)(h, deterministic=not train)
        x = x + DropPath(self.drop_path)(h, deterministic=not train)
        return constrain(x, GRID)


class PatchMerging(nn.Module):
    """`[batch, h, w, c] -> [batch, h/2, w/2, 2c]`: each 2 x 2 neighbourhood concatenated in
    Swin's order ((0,0), (1,0), (0,1), (1,1) as (row, column)), LayerNorm(4c), Linear without bias."""
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, h, w, c = x.shape
        if h % 2 or w % 2:
            raise ValueError(f"PatchMerging: grid {h}x{w} is not even")
        x = x.reshape(b, h // 2, 2, w // 2, 2, c).transpose(0, 1, 3, 4, 2, 5).reshape(b, h // 2, w // 2, 4 * c)
        x = layer_norm(TORCH_LN_EPS, name="norm", dtype=self.dtype, param_dtype=self.param_dtype)(x)
        return dense(2 * c, ("mlp", "embed"), name="reduction", use_bias=False, dtype=self.dtype,
                     param_dtype=self.param_dtype)(x)


class _AttentionBranch(nn.Module):
    """`[..., c] -> [..., c]`: 1x1 conv (c -> inter) - BatchNorm - ReLU - 1x1 conv (-> c) - BatchNorm
    (a 1x1 conv is a dense layer over the channels)."""
    inter: int
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, z: jax.Array, train: bool, rows: jax.Array | None = None) -> jax.Array:
        """`rows [batch]` (True = the row takes part): the BatchNorms' training statistics."""
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        c = z.shape[-1]
        mask = None if rows is None else rows.reshape(rows.shape + (1,) * (z.ndim - 2))
        z = dense(self.inter, ("embed", "mlp"), name="conv1", **kw)(z)
        z = nn.relu(BatchNorm(name="bn1", **kw)(z, train, mask))
        z = dense(c, ("mlp", "embed"), name="conv2", **kw)(z)
        return BatchNorm(name="bn2", **kw)(z, train, mask)


class AFFBlock(nn.Module):
    """Attentional feature fusion (2-D, `ClapAudioAFFBlock`): `(global_, local) [batch, h, w, c]`
    -> `2 g w + 2 l (1 - w)`, `w = sigmoid(local_att(g + l) + global_att(g + l))`, each att
    a 1x1 conv (c -> c / r) - BN - ReLU - 1x1 conv (-> c) - BN, global_att on the spatial mean."""
    reduction: int = 4
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, global_: jax.Array, local: jax.Array, train: bool = False,
                 rows: jax.Array | None = None) -> jax.Array:
        """`rows [batch]`: the rows HF runs the block on (the others' outputs are discarded);
        in training only they give the BatchNorm statistics."""
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        inter = int(global_.shape[-1] // self.reduction)

        xa = global_ + local
        local_att = _AttentionBranch(inter, name="local_att", **kw)(xa, train, rows)
        global_att = _AttentionBranch(inter, name="global_att", **kw)(xa.mean(axis=(1, 2), keepdims=True), train,
                                                                      rows)
        w = jax.nn.sigmoid(local_att + global_att)
        return 2 * global_ * w + 2 * local * (1 - w)


class ClapPatchEmbed(nn.Module):
    """`image [batch, S, S, channels]` -> `[batch, S/p, S/p, embed]` (LayerNorm'd).

    Without fusion, `proj` (a p x p / stride p conv) embeds the single channel. With fusion,
    channel 0 (the whole clip) goes through `proj` and channels 1-3 (three crops) each
    through `mel_conv2d` (p x 3p / stride p x 3p, so each crop gives a third of the width);
    the three are laid side by side, zero-padded to the grid width and fused with the
    global embedding by the AFF block, for the rows where `is_longer` is set. Every row
    computes both paths (static shapes under jit) and `jnp.where` picks; in eval mode
    (BatchNorm on running statistics) that equals HF's gather-and-scatter of those rows,
    and in training the AFF's BatchNorms take their statistics from those rows only, as
    HF's (no row longer: the statistics stay).
    """
    embed_dim: int
    patch: int
    enable_fusion: bool = False
    enable_norm: bool = True
    aff_block_r: int = 4
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, image: jax.Array, is_longer: jax.Array | None, train: bool = False) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        p = self.patch
        conv_axes = ("conv_h", "conv_w", "conv_in", "embed")
        x = PatchEmbed(self.embed_dim, p, conv_axes, name="proj", **kw)(image[..., :1])
        if self.enable_fusion:
            b, h, w, crops = image.shape[0], image.shape[1], image.shape[2], image.shape[3] - 1
            local = image[..., 1:].transpose(0, 3, 1, 2).reshape(b * crops, h, w, 1)
            local = PatchEmbed(self.embed_dim, (p, 3 * p), conv_axes, name="mel_conv2d", **kw)(local)
            gh, gw = local.shape[1], local.shape[2]
            # HF: [b, crops, c, gh, gw] -> [b, c, gh, crops, gw] -> width crops * gw, padded (or cut) to x's.
            local = local.reshape(b, crops, gh, gw, -1).transpose(0, 2, 1, 3, 4).reshape(b, gh, crops * gw, -1)
            width = x.shape[2]
            local = jnp.pad(local, ((0, 0), (0, 0), (0, max(0, width - local.shape[2])), (0, 0)))[:, :, :width]
            longer = (jnp.zeros((b,), bool) if is_longer is None else jnp.asarray(is_longer).reshape(b).astype(bool))
            fused = AFFBlock(self.aff_block_r, name="fusion_model", **kw)(x, local, train, longer)
            x = jnp.where(longer[:, None, None, None], fused, x)
        if self.enable_norm:
            x = layer_norm(TORCH_LN_EPS, name="norm", **kw)(x)
        return x


class HTSAT(nn.Module):
    """The HTSAT audio encoder (HF `ClapAudioEncoder`); fields are HF `ClapAudioConfig`'s
    (`embed_dim` = `patch_embeds_hidden_size`, `num_heads` = `num_attention_heads`,
    `eps` = `layer_norm_eps` of the Swin blocks, `dropout` = `hidden_dropout_prob`,
    `attention_dropout` = `attention_probs_dropout_prob`). `HTSAT_TINY` / `HTSAT_BASE`
    hold the LAION sizes.

    `__call__(input_features [batch, channels, frames, mel], is_longer [batch] bool or None,
    train)` -> `(pooled [batch, hidden], tokens [batch, (S / p / 2**(stages-1))**2, hidden])`
    with `hidden = embed_dim * 2**(stages - 1)`, S = spec_size. `channels` is 4 with
    fusion, else 1; `frames` at most `spec_size * freq_ratio` (resized up to it);
    `is_longer` None with fusion: no row is fused.
    """
    num_mel_bins: int = 64
    spec_size: int = 256
    patch_size: int = 4
    patch_stride: tuple[int, int] = (4, 4)
    embed_dim: int = 96
    depths: tuple[int, ...] = (2, 2, 6, 2)
    num_heads: tuple[int, ...] = (4, 8, 16, 32)
    window_size: int = 8
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    hidden_act: str = "gelu"
    eps: float = 1e-5
    enable_fusion: bool = False
    aff_block_r: int = 4
    enable_patch_layer_norm: bool = True
    drop_path_rate: float = 0.0
    dropout: float = 0.0
    attention_dropout: float = 0.0
    attention_impl: str | None = None
    remat: str | bool = "none"  # jaxaudio.layers.remat: none, full, dots, dots_no_batch (True = full)
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @property
    def freq_ratio(self) -> int:
        return self.spec_size // self.num_mel_bins

    @property
    def hidden_size(self) -> int:
        return self.embed_dim * 2 ** (len(self.depths) - 1)

    def _check(self, input_features: jax.Array) -> None:
        if tuple(self.patch_stride) != (self.patch_size, self.patch_size):
            raise ValueError(f"HTSAT: patch_stride={tuple(self.patch_stride)} must equal (patch_size, patch_size)="
                             f"{(self.patch_size, self.patch_size)} (overlapping patches are not supported)")
        if not self.qkv_bias:
            raise ValueError("HTSAT: qkv_bias=False is not supported")
        if len(self.depths) != len(self.num_heads):
            raise ValueError(f"HTSAT: depths {self.depths} and num_heads {self.num_heads} differ in length")
        if self.freq_ratio < 1:
            raise ValueError(f"HTSAT: spec_size={self.spec_size} is smaller than num_mel_bins={self.num_mel_bins}")
        channels = 4 if self.enable_fusion else 1
        if input_features.ndim != 4 or input_features.shape[1] != channels:
            raise ValueError(f"HTSAT: input_features must be [batch, {channels}, frames, mel] "
                             f"(enable_fusion={self.enable_fusion}); got {input_features.shape}")
        frames, mel = input_features.shape[2:]
        if mel != self.num_mel_bins:
            raise ValueError(f"HTSAT: {mel} mel bins, the model takes num_mel_bins={self.num_mel_bins}")
        if frames > self.spec_size * self.freq_ratio:
            raise ValueError(f"HTSAT: {frames} frames exceed spec_size * freq_ratio = "
                             f"{self.spec_size * self.freq_ratio}")

    def reshape_mel2img(self, x: jax.Array) -> jax.Array:
        """`[batch, channels, frames, mel]` -> `[batch, S, S, channels]` (S = spec_size): time
        resized to `S * freq_ratio` and mel to `S / freq_ratio` (torch bicubic,
        align_corners=True; each only if smaller), then `freq_ratio` consecutive blocks of
        frames stacked along the mel axis: `image[r * mel + f, t] = x[r * S + t, f]`.

        (HF's mel resize would also undo the time resize; it only runs when the frames
        already fit, and there both agree.)
        """
        r, s = self.freq_ratio, self.spec_size
        width, height = s * r, s // r
        if x.shape[2] < width:
            x = resize_axis(x, width, axis=2)
        if x.shape[3] < height:
            x = resize_axis(x, height, axis=3)
        b, c, t, f = x.shape
        x = x.reshape(b, c, r, t // r, f).transpose(0, 2, 4, 3, 1)  # [b, r, f, t/r, c]
        return x.reshape(b, r * f, t // r, c)

    @nn.compact
    def __call__(self, input_features: jax.Array, is_longer: jax.Array | None = None,
                 train: bool = False) -> tuple[jax.Array, jax.Array]:
        self._check(input_features)
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = input_features.astype(self.dtype)
        # BatchNorm2d over the mel bins (HF transposes mel into the channel axis; here it is last).
        x = BatchNorm(name="batch_norm", **kw)(x, train)
        image = self.reshape_mel2img(x)
        x = ClapPatchEmbed(self.embed_dim, self.patch_size, self.enable_fusion, self.enable_patch_layer_norm,
                           self.aff_block_r, name="patch_embed", **kw)(image, is_longer, train)
        rates = np.linspace(0.0, self.drop_path_rate, sum(self.depths))
        swin = remat_block(SwinBlock, self.remat, static_argnums=(2,), field="HTSAT.remat")
        block = 0
        for stage, (depth, heads) in enumerate(zip(self.depths, self.num_heads)):
            dim = self.embed_dim * 2 ** stage
            for i in range(depth):
                x = swin(dim, heads, self.window_size, 0 if i % 2 == 0 else self.window_size // 2,
                         self.mlp_ratio, self.eps, self.hidden_act, self.dropout, self.attention_dropout,
                         float(rates[block]), self.attention_impl, name=f"layers_{stage}_blocks_{i}", **kw)(
                    x, train)
                block += 1
            if stage < len(self.depths) - 1:
                x = PatchMerging(name=f"layers_{stage}_downsample", **kw)(x)
        x = layer_norm(TORCH_LN_EPS, name="norm", **kw)(x)
        tokens = constrain(x.reshape(x.shape[0], -1, x.shape[-1]), TOKENS)
        # HF regroups the tokens by frequency before AdaptiveAvgPool1d: a mean over all of them all the same.
        return tokens.mean(axis=1), tokens


def roberta_position_ids(input_ids: jax.Array, pad_token_id: int) -> jax.Array:
    """RoBERTa's positions (transformers `create_position_ids_from_input_ids`): tokens that
    are not `pad_token_id` count from `pad_token_id + 1`; padding sits at `pad_token_id`.
    `[batch, len]` int -> same shape int32."""
    keep = (input_ids != pad_token_id).astype(jnp.int32)
    return jnp.cumsum(keep, axis=1) * keep + pad_token_id


class ProjectionHead(nn.Module):
    """`[..., hidden] -> [..., dim]`: Linear - ReLU - Linear (HF `ClapProjectionLayer`,
    LAION `*_projection` = Sequential(Linear, ReLU, Linear))."""
    dim: int
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = nn.relu(dense(self.dim, ("embed", "mlp"), name="linear1", **kw)(x))
        return dense(self.dim, ("mlp", "embed"), name="linear2", **kw)(x)


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
    """`x / max(||x||, eps)` over the last axis in float32 (torch `F.normalize`)."""
    x = x.astype(jnp.float32)
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


class Clap(nn.Module):
    """The two towers (HF `ClapModel`): `audio` (kwargs of `HTSAT`) and `text` (kwargs of
    `Bert`, the RoBERTa text tower with its pooler), each followed by a projection head to
    `projection_dim` and an L2 normalisation, plus the two learned temperatures.

    Variables: `params/{audio,text,audio_projection,text_projection}`, the scalars
    `params/logit_scale_a` and `params/logit_scale_t`; `batch_stats/audio` (HTSAT's
    BatchNorms). Methods (`apply(..., method="audio_features")`):

    - `audio_features(input_features [batch, channels, frames, mel], is_longer [batch] | None,
      train)` -> `[batch, projection_dim]` float32, unit norm
    - `text_features(input_ids [batch, len], attention_mask [batch, len] | None, train)` ->
      `[batch, projection_dim]` float32, unit norm; positions are RoBERTa's, from
      `pad_token_id` (1, `<pad>`)
    - `__call__(input_features, is_longer, input_ids, attention_mask, train)` -> dict of
      `audio_embeds [A, d]`, `text_embeds [T, d]`, `logits_per_audio [A, T]`
      (= a t^T exp(logit_scale_a)), `logits_per_text [T, A]` (= t a^T exp(logit_scale_t)).

    Training (`train=True`): BatchNorm statistics update (`mutable=["batch_stats"]`) and
    dropout needs the rng `dropout`.
    """
    audio: dict = dataclasses.field(default_factory=dict)
    text: dict = dataclasses.field(default_factory=dict)
    projection_dim: int = 512
    logit_scale_init: float = math.log(1 / 0.07)
    pad_token_id: int = 1
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def __hash__(self):
        # The dict fields are unhashable; this lets a Clap be a static argument of `jax.jit`.
        return hash((json.dumps([self.audio, self.text], sort_keys=True, default=list), self.projection_dim,
                     self.logit_scale_init, self.pad_token_id, str(jnp.dtype(self.dtype)),
                     str(jnp.dtype(self.param_dtype)), self.name))

    @nn.nowrap
    def parts(self, names: tuple[str | None, str | None] = (None, None)) -> tuple[HTSAT, Bert]:
        """The two towers (unbound unless built inside `setup`), named `names`."""
        kw = dict(dtype=jnp.dtype(self.dtype), param_dtype=jnp.dtype(self.param_dtype))
        audio = part_kwargs(self.audio, "Clap", "audio")
        for key in ("depths", "num_heads", "patch_stride"):  # json gives lists; the module fields are tuples
            if key in audio:
                audio[key] = tuple(audio[key])
        text = {"pooler": True, **part_kwargs(self.text, "Clap", "text")}
        if not text["pooler"] or text.get("head", "none") != "none":
            raise ValueError("Clap: the text tower needs its pooler and no head (pooler=True, head='none')")
        return HTSAT(**audio, **kw, name=names[0]), Bert(**text, **kw, name=names[1])

    def setup(self):
        # Fields and sub-modules share the names `audio`/`text`, so the sub-modules are named
        # explicitly and kept under other attributes (as models/bat.py).
        kw = dict(dtype=jnp.dtype(self.dtype), param_dtype=jnp.dtype(self.param_dtype))
        self.audio_tower, self.text_tower = self.parts(("audio", "text"))
        self.audio_projection = ProjectionHead(self.projection_dim, **kw)
        self.text_projection = ProjectionHead(self.projection_dim, **kw)
        init = nn.initializers.constant(self.logit_scale_init)
        self.logit_scale_a = self.param("logit_scale_a", param(init, ()), (), jnp.float32)
        self.logit_scale_t = self.param("logit_scale_t", param(init, ()), (), jnp.float32)

    def audio_features(self, input_features: jax.Array, is_longer: jax.Array | None = None,
                       train: bool = False) -> jax.Array:
        pooled, _ = self.audio_tower(input_features, is_longer, train=train)
        return l2_normalize(self.audio_projection(pooled))

    def text_features(self, input_ids: jax.Array, attention_mask: jax.Array | None = None,
                      train: bool = False) -> jax.Array:
        if attention_mask is None:
            attention_mask = jnp.ones(input_ids.shape, jnp.int32)
        positions = roberta_position_ids(input_ids, self.pad_token_id)
        out = self.text_tower(input_ids, attention_mask, position_ids=positions, deterministic=not train)
        return l2_normalize(self.text_projection(out.pooler_output))

    def __call__(self, input_features: jax.Array, is_longer: jax.Array | None, input_ids: jax.Array,
                 attention_mask: jax.Array | None = None, train: bool = False) -> dict[str, jax.Array]:
        audio = self.audio_features(input_features, is_longer, train)
        text = self.text_features(input_ids, attention_mask, train)
        sim = jnp.einsum("ad,td->at", audio, text, precision=jax.lax.Precision.HIGHEST)
        return {"audio_embeds": audio, "text_embeds": text,
                "logits_per_audio": sim * jnp.exp(self.logit_scale_a),
                "logits_per_text": sim.T * jnp.exp(self.logit_scale_t)}

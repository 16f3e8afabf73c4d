"""Spatial-AST: the binaural audio encoder of BAT (Zheng et al., 2024), in Flax Linen.

Pipeline (shapes for the original size; every size comes from the module's fields):
  waveform [batch, 2, time] at 32 kHz
  -> STFT (n_fft 1024, hop 320, periodic Hann, centred, reflect pad) per ear
  -> log-mel of the magnitude [batch, frames, 128, 2] -> per-ear BatchNorm (no affine)
  -> IPD = phase(right) - phase(left); cos/sin through the same mel matrix [.., 2]
  -> 4 channels [batch, frames, 128, 4] -> bicubic time resize to 1024 frames if shorter
  -> conv 3x3 4->1 (no bias) + BatchNorm + exact GELU       [batch, 1024, 128, 1]
  -> (train) SpecAugment: one time and one frequency mask shared by the batch
  -> 16x16 patches, time-major 64x8 grid                      [batch, 512, 768]
  -> + position embedding -> (train) drop 25% time rows and 25% frequency columns
  -> prepend 3 CLS tokens (distance, direction, class)        [batch, 515, 768]
  -> 12 pre-LN ViT blocks -> per-token heads with their own LayerNorm.

The front-end matrices (DFT kernels, mel filterbank) are recomputed from the fields; the
converter checks that a checkpoint's frozen copies agree with them.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxaudio.features.binaural import binaural_features
from jaxaudio.features.mel import mel_filterbank
from jaxaudio.features.resize import resize_axis
from jaxaudio.features.stft import dft_kernels
from jaxaudio.layers import BatchNorm, PatchEmbed, PreNormBlock, constrain, dense, layer_norm, param, remat_block


def sincos_pos_embed_2d(embed_dim: int, grid_t: int, grid_f: int) -> np.ndarray:
    """Fixed 2-D sin-cos position embedding `[grid_t * grid_f, embed_dim]`, time-major.

    AudioMAE's layout: the first half of the channels encodes the *frequency* index and
    the second half the time index, each as [sin, cos] over `10000**(-2i/d)`.
    """
    def one_d(dim, pos):
        omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
        out = np.outer(pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    f_idx, t_idx = np.meshgrid(np.arange(grid_f, dtype=np.float32), np.arange(grid_t, dtype=np.float32))
    emb = np.concatenate([one_d(embed_dim // 2, f_idx), one_d(embed_dim // 2, t_idx)], axis=1)
    return emb.astype(np.float32)


def _band_mask(rng: jax.Array, size: int, max_width: int) -> jax.Array:
    """torchaudio's `mask_along_axis`: width ~ U[0, max_width), start ~ U[0, size - width)."""
    r1, r2 = jax.random.split(rng)
    width = jax.random.uniform(r1) * max_width
    start = jax.random.uniform(r2) * (size - width)
    start_i = start.astype(jnp.int32)
    end_i = start_i + width.astype(jnp.int32)
    idx = jnp.arange(size)
    return (idx >= start_i) & (idx < end_i)


def _keep_indices(rng: jax.Array, batch: int, size: int, keep: int) -> jax.Array:
    """Per-example random subset of `keep` indices out of `size`, in shuffled order (like MAE)."""
    return jnp.argsort(jax.random.uniform(rng, (batch, size)), axis=1)[:, :keep]


class BinauralFrontend(nn.Module):
    """`[batch, 2, time]` -> normalised 4-channel features `[batch, target_frames, n_mels, 4]`:
    per-ear log-mel through BatchNorm (no affine), then the two IPD-mel channels, then the
    bicubic time resize (only when shorter, as the original)."""
    sample_rate: int
    n_fft: int
    hop_length: int
    n_mels: int
    fmin: float
    fmax: float
    target_frames: int
    stft_method: str = "fft"
    normalize_ipd: bool = False

    @nn.compact
    def __call__(self, wave: jax.Array, train: bool) -> jax.Array:
        real, imag = dft_kernels(self.n_fft)
        mel = mel_filterbank(self.sample_rate, self.n_fft, self.n_mels, self.fmin, self.fmax)
        logmel, ipd = binaural_features(wave.astype(jnp.float32), real, imag, mel, self.hop_length,
                                        self.stft_method)
        logmel = BatchNorm(affine=False, name="bn")(logmel, train)
        if self.normalize_ipd:
            ipd = BatchNorm(affine=False, name="ipd_bn")(ipd, train)
        x = jnp.concatenate([logmel, ipd], axis=-1)
        frames = x.shape[1]
        if frames > self.target_frames:
            raise ValueError(
                f"Spatial-AST: {frames} STFT frames exceed target_frames={self.target_frames} "
                f"(at most {self.target_frames * self.hop_length - 1} samples at {self.sample_rate} Hz); "
                f"crop the audio or raise target_frames")
        if frames < self.target_frames:
            x = resize_axis(x, self.target_frames, axis=1)
        return x


class SpatialAST(nn.Module):
    """Spatial-AST encoder with its four heads.

    `__call__(wave [batch, 2, time], train) -> dict` with `classifier [batch, classes]`,
    `distance [batch, distance_bins]`, `azimuth [batch, 360]`, `elevation [batch, 180]`
    logits and `tokens [batch, cls + patches, embed]` (the last block's output, which BAT
    feeds to its Q-Former). Training needs rngs `dropout` and `augment`, and a mutable
    `batch_stats`.
    """
    sample_rate: int = 32000
    n_fft: int = 1024
    hop_length: int = 320
    n_mels: int = 128
    fmin: float = 50.0
    fmax: float = 14000.0
    target_frames: int = 1024
    stft_method: str = "fft"  # or "matmul": the original's DFT-kernel product (fast on TPU)
    patch_size: int = 16
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    num_cls_tokens: int = 3
    num_classes: int = 355
    num_distance_bins: int = 21
    num_azimuth_bins: int = 360
    num_elevation_bins: int = 180
    eps: float = 1e-6
    # The original draws head weights with std 2e-5, which suits a pretrained trunk. From
    # scratch such heads pass almost no gradient into the trunk; a larger std trains.
    head_init_std: float = 2e-5
    # The original's stem mixes the four maps (two log-mels, cos/sin IPD) into ONE channel;
    # more keeps them apart (a diagnostic for small budgets, not the original).
    stem_channels: int = 1
    # The IPD-mel maps come out of the Slaney-normalised filterbank ~60x smaller than the
    # normalised log-mels (std ~0.015 against 1), so a stem trained from scratch hardly
    # sees them; True gives them their own BatchNorm (no affine). Not the original.
    normalize_ipd: bool = False
    drop_path_rate: float = 0.1
    time_mask: int = 192
    freq_mask: int = 48
    mask_t_prob: float = 0.25
    mask_f_prob: float = 0.25
    remat: str | bool = "none"  # jaxaudio.layers.remat: none, full, dots, dots_no_batch (True = full)
    attention_impl: str | None = None
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, wave: jax.Array, train: bool = False) -> dict[str, jax.Array]:
        if wave.ndim != 3 or wave.shape[1] != 2:
            raise ValueError(f"Spatial-AST expects binaural audio [batch, 2, time]; got shape {wave.shape}")
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        batch = wave.shape[0]
        x = BinauralFrontend(self.sample_rate, self.n_fft, self.hop_length, self.n_mels, self.fmin, self.fmax,
                             self.target_frames, self.stft_method, self.normalize_ipd,
                             name="frontend")(wave, train)

        x = nn.Conv(self.stem_channels, (3, 3), padding=1, use_bias=False, name="stem_conv",
                    kernel_init=param(nn.initializers.kaiming_uniform(),
                                      ("conv_h", "conv_w", "conv_in", "conv_out")), **kw)(x)
        x = BatchNorm(name="stem_bn", **kw)(x, train)
        x = nn.gelu(x, approximate=False)
        if train:
            r_f, r_t = jax.random.split(self.make_rng("augment"))
            keep = ~_band_mask(r_f, x.shape[2], self.freq_mask)[None, None, :, None]
            keep &= ~_band_mask(r_t, x.shape[1], self.time_mask)[None, :, None, None]
            x = jnp.where(keep, x, 0.0)

        p = self.patch_size
        x = PatchEmbed(self.embed_dim, p, ("conv_h", "conv_w", "conv_in", "embed"), name="patch_embed",
                       kernel_init=nn.initializers.xavier_uniform(), **kw)(x)
        grid_t, grid_f = x.shape[1], x.shape[2]
        pos = self.param("pos_embed", param(lambda *_: jnp.asarray(sincos_pos_embed_2d(
            self.embed_dim, grid_t, grid_f)), ("tokens", "embed")), (grid_t * grid_f, self.embed_dim))
        x = x.reshape(batch, grid_t, grid_f, self.embed_dim) + pos.reshape(grid_t, grid_f, -1).astype(x.dtype)
        if train and (self.mask_t_prob > 0 or self.mask_f_prob > 0):
            x = self._mask_patches(x)
        x = x.reshape(batch, -1, self.embed_dim)

        cls = self.param("cls_tokens", param(nn.initializers.normal(0.02), ("tokens", "embed")),
                         (self.num_cls_tokens, self.embed_dim), self.param_dtype)
        x = jnp.concatenate([jnp.broadcast_to(cls.astype(x.dtype), (batch,) + cls.shape), x], axis=1)
        x = constrain(x, ("act_batch", "act_length", "act_embed"))

        block = remat_block(PreNormBlock, self.remat, static_argnums=(2,), field="SpatialAST.remat")
        rates = np.linspace(0, self.drop_path_rate, self.depth)
        for i in range(self.depth):
            x = block(self.num_heads, int(self.embed_dim * self.mlp_ratio), eps=self.eps, fused_qkv=True,
                      drop_path=float(rates[i]), attention_impl=self.attention_impl,
                      name=f"blocks_{i}", **kw)(x, train)

        def norm(token, name):
            return layer_norm(self.eps, name=name, **kw)(x[:, token])

        def head(h, name, n):
            return dense(n, ("embed", "classes"), name=name,
                         kernel_init=nn.initializers.truncated_normal(self.head_init_std),
                         **kw)(h).astype(jnp.float32)

        # Token order is the original's: 0 distance, 1 direction, 2 class.
        dis, doa, cls_tok = norm(0, "dis_norm"), norm(1, "doa_norm"), norm(2, "fc_norm")
        return {
            "classifier": head(cls_tok, "head", self.num_classes),
            "distance": head(dis, "distance_head", self.num_distance_bins),
            "azimuth": head(doa, "azimuth_head", self.num_azimuth_bins),
            "elevation": head(doa, "elevation_head", self.num_elevation_bins),
            "tokens": x,
        }

    def _mask_patches(self, x: jax.Array) -> jax.Array:
        """Keep a random subset of whole time rows, then of frequency columns, per example.

        `[batch, grid_t, grid_f, embed]` -> `[batch, keep_t, keep_f, embed]`.
        """
        batch, grid_t, grid_f, _ = x.shape
        keep_t = int(grid_t * (1 - self.mask_t_prob))
        keep_f = int(grid_f * (1 - self.mask_f_prob))
        r_t, r_f = jax.random.split(self.make_rng("augment"))
        ids_t = _keep_indices(r_t, batch, grid_t, keep_t)
        x = jnp.take_along_axis(x, ids_t[:, :, None, None], axis=1)
        ids_f = _keep_indices(r_f, batch, grid_f, keep_f)
        return jnp.take_along_axis(x, ids_f[:, None, :, None], axis=2)


def smoothed_bins(target: jax.Array, num_bins: int, sigma: float, circular: bool) -> jax.Array:
    """`[batch]` int bins -> `[batch, num_bins]` targets: a Gaussian of `sigma` bins around
    each bin (the distance wraps around when `circular`: azimuth), normalised to sum 1."""
    d = jnp.abs(jnp.arange(num_bins)[None, :] - target[:, None]).astype(jnp.float32)
    if circular:
        d = jnp.minimum(d, num_bins - d)
    w = jnp.exp(-0.5 * jnp.square(d / sigma))
    return w / jnp.sum(w, axis=-1, keepdims=True)


def spatial_ast_loss(outputs: dict[str, jax.Array], labels: jax.Array, distance: jax.Array,
                     azimuth: jax.Array, elevation: jax.Array,
                     weights: tuple[float, float, float, float] = (1250.0, 1.0, 2.0, 2.0),
                     direction_sigma: float = 0.0) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The original's loss: `1250*BCE(class) + CE(distance) + 2*(CE(azimuth) + CE(elevation))`.

    labels `[batch, classes]` (multi-hot or soft), distance/azimuth/elevation `[batch]` int
    bins. BCE is averaged over every element, as `BCEWithLogitsLoss()` does. Returns the
    total and its parts.

    `direction_sigma > 0` (not in the original, which uses 0) spreads the azimuth and
    elevation targets over neighbouring 1-degree bins (`smoothed_bins`), so a prediction
    a few degrees off is nearly right instead of as wrong as the opposite side. With
    ~4 training clips per azimuth bin, hard targets are memorised per clip instead.
    """
    def direction_ce(logits, target, circular):
        if not direction_sigma:
            return optax.softmax_cross_entropy_with_integer_labels(logits, target).mean()
        soft = smoothed_bins(target, logits.shape[-1], direction_sigma, circular)
        return optax.softmax_cross_entropy(logits, soft).mean()

    parts = {
        "bce": optax.sigmoid_binary_cross_entropy(outputs["classifier"], labels).mean(),
        "ce_distance": optax.softmax_cross_entropy_with_integer_labels(outputs["distance"], distance).mean(),
        "ce_azimuth": direction_ce(outputs["azimuth"], azimuth, True),
        "ce_elevation": direction_ce(outputs["elevation"], elevation, False),
    }
    total = sum(w * parts[k] for w, k in zip(weights, parts))
    return total, parts

"""Whisper's audio encoder (Radford et al., 2022), in Flax Linen.

  log-mel `[batch, n_mels, frames]` (frames = 3000 for a 30 s window)
  -> Conv1d k3 pad 1 + exact GELU -> Conv1d k3 stride 2 pad 1 + exact GELU  [batch, frames/2, d_model]
  -> + position embedding (a parameter; Whisper's fixed sinusoids when fresh)
  -> pre-LN transformer layers (attention with no key bias; fc1 -> GELU -> fc2)
  -> final LayerNorm.

Every size comes from the fields; `jaxaudio.convert.whisper.config_from_hf` reads them
from a Hugging Face `config.json` (tiny .. large-v3). Whisper's encoder has no attention
mask: padding is silence in the log-mel, and the model attends to it.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxaudio.layers import PreNormBlock, layer_norm, param, remat_block
from jaxaudio.layers.scan import STACK, scanned_block


def sinusoids(length: int, channels: int, max_timescale: float = 10000.0) -> np.ndarray:
    """Whisper's position table `[length, channels]`: sines then cosines over geometric timescales."""
    if channels % 2:
        raise ValueError(f"sinusoidal positions need an even width; got {channels}")
    increment = np.log(max_timescale) / (channels // 2 - 1)
    inv_timescales = np.exp(-increment * np.arange(channels // 2))
    scaled = np.arange(length)[:, None] * inv_timescales[None, :]
    return np.concatenate([np.sin(scaled), np.cos(scaled)], axis=1).astype(np.float32)


class WhisperEncoder(nn.Module):
    """`__call__(features [batch, num_mel_bins, frames], train) -> [batch, ceil(frames / 2), d_model]`.

    Hugging Face's encoder demands exactly `2 * max_source_positions` frames (3000); this
    one also takes fewer and adds the first `ceil(frames / 2)` positions, so short clips
    need not be padded to 30 s (the outputs then differ from a padded clip's, because the
    padding is attended to). Defaults are whisper-large-v2's sizes (SALMONN's encoder).
    """
    num_mel_bins: int = 80
    d_model: int = 1280
    encoder_layers: int = 32
    encoder_attention_heads: int = 20
    encoder_ffn_dim: int = 5120
    max_source_positions: int = 1500
    activation: str = "gelu"
    eps: float = 1e-5
    dropout: float = 0.0
    remat: str | bool = "none"  # jaxaudio.layers.remat: none, full, dots, dots_no_batch (True = full)
    scan_layers: bool = False  # one compiled block for all layers, parameters `layers/...` [layers, ...]
    attention_impl: str | None = None
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, features: jax.Array, train: bool = False) -> jax.Array:
        if features.ndim != 3 or features.shape[1] != self.num_mel_bins:
            raise ValueError(f"Whisper encoder expects log-mel [batch, {self.num_mel_bins}, frames]; "
                             f"got shape {features.shape}")
        frames = features.shape[2]
        if frames > 2 * self.max_source_positions:
            raise ValueError(f"Whisper encoder: {frames} frames exceed 2 * max_source_positions = "
                             f"{2 * self.max_source_positions} (30 s for Whisper); split or truncate the audio")
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)

        def conv(name, stride):
            return nn.Conv(self.d_model, (3,), strides=(stride,), padding=[(1, 1)], name=name,
                           kernel_init=param(nn.initializers.lecun_normal(), ("conv_w", "conv_in", "embed")),
                           bias_init=param(nn.initializers.zeros, ("embed",)), **kw)

        x = jnp.swapaxes(features, 1, 2)  # channels last: [batch, frames, n_mels]
        # The stem's GELU is always the exact one (torch's F.gelu), whatever `activation` says.
        x = nn.gelu(conv("conv1", 1)(x), approximate=False)
        x = nn.gelu(conv("conv2", 2)(x), approximate=False)
        positions = self.param(
            "embed_positions",
            param(lambda _, shape, dtype: jnp.asarray(sinusoids(*shape), dtype), ("tokens", "embed")),
            (self.max_source_positions, self.d_model), self.param_dtype)
        x = x + positions[:x.shape[1]].astype(x.dtype)
        x = nn.Dropout(self.dropout)(x, deterministic=not train)

        # Whisper's k_proj has no bias; otherwise a plain pre-LN block.
        block = dict(eps=self.eps, fused_qkv=False, key_bias=False, activation=self.activation, dropout=self.dropout,
                     attention_impl=self.attention_impl, **kw)
        if self.scan_layers:
            layers = scanned_block(PreNormBlock, self.encoder_layers, self.remat, n_broadcast=1,
                                   static_argnums=(2,), field="WhisperEncoder.remat")
            x, _ = layers(self.encoder_attention_heads, self.encoder_ffn_dim, scanned=True, name=STACK, **block)(
                x, train)
        else:
            layer = remat_block(PreNormBlock, self.remat, static_argnums=(2,), field="WhisperEncoder.remat")
            for i in range(self.encoder_layers):
                x = layer(self.encoder_attention_heads, self.encoder_ffn_dim, name=f"layers_{i}", **block)(x, train)
        return layer_norm(self.eps, name="layer_norm", **kw)(x)

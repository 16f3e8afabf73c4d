"""AST, the Audio Spectrogram Transformer (Gong et al., 2021), as Hugging Face's `ASTModel`
and `ASTForAudioClassification`, in Flax Linen.

  waveform [batch, samples] at 16 kHz  --ast_features-->  [batch, max_length, num_mel_bins]
  -> (as HF) seen as an image [mel, time]; Conv2d 1 -> hidden, kernel patch_size^2,
     stride (frequency_stride, time_stride), patches frequency-major   [batch, patches, hidden]
  -> prepend CLS and distillation tokens, add the learned position embedding
  -> num_hidden_layers pre-LN ViT blocks -> final LayerNorm           last_hidden_state
  -> pooler_output = (CLS + distillation) / 2 -> (num_labels > 0) LayerNorm + Linear  logits
"""
import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxaudio.features.kaldi import kaldi_fbank
from jaxaudio.layers import PreNormBlock, constrain, dense, layer_norm, param, remat_block

# ASTFeatureExtractor's defaults: AudioSet statistics of the log-mel features.
AUDIOSET_MEAN = -4.2677393
AUDIOSET_STD = 4.5689974


def ast_features(waveform: jax.Array, *, sample_rate: int = 16000, num_mel_bins: int = 128, max_length: int = 1024,
                 do_normalize: bool = True, mean: float = AUDIOSET_MEAN, std: float = AUDIOSET_STD) -> jax.Array:
    """What `ASTFeatureExtractor` does: `[batch, samples]` (or `[samples]`) in [-1, 1] ->
    `[batch, max_length, num_mel_bins]` (or without batch).

    Kaldi fbank with a Hanning window, dither 0 and the waveform *not* scaled to 16-bit
    range (HF leaves that line commented out); frames zero-padded or truncated to
    `max_length`, then `(x - mean) / (2 * std)` (padding included, as HF).
    """
    fbank = kaldi_fbank(waveform, sample_rate=sample_rate, num_mel_bins=num_mel_bins, window="hanning",
                        htk_compat=True, use_energy=False)
    frames = fbank.shape[-2]
    if frames < max_length:
        pad = [(0, 0)] * (fbank.ndim - 2) + [(0, max_length - frames), (0, 0)]
        fbank = jnp.pad(fbank, pad)
    fbank = fbank[..., :max_length, :]
    return (fbank - mean) / (std * 2) if do_normalize else fbank


def patch_grid(num_mel_bins: int, max_length: int, patch_size: int, frequency_stride: int,
               time_stride: int) -> tuple[int, int]:
    """Number of patches along frequency and time (a valid, strided convolution)."""
    return (num_mel_bins - patch_size) // frequency_stride + 1, (max_length - patch_size) // time_stride + 1


class AST(nn.Module):
    """`__call__(input_values [batch, max_length, num_mel_bins], train) -> dict` with
    `last_hidden_state [batch, 2 + patches, hidden]`, `pooler_output [batch, hidden]` and,
    when `num_labels > 0`, `logits [batch, num_labels]` (float32). Training with
    `dropout > 0` needs an rng `dropout`.

    Dropout (HF's `hidden_dropout_prob`) follows the shared block, which also drops after
    the MLP activation; HF's attention-probability dropout is not modelled. Both are 0 in
    the released AST checkpoints.
    """
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-12
    patch_size: int = 16
    frequency_stride: int = 10
    time_stride: int = 10
    max_length: int = 1024
    num_mel_bins: int = 128
    num_labels: int = 0
    dropout: float = 0.0
    remat: str | bool = "none"  # jaxaudio.layers.remat: none, full, dots, dots_no_batch (True = full)
    attention_impl: str | None = None
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, input_values: jax.Array, train: bool = False) -> dict[str, jax.Array]:
        want = (self.max_length, self.num_mel_bins)
        if input_values.ndim != 3 or tuple(input_values.shape[1:]) != want:
            raise ValueError(f"AST expects input_values [batch, max_length, num_mel_bins] = [batch, {want[0]}, "
                             f"{want[1]}] (ast_features pads or truncates to max_length); got {input_values.shape}")
        grid = patch_grid(self.num_mel_bins, self.max_length, self.patch_size, self.frequency_stride,
                          self.time_stride)
        if min(grid) < 1:
            raise ValueError(f"patch_size={self.patch_size} exceeds num_mel_bins={self.num_mel_bins} or "
                             f"max_length={self.max_length}")
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        batch, hidden = input_values.shape[0], self.hidden_size

        # HF turns [batch, time, mel] into an image with frequency as height, time as width.
        x = jnp.swapaxes(input_values, 1, 2)[..., None]
        x = nn.Conv(hidden, (self.patch_size, self.patch_size), strides=(self.frequency_stride, self.time_stride),
                    padding="VALID", name="patch_embeddings",
                    kernel_init=param(nn.initializers.truncated_normal(0.02),
                                      ("conv_h", "conv_w", "conv_in", "embed")),
                    bias_init=param(nn.initializers.zeros, ("embed",)), **kw)(x)
        x = x.reshape(batch, grid[0] * grid[1], hidden)  # frequency-major, as HF's flatten(2)

        def token(name):
            t = self.param(name, param(nn.initializers.zeros, ("embed",)), (hidden,), self.param_dtype)
            return jnp.broadcast_to(t.astype(x.dtype), (batch, 1, hidden))

        pos = self.param("position_embeddings", param(nn.initializers.zeros, ("tokens", "embed")),
                         (2 + grid[0] * grid[1], hidden), self.param_dtype)
        x = jnp.concatenate([token("cls_token"), token("distillation_token"), x], axis=1) + pos.astype(x.dtype)
        x = nn.Dropout(self.dropout)(x, deterministic=not train)
        x = constrain(x, ("act_batch", "act_length", "act_embed"))

        block = remat_block(PreNormBlock, self.remat, static_argnums=(2,), field="AST.remat")
        for i in range(self.num_hidden_layers):
            x = block(self.num_attention_heads, self.intermediate_size, eps=self.layer_norm_eps, fused_qkv=False,
                      activation=self.hidden_act, dropout=self.dropout, attention_impl=self.attention_impl,
                      name=f"layer_{i}", **kw)(x, train)
        x = layer_norm(self.layer_norm_eps, name="layernorm", **kw)(x)
        out = {"last_hidden_state": x, "pooler_output": (x[:, 0] + x[:, 1]) / 2}
        if self.num_labels > 0:
            h = layer_norm(self.layer_norm_eps, name="classifier_layernorm", **kw)(out["pooler_output"])
            out["logits"] = dense(self.num_labels, ("embed", "classes"), name="classifier", **kw)(h).astype(
                jnp.float32)
        return out

"""Transformer blocks built from the shared attention and MLP."""
import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxaudio.layers.attention import MultiHeadAttention
from jaxaudio.layers.dense import Mlp
from jaxaudio.layers.norms import layer_norm
from jaxaudio.layers.partitioning import constrain

ACT = ("act_batch", "act_length", "act_embed")


class DropPath(nn.Module):
    """Stochastic depth: drop the whole residual branch per example (timm's `DropPath`)."""
    rate: float

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool) -> jax.Array:
        if deterministic or self.rate == 0.0:
            return x
        keep = 1.0 - self.rate
        shape = (x.shape[0],) + (1,) * (x.ndim - 1)
        mask = jax.random.bernoulli(self.make_rng("dropout"), keep, shape)
        return jnp.where(mask, x / keep, 0).astype(x.dtype)


class PreNormBlock(nn.Module):
    """Pre-LayerNorm encoder block (ViT / timm `Block`): `x + attn(ln(x))`, `x + mlp(ln(x))`.

    `x [batch, length, embed]` -> same shape. Sub-module names follow timm (`norm1`, `attn`,
    `norm2`, `mlp`) so checkpoint key maps stay readable.
    """
    num_heads: int
    mlp_dim: int
    eps: float = 1e-6
    fused_qkv: bool = True
    key_bias: bool | None = None  # None: as the other projections (Whisper's k_proj has none)
    activation: str = "gelu"
    dropout: float = 0.0
    drop_path: float = 0.0
    attention_impl: str | None = None
    scanned: bool = False  # under nn.scan (jaxaudio.layers.scan): return (x, None)
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False, mask: jax.Array | None = None,
                 bias: jax.Array | None = None):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = constrain(x, ACT)
        h = layer_norm(self.eps, name="norm1", **kw)(x)
        h = MultiHeadAttention(self.num_heads, fused_qkv=self.fused_qkv, key_bias=self.key_bias,
                               implementation=self.attention_impl, name="attn", **kw)(h, mask=mask, bias=bias)
        h = nn.Dropout(self.dropout)(h, deterministic=not train)
        x = x + DropPath(self.drop_path)(h, deterministic=not train)
        h = layer_norm(self.eps, name="norm2", **kw)(x)
        h = Mlp(self.mlp_dim, self.activation, self.dropout, name="mlp", **kw)(h, deterministic=not train)
        x = x + DropPath(self.drop_path)(h, deterministic=not train)
        x = constrain(x, ACT)
        return (x, None) if self.scanned else x

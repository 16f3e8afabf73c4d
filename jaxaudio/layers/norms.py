"""Normalisation layers with logical axis names."""
import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxaudio.layers.partitioning import param


def layer_norm(eps: float, dtype=jnp.float32, param_dtype=jnp.float32, name=None, use_scale=True,
               use_bias=True) -> nn.LayerNorm:
    """LayerNorm over the last axis (PyTorch's `nn.LayerNorm` semantics: biased variance)."""
    return nn.LayerNorm(
        epsilon=eps, dtype=dtype, param_dtype=param_dtype, name=name,
        use_scale=use_scale, use_bias=use_bias,
        scale_init=param(nn.initializers.ones, ("norm",)),
        bias_init=param(nn.initializers.zeros, ("norm",)))


class RMSNorm(nn.Module):
    """Root-mean-square norm over the last axis (LLaMA's `LlamaRMSNorm`): `x / rms(x) * scale`.

    The statistics run in float32 whatever the compute dtype, as Hugging Face does: in
    bf16 the mean of squares of a 4096-wide activation loses most of its precision.
    `x [..., features]` -> same shape, in `dtype`.
    """
    eps: float = 1e-6
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = self.param("scale", param(nn.initializers.ones, ("norm",)), (x.shape[-1],), self.param_dtype)
        xf = x.astype(jnp.float32)
        y = xf * jax.lax.rsqrt(jnp.mean(jnp.square(xf), axis=-1, keepdims=True) + self.eps)
        return y.astype(self.dtype) * scale.astype(self.dtype)


class BatchNorm(nn.Module):
    """BatchNorm over the last (channel) axis with PyTorch's `BatchNorm2d` semantics.

    Flax's `nn.BatchNorm` stores the *biased* batch variance in its running average;
    PyTorch stores the unbiased one. Checkpoints converted from PyTorch and models trained
    here must keep the same statistics, so this layer follows PyTorch exactly:
    normalise with the biased batch variance, update `var` with the unbiased one, and
    `momentum` is PyTorch's (weight of the new batch).

    Input `[..., channels]`; statistics live in the `batch_stats` collection.

    `mask` (training only; broadcastable to `x.shape[:-1]`, True = counts) takes the batch
    statistics from the masked positions alone, as PyTorch does when the layer runs on a
    gathered subset of rows (CLAP's fusion block sees only the clips flagged longer); with
    no position masked the running statistics stay as they are.
    """
    eps: float = 1e-5
    momentum: float = 0.1
    affine: bool = True
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool, mask: jax.Array | None = None) -> jax.Array:
        c = x.shape[-1]
        mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((c,), jnp.float32))
        var = self.variable("batch_stats", "var", lambda: jnp.ones((c,), jnp.float32))
        xf = x.astype(jnp.float32)
        if train:
            axes = tuple(range(x.ndim - 1))
            if mask is None:
                n = xf.size // c
                m = jnp.mean(xf, axes)
                v = jnp.mean(jnp.square(xf - m), axes)
                unbiased, update = v * n / max(n - 1, 1), True
            else:
                w = jnp.broadcast_to(jnp.asarray(mask, jnp.float32), x.shape[:-1])[..., None]
                n = jnp.sum(w)
                m = jnp.sum(xf * w, axes) / jnp.maximum(n, 1.0)
                v = jnp.sum(jnp.square(xf - m) * w, axes) / jnp.maximum(n, 1.0)
                unbiased, update = v * n / jnp.maximum(n - 1, 1.0), n > 0
            if not self.is_initializing():
                mean.value = jnp.where(update, (1 - self.momentum) * mean.value + self.momentum * m, mean.value)
                var.value = jnp.where(update, (1 - self.momentum) * var.value + self.momentum * unbiased, var.value)
        else:
            m, v = mean.value, var.value
        y = (xf - m) * jax.lax.rsqrt(v + self.eps)
        if self.affine:
            scale = self.param("scale", param(nn.initializers.ones, ("norm",)), (c,), self.param_dtype)
            bias = self.param("bias", param(nn.initializers.zeros, ("norm",)), (c,), self.param_dtype)
            y = y * scale + bias
        return y.astype(self.dtype)

"""Dense layers whose kernels carry logical axis names."""
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxaudio.layers.partitioning import param
from jaxaudio.layers.quant import QTensor, quantized_contract

DEFAULT_KERNEL_INIT = nn.initializers.truncated_normal(0.02)

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    # PyTorch's nn.GELU() is the exact (erf) form; flax's default is the tanh one.
    "gelu": lambda x: nn.gelu(x, approximate=False),
    "gelu_tanh": lambda x: nn.gelu(x, approximate=True),
    "silu": nn.silu,
    "relu": nn.relu,
}


def activation(name: str) -> Callable[[jax.Array], jax.Array]:
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; choose one of {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]


class Dense(nn.Module):
    """`[..., *in] -> [..., *features]`, contracting the last `contract` input axes.

    Like `nn.DenseGeneral`, but the kernel is created at its full shape: DenseGeneral
    initialises a flattened 2-D kernel and reshapes it, which breaks logical-axis
    constraints under a mesh (the names describe the unflattened kernel).

    The kernel may be a `quant.QTensor` (a frozen kernel stored in int8,
    `optim.frozen_storage`): it is dequantised inside the matmul.
    """
    features: tuple[int, ...]
    axes: tuple[str, ...]
    contract: int = 1
    use_bias: bool = True
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    kernel_init: nn.initializers.Initializer = DEFAULT_KERNEL_INIT

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        n_in = self.contract
        shape = tuple(x.shape[-n_in:]) + tuple(self.features)
        # A stored QTensor is read as it is: flax's shape check would compare its first leaf,
        # `q`, with the kernel's shape, which an output-major `q` does not have.
        stored = self.get_variable("params", "kernel") if self.has_variable("params", "kernel") else None
        if isinstance(stored, QTensor):
            if stored.shape != shape:
                raise ValueError(f"{'/'.join(self.scope.path + ('kernel',))}: a quantized kernel of shape "
                                 f"{stored.shape} where the layer needs {shape}")
            y = quantized_contract(x, stored, n_in, self.dtype)
        else:
            kernel = self.param("kernel", param(self.kernel_init, self.axes), shape, self.param_dtype)
            y = jnp.tensordot(x.astype(self.dtype), kernel.astype(self.dtype),
                              axes=(tuple(range(x.ndim - n_in, x.ndim)), tuple(range(n_in))))
        if self.use_bias:
            n_out = len(self.features)
            bias = self.param("bias", param(nn.initializers.zeros, self.axes[-n_out:]), tuple(self.features),
                              self.param_dtype)
            y = y + bias.astype(self.dtype)
        return y


def dense(features: int | Sequence[int], axes: Sequence[str], *, name: str, use_bias: bool = True,
          axis: int | Sequence[int] = -1, dtype=jnp.float32, param_dtype=jnp.float32,
          kernel_init=DEFAULT_KERNEL_INIT) -> Dense:
    """A `Dense` whose kernel is named `axes` (input axes then output axes); the bias takes
    the output part. `axis=-1` contracts the last input axis, `axis=(-2, -1)` the last two."""
    contract = 1 if isinstance(axis, int) else len(axis)
    feats = (features,) if isinstance(features, int) else tuple(features)
    return Dense(feats, tuple(axes), contract=contract, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype,
                 kernel_init=kernel_init, name=name)


def abstract_init(init_variables: Callable[..., Any], *args) -> tuple[Any, dict[str, tuple[int, int]]]:
    """`(jax.eval_shape(init_variables, *args), dense_kernels)`: the abstract variables and,
    from the same trace, `{'/'-joined kernel path inside params: (n_in, n_out)}` for every
    `Dense` the init calls (the contracted and the feature axes; a kernel in a scanned stack
    has a leading layer axis too, which the numbers exclude)."""
    kernels: dict[str, tuple[int, int]] = {}

    def record(next_fun, args, kwargs, context):
        module = context.module
        if context.method_name == "__call__" and isinstance(module, Dense):
            kernels["/".join(module.path) + "/kernel"] = (module.contract, len(module.features))
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(record):
        # A fresh function: eval_shape caches traces by function, and a cached one would
        # not call the modules (nor `record`).
        abstract = jax.eval_shape(lambda *a: init_variables(*a), *args)
    return abstract, kernels


class PatchEmbed(nn.Module):
    """Non-overlapping patches (`patch`: an int, or `(ph, pw)` for rectangles such as CLAP's
    fusion `mel_conv2d`), `[batch, h, w, channels] -> [batch, h // ph, w // pw, features]`:
    `nn.Conv(features, (ph, pw), strides=(ph, pw), padding="VALID")` with the same
    parameters (`kernel [ph, pw, channels, features]`,
    `bias [features]`, created in the same order, so the same rng gives the same values),
    computed as one matrix product over the flattened patches.

    Why not the conv: XLA's CPU backend differentiates a strided conv into a kernel-dilated
    one that runs an order of magnitude slower than the matrix product (36 of the 122 ms
    of the tiny Spatial-AST train step). `axes` names the kernel's four axes; the bias
    takes the last.
    """
    features: int
    patch: int | tuple[int, int]
    axes: tuple[str, str, str, str]
    use_bias: bool = True
    kernel_init: nn.initializers.Initializer = nn.initializers.lecun_normal()
    bias_init: nn.initializers.Initializer = nn.initializers.zeros
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if x.ndim != 4:
            raise ValueError(f"PatchEmbed expects [batch, h, w, channels]; got shape {x.shape}")
        ph, pw = (self.patch, self.patch) if isinstance(self.patch, int) else self.patch
        batch, h, w, channels = x.shape
        kernel = self.param("kernel", param(self.kernel_init, self.axes), (ph, pw, channels, self.features),
                            self.param_dtype)
        grid_h, grid_w = h // ph, w // pw  # VALID: a partial patch at the edge is dropped
        patches = x[:, :grid_h * ph, :grid_w * pw].reshape(batch, grid_h, ph, grid_w, pw, channels)
        y = jnp.einsum("bhpwqc,pqcf->bhwf", patches.astype(self.dtype), kernel.astype(self.dtype))
        if self.use_bias:
            bias = self.param("bias", param(self.bias_init, self.axes[-1:]), (self.features,), self.param_dtype)
            y = y + bias.astype(self.dtype)
        return y


class Mlp(nn.Module):
    """Two-layer feed-forward block: `[..., embed] -> [..., mlp] -> [..., embed]`."""
    hidden_dim: int
    activation: str = "gelu"
    dropout: float = 0.0
    use_bias: bool = True
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
        kw = dict(use_bias=self.use_bias, dtype=self.dtype, param_dtype=self.param_dtype)
        h = dense(self.hidden_dim, ("embed", "mlp"), name="fc1", **kw)(x)
        h = activation(self.activation)(h)
        h = nn.Dropout(self.dropout)(h, deterministic=deterministic)
        y = dense(x.shape[-1], ("mlp", "embed"), name="fc2", **kw)(h)
        return nn.Dropout(self.dropout)(y, deterministic=deterministic)

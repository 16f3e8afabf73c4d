"""Frozen weights stored in int8 with one float32 scale per output channel (QLoRA's idea),
dequantised inside the matmul.

A `QTensor` stands where a `Dense` kernel `[*in, *out]` (or a scanned stack of them,
`[layers, *in, *out]`) would be: `q` int8 of the kernel's shape and `scale` float32 of the
kernel's rank with size 1 on the contracted input axes, so `q * scale` is the kernel.
Symmetric absmax: `scale = max|w| / 127` over the input axes, `q = round(w / scale)`.

Only frozen weights are stored this way (`optim.frozen_storage="llm=int8"`): the matmul's
backward gives the input's gradient only.
"""
import dataclasses
import functools
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np

QMAX = 127


@flax.struct.dataclass
class QTensor:
    """`q` int8 `[*shape]`, `scale` float32 `[*shape]` with 1 on the reduced (input) axes."""
    q: Any
    scale: Any

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.q.shape)

    @property
    def ndim(self) -> int:
        return len(self.q.shape)

    @property
    def size(self) -> int:
        return int(np.prod(self.q.shape))

    @property
    def dtype(self) -> np.dtype:
        """The dequantised value's dtype."""
        return np.dtype(np.float32)

    @property
    def reduce_axes(self) -> tuple[int, ...]:
        """The axes the scale was taken over (those where it has size 1; an output axis of
        size 1 counts too, which quantizes the same)."""
        return tuple(i for i, n in enumerate(self.scale.shape) if n == 1)

    def dequantize(self, dtype=jnp.float32) -> jax.Array:
        """The kernel `[*shape]` in `dtype` (numpy when `q` is numpy)."""
        return self.q.astype(dtype) * self.scale.astype(dtype)


@dataclasses.dataclass(frozen=True)
class Int8:
    """Storage label (`optim.storage_dtypes`): quantize this parameter over `reduce_axes`."""
    reduce_axes: tuple[int, ...]

    def __str__(self) -> str:
        return f"int8{list(self.reduce_axes)}"


def kernel_reduce_axes(ndim: int, n_in: int, n_out: int) -> tuple[int, ...]:
    """The input axes of a stored kernel of rank `ndim`: `[*lead, *in, *out]`, where the
    leading axes (a scanned stack's layer axis) keep their own scales."""
    return tuple(range(ndim - n_out - n_in, ndim - n_out))


def quantize(w: Any, reduce_axes: tuple[int, ...]) -> QTensor:
    """`w` as int8 with one scale per index of the axes not in `reduce_axes`. numpy in,
    numpy out (a host-side checkpoint stays on the host); a jax array gives jax arrays."""
    xp = np if isinstance(w, np.ndarray) else jnp
    w = w.astype(np.float32)
    amax = xp.max(xp.abs(w), axis=tuple(reduce_axes), keepdims=True)
    scale = xp.where(amax > 0, amax / QMAX, 1.0).astype(np.float32)  # a zero column: q = 0, no NaN
    q = xp.clip(xp.round(w / scale), -QMAX, QMAX).astype(np.int8)
    return QTensor(q=q, scale=scale)


def is_quantized(x: Any) -> bool:
    """A QTensor, or the `{"q", "scale"}` dict a checkpoint restored without a target gives."""
    if isinstance(x, QTensor):
        return True
    return (isinstance(x, dict) and set(x) == {"q", "scale"}
            and np.issubdtype(np.dtype(getattr(x["q"], "dtype", np.float32)), np.integer))


def dequantize_tree(tree: Any, dtype=np.float32) -> Any:
    """Every quantized leaf (`is_quantized`) of `tree` as a `dtype` array (numpy leaves stay
    numpy); everything else unchanged."""
    def one(x):
        if not is_quantized(x):
            return x
        return (x if isinstance(x, QTensor) else QTensor(x["q"], x["scale"])).dequantize(dtype)
    return jax.tree.map(one, tree, is_leaf=is_quantized)


def quantized_contract(x: jax.Array, kernel: QTensor, n_in: int, dtype) -> jax.Array:
    """`x [..., *in] . kernel [*in, *out] -> [..., *out]` in `dtype`, contracting the last
    `n_in` axes of `x`, with the kernel dequantised inside the product.

    Differentiable in `x` only (the kernel is frozen: its cotangents are zero). The backward
    keeps `q` and `scale` as residuals, never a float copy of the kernel."""
    if kernel.scale.shape[:n_in] != (1,) * n_in or kernel.scale.shape[n_in:] != kernel.shape[n_in:]:
        raise ValueError(f"quantized kernel {kernel.shape}: scale {kernel.scale.shape} is not per output "
                         f"channel over {n_in} input axes")
    scale = kernel.scale.reshape(kernel.shape[n_in:]).astype(dtype)  # broadcasts over [..., *out]
    return _contract(n_in, jnp.dtype(dtype), x.astype(dtype), kernel.q, scale)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _contract(n_in: int, dtype, x: jax.Array, q: jax.Array, scale: jax.Array) -> jax.Array:
    """`x [..., *in]`, `q [*in, *out]` int8, `scale [*out]` -> `[..., *out]`."""
    y = jnp.tensordot(x, q.astype(dtype), axes=(tuple(range(x.ndim - n_in, x.ndim)), tuple(range(n_in))))
    return y * scale


def _contract_fwd(n_in, dtype, x, q, scale):
    # Residuals: the stored int8 weight and its scales only. Plain autodiff would keep
    # `q.astype(dtype)`, a weight-sized float per layer, for the backward.
    return _contract(n_in, dtype, x, q, scale), (q, scale)


def _contract_bwd(n_in, dtype, res, g):
    # The barrier asks XLA not to merge this dequantisation with the forward's (CSE), which
    # would keep the forward's float copy alive until here: the residual avoided above. (XLA's
    # CPU pipeline removes barriers early and may merge them anyway.)
    q, scale = jax.lax.optimization_barrier(res)
    n_out = q.ndim - n_in
    gs = g * scale  # d(y)/d(x . q) is the scale, per output channel
    batch = gs.ndim - n_out
    dx = jnp.tensordot(gs, q.astype(dtype), axes=(tuple(range(batch, gs.ndim)), tuple(range(n_in, q.ndim))))
    return dx, None, None  # the frozen weight gets no cotangent (zero)


_contract.defvjp(_contract_fwd, _contract_bwd)

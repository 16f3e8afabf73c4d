"""Frozen weights stored in int8 with one float32 scale per output channel (QLoRA's idea),
dequantised inside the matmul.

A `QTensor` stands where a `Dense` kernel `[*in, *out]` (or a scanned stack of them,
`[layers, *in, *out]`) would be: `scale` float32 of the kernel's rank with size 1 on the
contracted input axes, and `q` int8 of the kernel's shape, so `q * scale` is the kernel —
except for a kernel with one input axis and several output axes (attention's per-head
projections `[embed, heads, head_dim]`), whose `q` is stored output-major as
`[heads * head_dim, embed]` (`[layers, heads * head_dim, embed]` stacked). Why: on TPU the
per-head matmul wants the heads outermost; given `[embed, heads, head_dim]`, XLA re-laid out
every such int8 weight once before a decoding loop — a copy of all query/key/value weights
(measured: 0.08 GiB per 13B-wide layer). The two forms tell themselves apart by rank (the
output-major `q` has fewer axes than `scale`), so a checkpoint carries its own layout.
Symmetric absmax: `scale = max|w| / 127` over the input axes, `q = round(w / scale)`.

Only frozen weights are stored this way (`optim.frozen_storage="llm=int8"`): the matmul's
backward gives the input's gradient only. A frozen per-head projection stored in a float
dtype (`"llm=bfloat16"`) is a `QTensor` too, `q` in that dtype, output-major, with scales of
1: the same layout, for the same reason (one 16 GiB v5e chip, BAT-7B with bf16 frozen
parts, scanned: 16.70 GB before, does not fit; 14.03 GiB after).
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
    """`scale` float32 `[*shape]` with 1 on the reduced (input) axes; `q` int8 `[*shape]`, or
    `[*lead, prod(out), in]` when `output_major` (see the module docstring); a float `q`
    (always output-major) has scales of 1."""
    q: Any
    scale: Any

    @property
    def output_major(self) -> bool:
        return len(self.q.shape) < len(self.scale.shape)

    @property
    def shape(self) -> tuple[int, ...]:
        """The kernel's shape `[*lead, *in, *out]`."""
        if not self.output_major:
            return tuple(self.q.shape)
        lead = tuple(self.q.shape[:-2])
        return lead + (self.q.shape[-1],) + tuple(self.scale.shape[len(lead) + 1:])

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
        """The axes the scale was taken over: the input axis of an output-major kernel, else
        those where the scale has size 1 (an output axis of size 1 counts too, which
        quantizes the same)."""
        if self.output_major:
            return (len(self.q.shape) - 2,)
        return tuple(i for i, n in enumerate(self.scale.shape) if n == 1)

    def dequantize(self, dtype=jnp.float32) -> jax.Array:
        """The kernel `[*shape]` in `dtype` (numpy when `q` is numpy)."""
        q = self.q
        if self.output_major:
            q = q.swapaxes(-1, -2).reshape(self.shape)
        return q.astype(dtype) * self.scale.astype(dtype)


@dataclasses.dataclass(frozen=True)
class StoredKernel:
    """Storage label (`optim.storage_dtypes`): keep this kernel (of rank `ndim`, contracted
    over `reduce_axes`) as a `QTensor` — int8 quantized, or (a float `dtype`) output-major."""
    dtype: str
    reduce_axes: tuple[int, ...]
    ndim: int

    def __str__(self) -> str:
        return f"{self.dtype}{list(self.reduce_axes)}"


def store(w: Any, how: StoredKernel) -> QTensor:
    """`w` kept as `how` says: `quantize`d for int8, else `as_output_major` in `how.dtype`."""
    if how.dtype == "int8":
        return quantize(w, how.reduce_axes)
    if not output_major(how.ndim, how.reduce_axes):
        raise ValueError(f"a {how.dtype} kernel is kept as a QTensor only output-major; got {how}")
    xp = np if isinstance(w, np.ndarray) else jnp
    scale = xp.ones(tuple(1 if i in how.reduce_axes else n for i, n in enumerate(w.shape)), np.float32)
    return QTensor(q=as_output_major(w.astype(jnp.dtype(how.dtype)), how.reduce_axes[0]), scale=scale)


def stored_as(kernel: QTensor) -> StoredKernel:
    """The label a stored kernel was made with."""
    dtype = "int8" if np.issubdtype(np.dtype(kernel.q.dtype), np.integer) else np.dtype(kernel.q.dtype).name
    return StoredKernel(dtype, kernel.reduce_axes, len(kernel.shape))


def kernel_reduce_axes(ndim: int, n_in: int, n_out: int) -> tuple[int, ...]:
    """The input axes of a stored kernel of rank `ndim`: `[*lead, *in, *out]`, where the
    leading axes (a scanned stack's layer axis) keep their own scales."""
    return tuple(range(ndim - n_out - n_in, ndim - n_out))


def output_major(ndim: int, reduce_axes: tuple[int, ...]) -> bool:
    """Whether a kernel of rank `ndim` quantized over `reduce_axes` stores `q` output-major:
    one input axis followed by several output axes."""
    return len(reduce_axes) == 1 and ndim - reduce_axes[0] - 1 >= 2


def stored_q_spec(spec: tuple, ndim: int, reduce_axes: tuple[int, ...]) -> tuple:
    """The kernel's partition spec (one entry per axis) for its stored `q`: unchanged, or for
    an output-major `q` `[*lead, out, in]` the output axes' mesh axes on the flat output
    axis (heads-major, so sharding it shards the heads)."""
    spec = tuple(spec) + (None,) * (ndim - len(spec))
    if not output_major(ndim, reduce_axes):
        return spec
    (a,) = reduce_axes
    mesh_axes = tuple(m for entry in spec[a + 1:] if entry is not None
                      for m in (entry if isinstance(entry, tuple) else (entry,)))
    out = None if not mesh_axes else mesh_axes[0] if len(mesh_axes) == 1 else mesh_axes
    return spec[:a] + (out, spec[a])


def as_output_major(q: Any, n_lead: int) -> Any:
    """A kernel-order `q [*lead, in, *out]` as the output-major `[*lead, prod(out), in]`."""
    return q.reshape(tuple(q.shape[:n_lead + 1]) + (-1,)).swapaxes(-1, -2)


def output_major_shape(shape: tuple[int, ...], n_lead: int) -> tuple[int, ...]:
    """The shape `as_output_major` gives a kernel-order `q` of `shape`."""
    return tuple(shape[:n_lead]) + (int(np.prod(shape[n_lead + 1:])), shape[n_lead])


def quantize(w: Any, reduce_axes: tuple[int, ...]) -> QTensor:
    """`w` as int8 with one scale per index of the axes not in `reduce_axes` (`q`
    output-major where `output_major` says). numpy in, numpy out (a host-side checkpoint
    stays on the host); a jax array gives jax arrays."""
    xp = np if isinstance(w, np.ndarray) else jnp
    w = w.astype(np.float32)
    amax = xp.max(xp.abs(w), axis=tuple(reduce_axes), keepdims=True)
    scale = xp.where(amax > 0, amax / QMAX, 1.0).astype(np.float32)  # a zero column: q = 0, no NaN
    q = xp.clip(xp.round(w / scale), -QMAX, QMAX).astype(np.int8)
    if output_major(w.ndim, tuple(reduce_axes)):
        q = as_output_major(q, reduce_axes[0])
    return QTensor(q=q, scale=scale)


def is_quantized(x: Any) -> bool:
    """A QTensor, or the `{"q", "scale"}` dict a checkpoint restored without a target gives
    (int8 `q`, or a float `q` with fewer axes than `scale`: output-major)."""
    if isinstance(x, QTensor):
        return True
    if not (isinstance(x, dict) and set(x) == {"q", "scale"}):
        return False
    q, scale = x["q"], x["scale"]
    return (np.issubdtype(np.dtype(getattr(q, "dtype", np.float32)), np.integer)
            or len(getattr(q, "shape", ())) < len(getattr(scale, "shape", ())))


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
    shape = kernel.shape
    if (kernel.scale.shape[:n_in] != (1,) * n_in or kernel.scale.shape[n_in:] != shape[n_in:]
            or (kernel.output_major and n_in != 1)):
        raise ValueError(f"quantized kernel {shape} (q {kernel.q.shape}): scale {kernel.scale.shape} is not per "
                         f"output channel over {n_in} input axes")
    out = shape[n_in:]
    if kernel.output_major:  # q [prod(out), in]: a flat product, reshaped to the output axes after
        scale = kernel.scale.reshape(-1).astype(dtype)
        y = _contract(1, True, jnp.dtype(dtype), x.astype(dtype), kernel.q, scale)
        return y.reshape(y.shape[:-1] + out)
    scale = kernel.scale.reshape(out).astype(dtype)  # broadcasts over [..., *out]
    return _contract(n_in, False, jnp.dtype(dtype), x.astype(dtype), kernel.q, scale)


def _q_axes(n_in: int, output_major: bool, q_ndim: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """`q`'s (input axes, output axes)."""
    if output_major:  # [out, in]
        return (1,), (0,)
    return tuple(range(n_in)), tuple(range(n_in, q_ndim))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _contract(n_in: int, output_major: bool, dtype, x: jax.Array, q: jax.Array, scale: jax.Array) -> jax.Array:
    """`x [..., *in]`, `q [*in, *out]` (or `[out, in]` output-major) int8, `scale [*out]` ->
    `[..., *out]`."""
    q_in, _ = _q_axes(n_in, output_major, q.ndim)
    y = jnp.tensordot(x, q.astype(dtype), axes=(tuple(range(x.ndim - n_in, x.ndim)), q_in))
    return y * scale


def _contract_fwd(n_in, output_major, dtype, x, q, scale):
    # Residuals: the stored int8 weight and its scales only. Plain autodiff would keep
    # `q.astype(dtype)`, a weight-sized float per layer, for the backward.
    return _contract(n_in, output_major, dtype, x, q, scale), (q, scale)


def _contract_bwd(n_in, output_major, dtype, res, g):
    # The barrier asks XLA not to merge this dequantisation with the forward's (CSE), which
    # would keep the forward's float copy alive until here: the residual avoided above. (XLA's
    # CPU pipeline removes barriers early and may merge them anyway.)
    q, scale = jax.lax.optimization_barrier(res)
    _, q_out = _q_axes(n_in, output_major, q.ndim)
    gs = g * scale  # d(y)/d(x . q) is the scale, per output channel
    batch = gs.ndim - len(q_out)
    dx = jnp.tensordot(gs, q.astype(dtype), axes=(tuple(range(batch, gs.ndim)), q_out))
    return dx, None, None  # the frozen weight gets no cotangent (zero)


_contract.defvjp(_contract_fwd, _contract_bwd)

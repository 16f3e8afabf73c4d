"""PyTorch-compatible bicubic resizing along one axis, as a matrix.

Spatial-AST stretches its (time, mel) input to 1024 frames with
`F.interpolate(mode='bicubic', align_corners=True)`. `jax.image.resize(method='cubic')`
does not reproduce that: it uses the Keys kernel with a = -0.5 and half-pixel centres,
whereas PyTorch uses a = -0.75 and, with align_corners, maps output i to input
i * (in - 1) / (out - 1). The resampling is linear, so it is a fixed `[out, in]`
matrix built once in numpy and applied with an einsum.
"""

import jax
import jax.numpy as jnp
import numpy as np

# PyTorch's cubic convolution coefficient (upsample_bicubic2d).
_A = -0.75


def _cubic_weights(t: np.ndarray) -> np.ndarray:
    """Keys cubic weights of the taps at offsets -1, 0, 1, 2 for fractions t: `[n, 4]`."""
    def near(d):  # |d| <= 1
        return ((_A + 2) * d - (_A + 3)) * d * d + 1

    def far(d):  # 1 < |d| < 2
        return ((_A * d - 5 * _A) * d + 8 * _A) * d - 4 * _A

    return np.stack([far(t + 1), near(t), near(1 - t), far(2 - t)], axis=-1)


def bicubic_matrix(in_size: int, out_size: int) -> np.ndarray:
    """Matrix of torch bicubic interpolation with align_corners=True along one axis.

    Source coordinate of output i is i * (in_size - 1) / (out_size - 1) (0 when
    out_size == 1); the four taps around it are clamped to [0, in_size - 1], as PyTorch
    does at the borders, so weights of clamped taps add up on the edge sample.

    Returns:
        float32 `[out_size, in_size]`; the identity when in_size == out_size.
    """
    if in_size < 1 or out_size < 1:
        raise ValueError(f'sizes must be positive, got {in_size} -> {out_size}')
    # PyTorch computes the scale and the source coordinate in float32. Its rounding
    # error grows with i (about 6e-5 of a sample at i = 1000), enough to move outputs
    # of noisy inputs by 2e-4, so it is reproduced here rather than done in float64.
    scale = np.float32((in_size - 1) / (out_size - 1) if out_size > 1 else 0.0)
    src = np.arange(out_size, dtype=np.float32) * scale
    base = np.floor(src).astype(np.int64)
    weights = _cubic_weights((src - base.astype(np.float32)).astype(np.float64))
    taps = np.clip(base[:, None] + np.arange(-1, 3)[None, :], 0, in_size - 1)
    matrix = np.zeros((out_size, in_size))
    np.add.at(matrix, (np.repeat(np.arange(out_size), 4), taps.ravel()), weights.ravel())
    return matrix.astype(np.float32)


def resize_axis(x: jax.Array, out_size: int, axis: int) -> jax.Array:
    """Resizes `x` along `axis` to `out_size` like torch bicubic, align_corners=True.

    Args:
        x: any shape, e.g. `[batch, frames, mel, channels]` with axis=1.

    Returns:
        `x` with `x.shape[axis]` replaced by `out_size`; `x` itself if the size is
        unchanged (the matrix would be the identity).
    """
    axis = axis % x.ndim
    in_size = x.shape[axis]
    if in_size == out_size:
        return x
    matrix = jnp.asarray(bicubic_matrix(in_size, out_size), x.dtype)
    moved = jnp.moveaxis(x, axis, -1)
    out = jnp.einsum('...i,oi->...o', moved, matrix, precision=jax.lax.Precision.HIGHEST)
    return jnp.moveaxis(out, -1, axis)

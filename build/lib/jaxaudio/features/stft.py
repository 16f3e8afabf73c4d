"""Short-time Fourier transform as a matmul with DFT kernels (torchlibrosa style).

Spatial-AST computes its STFT with a frozen Conv1d whose weights are the windowed DFT
matrix (torchlibrosa's `STFT`). Here the same kernels are built in numpy and applied to
framed audio with one matmul, which XLA runs well on CPU, GPU and TPU.

Sign convention: the kernels are the real and imaginary parts of
`window[n] * exp(-2j*pi*n*k/n_fft)`, the same as `torch.stft`, `librosa.stft` and the
original, so `imag` equals `torch.stft(...).imag` (not its negation).
"""

import math

import jax
import jax.numpy as jnp
import numpy as np

# Above this many blocks per frame, framing by strided slices makes the traced program
# large; an index gather is used instead.
_MAX_SLICES = 64


def hann_window(n: int) -> np.ndarray:
    """Periodic Hann window, as librosa `get_window('hann', n, fftbins=True)`.

    Returns:
        float64 `[n]`.
    """
    return 0.5 - 0.5 * np.cos(2.0 * np.pi * np.arange(n) / n)


def dft_kernels(n_fft: int, win_length: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Windowed one-sided DFT kernels.

    The Hann window of `win_length` samples is zero-padded to `n_fft` in the centre, as
    librosa's `pad_center` does.

    Returns:
        (real, imag), float32 `[n_fft, n_fft // 2 + 1]`; `frames @ real` is the real part
        of the STFT. These are the transposes of torchlibrosa's
        `conv_real.weight[:, 0, :]` and `conv_imag.weight[:, 0, :]`.
    """
    win_length = n_fft if win_length is None else win_length
    if not 0 < win_length <= n_fft:
        raise ValueError(f'win_length {win_length} must be in [1, n_fft={n_fft}]')
    window = np.zeros(n_fft)
    left = (n_fft - win_length) // 2
    window[left:left + win_length] = hann_window(win_length)
    n = np.arange(n_fft)[:, None]
    k = np.arange(n_fft // 2 + 1)[None, :]
    # Reducing n*k modulo n_fft keeps the float64 angle exact for large n_fft.
    angle = -2.0 * np.pi * ((n * k) % n_fft) / n_fft
    real = window[:, None] * np.cos(angle)
    imag = window[:, None] * np.sin(angle)
    return real.astype(np.float32), imag.astype(np.float32)


def _frame(x: jax.Array, n_fft: int, hop: int, num_frames: int) -> jax.Array:
    """Cuts `[..., time]` into `[..., num_frames, n_fft]` with frame f at `f * hop`.

    The signal is viewed as blocks of g = gcd(n_fft, hop) samples; frame f is then blocks
    `f*hop/g ... f*hop/g + n_fft/g - 1`, which is n_fft/g strided slices and no gather
    (for the Spatial-AST setting, 1024/320, that is 16 slices of 64 samples).
    """
    g = math.gcd(n_fft, hop)
    stride, width = hop // g, n_fft // g
    used = (num_frames - 1) * hop + n_fft
    x = x[..., :used]
    if width > _MAX_SLICES:
        index = np.arange(num_frames)[:, None] * hop + np.arange(n_fft)[None, :]
        return x[..., index]
    blocks = x.reshape(*x.shape[:-1], used // g, g)
    span = (num_frames - 1) * stride + 1
    parts = [blocks[..., j:j + span:stride, :] for j in range(width)]
    frames = jnp.stack(parts, axis=-2)  # [..., num_frames, width, g]
    return frames.reshape(*frames.shape[:-2], n_fft)


def stft(
    x: jax.Array,
    real_kernel: jax.Array | np.ndarray,
    imag_kernel: jax.Array | np.ndarray,
    hop: int,
    center: bool = True,
    pad_mode: str = 'reflect',
    method: str = 'fft',
) -> tuple[jax.Array, jax.Array]:
    """STFT of real signals with the kernels from `dft_kernels`.

    `method='matmul'` multiplies the frames by the kernels, as the original's Conv1d
    does (one big matmul: the fast path on TPU); `method='fft'` windows the frames with
    the kernels' window (`real_kernel[:, 0]`) and takes an rFFT, about 10x faster on
    CPU and GPU and as accurate (it rounds less).

    Args:
        x: `[..., time]` real signals.
        real_kernel, imag_kernel: `[n_fft, n_fft // 2 + 1]`.
        hop: hop length in samples.
        center: pad `n_fft // 2` samples on each side first (librosa / torch default).
        pad_mode: 'reflect' (edge sample not repeated, like torch and librosa) or
            'constant' (zeros).
        method: 'fft' or 'matmul'.

    Returns:
        (real, imag), each `[..., frames, n_fft // 2 + 1]`, where
        frames = 1 + (padded_time - n_fft) // hop, i.e. 1 + time // hop for centred
        frames and even n_fft (1001 frames for 320000 samples at hop 320).
    """
    n_fft = real_kernel.shape[0]
    if center:
        pad = n_fft // 2
        if pad_mode == 'reflect' and x.shape[-1] <= pad:
            raise ValueError(f'reflect padding of {pad} needs more than {pad} samples, '
                             f'got {x.shape[-1]}')
        widths = [(0, 0)] * (x.ndim - 1) + [(pad, pad)]
        x = jnp.pad(x, widths, mode=pad_mode)
    if x.shape[-1] < n_fft:
        raise ValueError(f'signal of {x.shape[-1]} samples is shorter than n_fft={n_fft}')
    num_frames = 1 + (x.shape[-1] - n_fft) // hop
    frames = _frame(x, n_fft, hop, num_frames)
    if method == 'fft':
        spec = jnp.fft.rfft(frames * jnp.asarray(real_kernel[:, 0], x.dtype), n=n_fft, axis=-1)
        return jnp.real(spec).astype(x.dtype), jnp.imag(spec).astype(x.dtype)
    if method != 'matmul':
        raise ValueError(f"stft method must be 'fft' or 'matmul', got {method!r}")
    hi = jax.lax.Precision.HIGHEST
    # One matmul against [real | imag] reads the frames once.
    kernel = jnp.concatenate([jnp.asarray(real_kernel, x.dtype), jnp.asarray(imag_kernel, x.dtype)], axis=1)
    out = jnp.matmul(frames, kernel, precision=hi)
    n_freq = real_kernel.shape[1]
    return out[..., :n_freq], out[..., n_freq:]

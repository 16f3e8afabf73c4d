"""Spatial-AST's binaural front end: per-ear log-mel and mel-projected IPD.

Layout is channels-last (NHWC with H = time, W = mel) because the model is Flax; the
original builds the same four maps channels-first, `[batch, 4, frames, mel]`. The
per-ear BatchNorm on the log-mel and the bicubic stretch to 1024 frames belong to the
model and are not done here.
"""

import jax
import jax.numpy as jnp
import numpy as np

from jaxaudio.features.mel import amplitude_to_db
from jaxaudio.features.stft import stft


def binaural_features(
    wave: jax.Array,
    real_kernel: jax.Array | np.ndarray,
    imag_kernel: jax.Array | np.ndarray,
    mel_fb: jax.Array | np.ndarray,
    hop: int,
    stft_method: str = 'fft',
) -> tuple[jax.Array, jax.Array]:
    """Log-mel magnitude of each ear and the interaural phase difference on the mel axis.

    Args:
        wave: `[batch, 2, time]`, channel 0 = left, 1 = right.
        real_kernel, imag_kernel: `[n_fft, freq]` from `stft.dft_kernels`.
        mel_fb: `[freq, mel]` from `mel.mel_filterbank`.
        hop: STFT hop in samples.
        stft_method: 'fft' or 'matmul' (see `stft.stft`).

    Returns:
        logmel: `[batch, frames, mel, 2]`, 10 * log10(max(|X| @ mel_fb, 1e-10)) for
            left then right. |X| is the magnitude, not the power, as in the original.
        ipd_mel: `[batch, frames, mel, 2]`, [cos(IPD) @ mel_fb, sin(IPD) @ mel_fb] with
            IPD = phase(right) - phase(left), not wrapped to (-pi, pi] (cos and sin do
            not need it).
    """
    if wave.ndim != 3 or wave.shape[1] != 2:
        raise ValueError(f'wave must be [batch, 2, time], got {wave.shape}')
    hi = jax.lax.Precision.HIGHEST
    mel_fb = jnp.asarray(mel_fb, wave.dtype)
    real, imag = stft(wave, real_kernel, imag_kernel, hop, method=stft_method)  # [batch, 2, frames, freq]
    magnitude = jnp.sqrt(real ** 2 + imag ** 2)
    logmel = amplitude_to_db(jnp.matmul(magnitude, mel_fb, precision=hi))
    # cos/sin of the phase difference from unit phasors: the same values as
    # cos(atan2(im_R, re_R) - atan2(im_L, re_L)) without the trigonometry, which XLA's
    # CPU backend runs ~40x slower. A zero bin has phase 0 (atan2(0, 0)), i.e. (1, 0).
    nonzero = magnitude > 0
    safe = jnp.where(nonzero, magnitude, 1.0)
    c = jnp.where(nonzero, real / safe, 1.0)
    s = jnp.where(nonzero, imag / safe, 0.0)
    cos_ipd = c[:, 1] * c[:, 0] + s[:, 1] * s[:, 0]  # [batch, frames, freq]
    sin_ipd = s[:, 1] * c[:, 0] - c[:, 1] * s[:, 0]
    cos_mel = jnp.matmul(cos_ipd, mel_fb, precision=hi)
    sin_mel = jnp.matmul(sin_ipd, mel_fb, precision=hi)
    return jnp.moveaxis(logmel, 1, -1), jnp.stack([cos_mel, sin_mel], axis=-1)

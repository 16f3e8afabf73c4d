"""Mel filterbank (librosa's construction, in numpy) and decibel conversion."""

import jax
import jax.numpy as jnp
import numpy as np

# Slaney's auditory-toolbox mel scale: linear below 1 kHz, logarithmic above.
_F_SP = 200.0 / 3
_MIN_LOG_HZ = 1000.0
_MIN_LOG_MEL = _MIN_LOG_HZ / _F_SP
_LOGSTEP = np.log(6.4) / 27.0


def hz_to_mel(freqs: np.ndarray, htk: bool = False) -> np.ndarray:
    """Hz to mel, as `librosa.hz_to_mel` (Slaney scale unless `htk`)."""
    freqs = np.asarray(freqs, dtype=np.float64)
    if htk:
        return 2595.0 * np.log10(1.0 + freqs / 700.0)
    log_part = _MIN_LOG_MEL + np.log(np.maximum(freqs, _MIN_LOG_HZ) / _MIN_LOG_HZ) / _LOGSTEP
    return np.where(freqs >= _MIN_LOG_HZ, log_part, freqs / _F_SP)


def mel_to_hz(mels: np.ndarray, htk: bool = False) -> np.ndarray:
    """Mel to Hz, the inverse of `hz_to_mel`."""
    mels = np.asarray(mels, dtype=np.float64)
    if htk:
        return 700.0 * (10.0 ** (mels / 2595.0) - 1.0)
    log_part = _MIN_LOG_HZ * np.exp(_LOGSTEP * (np.maximum(mels, _MIN_LOG_MEL) - _MIN_LOG_MEL))
    return np.where(mels >= _MIN_LOG_MEL, log_part, _F_SP * mels)


def mel_filterbank(
    sr: int,
    n_fft: int,
    n_mels: int,
    fmin: float = 0.0,
    fmax: float | None = None,
    htk: bool = False,
    norm: str | None = 'slaney',
) -> np.ndarray:
    """Triangular mel filters, equal to `librosa.filters.mel(...).T`.

    Args:
        norm: 'slaney' scales each triangle to unit area (librosa default); None leaves
            peaks at 1.

    Returns:
        float32 `[n_fft // 2 + 1, n_mels]`, so `spectrum @ fb` maps `[..., freq]` to
        `[..., mel]`.
    """
    if norm not in ('slaney', None):
        raise ValueError(f"norm must be 'slaney' or None, got {norm!r}")
    fmax = sr / 2.0 if fmax is None else float(fmax)
    fft_freqs = np.linspace(0.0, sr / 2.0, 1 + n_fft // 2)
    # n_mels + 2 band edges evenly spaced in mel.
    edges = mel_to_hz(np.linspace(hz_to_mel(fmin, htk), hz_to_mel(fmax, htk), n_mels + 2), htk)
    widths = np.diff(edges)
    ramps = edges[:, None] - fft_freqs[None, :]
    rising = -ramps[:-2] / widths[:-1, None]
    falling = ramps[2:] / widths[1:, None]
    weights = np.maximum(0.0, np.minimum(rising, falling))
    if norm == 'slaney':
        weights *= (2.0 / (edges[2:] - edges[:-2]))[:, None]
    return weights.T.astype(np.float32)


def amplitude_to_db(x: jax.Array, amin: float = 1e-10) -> jax.Array:
    """`10 * log10(max(x, amin))` elementwise, reference 1 and no top_db clipping.

    The factor is 10 although Spatial-AST feeds it mel-filtered *magnitudes*: that is
    what the original's `power_to_db` does, and the pretrained weights expect it.
    """
    return 10.0 * jnp.log10(jnp.maximum(x, amin))

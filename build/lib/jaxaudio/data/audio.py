"""Reading, writing and conditioning audio files.

Arrays are channels-first, `[channels, time]` float32, the layout the front ends expect.
"""

from __future__ import annotations

import logging
import math
import os

import numpy as np
import soundfile as sf
import soxr
from scipy import signal
from scipy.io import wavfile

_LOG = logging.getLogger(__name__)
# (file rate, target rate) pairs already reported, so a dataset stored at the wrong rate
# logs one line instead of one per clip.
_RESAMPLE_LOGGED: set[tuple[int, int]] = set()


class AudioError(ValueError):
    """An audio file that cannot be used; the message names the file."""


def load_audio(
    path: str | os.PathLike,
    sample_rate: int,
    channels: int | None = None,
    resampler: str = "soxr",
) -> np.ndarray:
    """Reads an audio file at `sample_rate`.

    Args:
        path: any format libsndfile reads (wav, flac, ogg, ...).
        sample_rate: the rate to return; files at another rate are resampled.
        channels: the channel count the caller needs, or None to accept any.
        resampler: "soxr" (high quality) or "poly" (`scipy.signal.resample_poly`, what the
            Spatial-AST and SLAM-LLM datasets use).

    Returns:
        float32 `[channels, time]`.

    Raises:
        AudioError: the file is missing or unreadable, empty, holds NaN/Inf, or has a
            channel count other than `channels`.
    """
    try:
        data, rate = sf.read(os.fspath(path), dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, OSError) as e:
        raise AudioError(f"cannot read audio file {path}: {e}") from e
    x = np.ascontiguousarray(data.T)  # soundfile gives [time, channels]
    if x.shape[1] == 0:
        raise AudioError(f"audio file {path} is empty (0 samples)")
    if not np.all(np.isfinite(x)):
        raise AudioError(f"audio file {path} contains NaN or Inf samples")
    if channels is not None and x.shape[0] != channels:
        if x.shape[0] == 1 and channels == 2:
            raise AudioError(
                f"audio file {path} is mono but the binaural model needs 2 channels")
        raise AudioError(f"audio file {path} has {x.shape[0]} channels, expected {channels}")
    if rate != sample_rate:
        if (rate, sample_rate) not in _RESAMPLE_LOGGED:
            _RESAMPLE_LOGGED.add((rate, sample_rate))
            _LOG.warning(
                "resampling audio from %d Hz to %d Hz (first seen in %s); store the data "
                "at %d Hz to skip this work", rate, sample_rate, path, sample_rate)
        x = resample(x, rate, sample_rate, resampler)
    return x


def resample(x: np.ndarray, rate: int, target_rate: int, method: str = "soxr") -> np.ndarray:
    """Resamples `[..., time]` from `rate` to `target_rate` Hz.

    Returns:
        float32 `[..., time * target_rate / rate]` (rounded by the resampler).
    """
    if method == "soxr":
        flat = x.reshape(-1, x.shape[-1])
        out = soxr.resample(flat.T, rate, target_rate)  # soxr wants [time, channels]
        return np.ascontiguousarray(out.T, dtype=np.float32).reshape(*x.shape[:-1], -1)
    if method == "poly":
        # resample_poly(x, 32000, sr) as the originals call it; the gcd is taken here too.
        g = math.gcd(int(rate), int(target_rate))
        out = signal.resample_poly(x, target_rate // g, rate // g, axis=-1)
        return out.astype(np.float32)
    raise ValueError(f"unknown resampler {method!r}; use 'soxr' or 'poly'")


def fit_length(x: np.ndarray, n: int) -> np.ndarray:
    """Zero-pads or crops the last axis of `[..., time]` at the end to exactly `n` samples."""
    t = x.shape[-1]
    if t >= n:
        return x[..., :n]
    return np.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, n - t)])


def normalize_rms(x: np.ndarray, target_dbfs: float = -14.0) -> np.ndarray:
    """Scales `x` (any shape) so its RMS over all samples is `target_dbfs` dB full scale.

    The arithmetic of the Spatial-AST / SLAM-LLM `normalize_audio`: silence comes back
    unchanged, otherwise gain = 10 ** ((target - 20 log10 rms) / 20).
    """
    rms = np.sqrt(np.mean(x**2))
    if rms == 0:
        return x
    gain_db = target_dbfs - 20 * np.log10(rms)
    return x * 10 ** (gain_db / 20)


def write_wav(path: str | os.PathLike, x: np.ndarray, sample_rate: int) -> None:
    """Writes `[channels, time]` (or `[time]` for mono) as a 32-bit float wav, losslessly.

    The parent folder is created if needed. scipy writes it rather than libsndfile, whose
    float wavs carry a PEAK chunk with a timestamp: the same audio written a second later
    would not be byte-identical.
    """
    x = np.asarray(x, dtype=np.float32)
    if x.ndim == 1:
        x = x[None]
    if x.ndim != 2:
        raise AudioError(f"cannot write {path}: expected [channels, time], got {x.shape}")
    if not np.all(np.isfinite(x)):
        raise AudioError(f"cannot write {path}: the audio contains NaN or Inf")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    wavfile.write(os.fspath(path), int(sample_rate), np.ascontiguousarray(x.T))

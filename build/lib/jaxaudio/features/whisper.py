"""Whisper's log-mel front end in JAX, as transformers' `WhisperFeatureExtractor` computes it.

audio `[batch, samples]` at 16 kHz
  -> zero-pad or truncate to the 30 s chunk (480000 samples)
  -> centred STFT (n_fft 400, hop 160, periodic Hann, reflect pad) -> power spectrum
  -> drop the last frame (3001 -> 3000) -> Slaney mel filters (0..8000 Hz, Slaney area norm)
  -> log10 with a 1e-10 floor -> clamp to (per-example max - 8) -> (x + 4) / 4
  -> `[batch, n_mels, 3000]`.

Everything runs on JAX arrays and jits (the settings are static arguments); numpy only
builds the window and the mel matrix once per setting, as constants.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxaudio.features.mel import mel_filterbank
from jaxaudio.features.stft import dft_kernels, stft

SAMPLE_RATE = 16000
N_FFT = 400
HOP_LENGTH = 160
CHUNK_SAMPLES = 30 * SAMPLE_RATE  # one Whisper window: 3000 frames, 1500 encoder positions


@functools.lru_cache(maxsize=None)
def whisper_mel_filters(n_mels: int, sample_rate: int = SAMPLE_RATE, n_fft: int = N_FFT) -> np.ndarray:
    """Slaney-scale, Slaney-normalised filters over 0..8000 Hz, float32 `[n_fft // 2 + 1, n_mels]`
    (the transpose of the extractor's `mel_filters`)."""
    # Whisper fixes the top at 8 kHz, not at Nyquist, whatever the sample rate.
    return mel_filterbank(sample_rate, n_fft, n_mels, 0.0, 8000.0, htk=False, norm="slaney")


@functools.lru_cache(maxsize=None)
def _kernels(n_fft: int) -> tuple[np.ndarray, np.ndarray]:
    return dft_kernels(n_fft)


def pad_or_trim(audio: jax.Array, length: int = CHUNK_SAMPLES) -> jax.Array:
    """`[..., samples]` -> `[..., length]`: zeros appended, or the tail cut off."""
    n = audio.shape[-1]
    if n >= length:
        return audio[..., :length]
    return jnp.pad(audio, [(0, 0)] * (audio.ndim - 1) + [(0, length - n)])


def whisper_log_mel(audio: jax.Array, n_mels: int = 80, *, chunk_samples: int | None = CHUNK_SAMPLES,
                    sample_rate: int = SAMPLE_RATE, n_fft: int = N_FFT, hop_length: int = HOP_LENGTH,
                    stft_method: str = "fft") -> jax.Array:
    """Whisper log-mel features.

    Args:
        audio: `[batch, samples]` float waveforms at 16 kHz. Clips of different lengths are
            zero-padded by the caller to a common length: the extractor zero-pads every clip
            to the chunk anyway, so the result is the same.
        n_mels: 80 (whisper tiny .. large-v2) or 128 (large-v3).
        chunk_samples: pad or truncate to this many samples first (the extractor's 30 s);
            None keeps the length, giving `samples // hop_length` frames.
        stft_method: 'fft' or 'matmul' (see `jaxaudio.features.stft.stft`).

    Returns:
        float32 `[batch, n_mels, frames]`, frames = chunk_samples // hop_length (3000).
    """
    if audio.ndim != 2:
        raise ValueError(f"whisper_log_mel expects audio [batch, samples]; got shape {audio.shape}")
    x = audio.astype(jnp.float32)
    if chunk_samples is not None:
        x = pad_or_trim(x, chunk_samples)
    real_k, imag_k = _kernels(n_fft)
    real, imag = stft(x, real_k, imag_k, hop_length, center=True, pad_mode="reflect", method=stft_method)
    # The extractor drops the last centred frame (3001 -> 3000) before the max is taken.
    power = jnp.square(real[:, :-1]) + jnp.square(imag[:, :-1])  # [batch, frames, freq]
    mel = jnp.matmul(power, jnp.asarray(whisper_mel_filters(n_mels, sample_rate, n_fft)),
                     precision=jax.lax.Precision.HIGHEST)
    log_spec = jnp.log10(jnp.maximum(mel, 1e-10))
    # Only 8 decades below each clip's loudest bin are kept.
    top = jnp.max(log_spec, axis=(1, 2), keepdims=True)
    log_spec = jnp.maximum(log_spec, top - 8.0)
    return jnp.swapaxes((log_spec + 4.0) / 4.0, 1, 2)

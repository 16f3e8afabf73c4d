"""Whisper log-mel against transformers' `WhisperFeatureExtractor` (its torch STFT path).

Tolerance: 1e-4 absolute on the final features ((log10 + 4) / 4). Both sides compute the
STFT in float32 with different FFTs; the differences grow where a mel bin's power is tiny
next to its frame's energy (log10 of a small power amplifies the FFT's absolute rounding),
which the max - 8 clamp bounds to 8 decades below each clip's peak. Measured on these
clips: at most ~5e-5, all of it within 0.5 (2 decades) of the clamp floor; further from
the floor it is about 1e-5.
"""
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from transformers import WhisperFeatureExtractor

from jaxaudio.features.whisper import CHUNK_SAMPLES, pad_or_trim, whisper_log_mel, whisper_mel_filters

SR = 16000
TOL = 1e-4


def _clips() -> list[np.ndarray]:
    """Noise (1 s), a sine (exactly 30 s), sine + noise (35 s: truncated), a short sine (2.5 s)."""
    rng = np.random.default_rng(0)

    def sine(freq, seconds, amp):
        return amp * np.sin(2 * np.pi * freq * np.arange(int(seconds * SR)) / SR)

    clips = [0.1 * rng.standard_normal(SR), sine(440.0, 30, 0.5),
             sine(1234.5, 35, 0.3) + 0.01 * rng.standard_normal(35 * SR), sine(300.0, 2.5, 0.2)]
    return [c.astype(np.float32) for c in clips]


def _batch(clips: list[np.ndarray]) -> np.ndarray:
    """Zero-padded to a common length, which the extractor's own padding makes equivalent."""
    n = max(len(c) for c in clips)
    return np.stack([np.pad(c, (0, n - len(c))) for c in clips])


@functools.lru_cache(maxsize=None)
def _jitted():
    return jax.jit(whisper_log_mel, static_argnames=("n_mels", "chunk_samples", "stft_method"))


@functools.lru_cache(maxsize=None)
def _reference(n_mels: int) -> np.ndarray:
    fe = WhisperFeatureExtractor(feature_size=n_mels)
    return fe(_clips(), sampling_rate=SR, return_tensors="np")["input_features"]


@functools.lru_cache(maxsize=None)
def _ours(n_mels: int) -> np.ndarray:
    return np.asarray(_jitted()(jnp.asarray(_batch(_clips())), n_mels=n_mels))


@pytest.mark.parametrize("n_mels", [80, 128])
def test_matches_whisper_feature_extractor(n_mels):
    ref, ours = _reference(n_mels), _ours(n_mels)
    assert ref.shape == ours.shape == (4, n_mels, 3000)
    err = np.abs(ours - ref)
    assert err.max() <= TOL, f"max abs error {err.max():.3g} > tolerance {TOL} (per clip {err.max(axis=(1, 2))})"
    # Away from the clamp floor (more than 2 decades above it) the FFTs agree much closer.
    floor = ref.min(axis=(1, 2), keepdims=True)
    far = ref > floor + 0.5
    assert far.mean() > 0.2
    assert err[far].max() <= 2e-5, f"max abs error away from the floor {err[far].max():.3g} > 2e-5"


def test_mel_filters_match_transformers():
    for n_mels in (80, 128):
        ref = WhisperFeatureExtractor(feature_size=n_mels).mel_filters  # float64 [201, n_mels]
        ours = whisper_mel_filters(n_mels)
        assert ours.shape == ref.shape == (201, n_mels) and ours.dtype == np.float32
        np.testing.assert_allclose(ours, ref, atol=1e-6, rtol=0)


def test_eager_equals_jit_and_matmul_stft_agrees():
    audio = jnp.asarray(_batch(_clips()[:2]))
    eager = np.asarray(whisper_log_mel(audio))
    chex.assert_shape(eager, (2, 80, 3000))
    chex.assert_type(eager, jnp.float32)
    np.testing.assert_allclose(eager, _ours(80)[:2], atol=1e-6, rtol=0)
    matmul = np.asarray(_jitted()(audio, stft_method="matmul"))
    err = np.abs(matmul - eager).max()
    assert err <= TOL, f"matmul vs fft STFT: max abs error {err:.3g} > {TOL}"


def test_silence_and_short_chunks():
    silent = np.asarray(whisper_log_mel(jnp.zeros((1, 8000))))
    # log10(1e-10) = -10 everywhere; the clamp leaves it: (-10 + 4) / 4.
    np.testing.assert_array_equal(silent, np.full((1, 80, 3000), -1.5, np.float32))
    short = whisper_log_mel(jnp.ones((2, 1600)) * 0.1, 80, chunk_samples=None)
    chex.assert_shape(short, (2, 80, 10))  # samples // hop frames without the 30 s padding


def test_pad_or_trim():
    x = jnp.arange(6.0).reshape(2, 3)
    np.testing.assert_array_equal(pad_or_trim(x, 5), [[0, 1, 2, 0, 0], [3, 4, 5, 0, 0]])
    np.testing.assert_array_equal(pad_or_trim(x, 2), [[0, 1], [3, 4]])
    assert pad_or_trim(jnp.zeros((1, CHUNK_SAMPLES)), CHUNK_SAMPLES).shape == (1, CHUNK_SAMPLES)


def test_bad_shape_is_refused():
    with pytest.raises(ValueError, match=r"\[batch, samples\]"):
        whisper_log_mel(jnp.zeros((16000,)))

"""CLAP features against transformers' `ClapFeatureExtractor` (built locally, no hub).

Settings: the hub preprocessors' (48 kHz, n_fft 1024, hop 480, 64 mels, 50..14000 Hz; HF's
constructor default f_min is 0, the hub configs set 50) with `max_length_s=1` on both sides
to keep the clips short (101 frames instead of 1001); one case runs the full 10 s.

Crop positions: HF draws them from numpy's global RandomState; the test seeds it with
`np.random.seed(s)` and passes `rng=s` (see `jaxaudio.features.clap`).

Tolerance, absolute dB: `1e-4 + 4e-6 * 10 ** (below / 20)`, where `below` is how many dB the
reference value lies under the loudest mel bin of its frame (row). Our STFT is float32
(HF's is a float64 FFT rounded to complex64 per bin): its rounding error is ~eps times the
frame's largest amplitude, not eps times the bin's own, so a bin `below` dB under the
frame's peak carries a relative power error of ~2 eps 10^(below/20), 4.34x that in dB. An
absolute 1e-4 on values of O(100) dB is not reachable in float32 for pure tones, whose
mel bins span 140 dB within a frame (bins 130 dB under the peak are float32 noise).
Measured with these clips (max_length_s=1): max abs error 1.15 dB (0.3 s pure tone, a bin
~140 dB under its frame's peak), <= 4.1e-4 dB within 60 dB of the frame peak, <= 2.4e-4 dB
everywhere for the noisy clips, 3.7e-4 dB for the 10 s case; the fitted constant
max((err - 1e-4) / 10^(below/20)) is 9e-7 (the tolerance allows 4e-6). All-zero frames give
exactly -100 dB on both sides.
"""
import dataclasses
import functools
import json

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import ClapFeatureExtractor
from transformers.audio_utils import mel_filter_bank

from jaxaudio.features.clap import (
    ClapFeatureSettings,
    bilinear_matrix,
    clap_input_features,
    clap_log_mel,
    fusion_crop_starts,
    fusion_stack,
    random_crop_start,
    repeat_pad,
)

SR = 48000
MAX = SR  # max_length_s = 1
ATOL, PEAK_REL = 1e-4, 4e-6


def _tone(seconds, freq, amp=0.5, noise=0.0, seed=0):
    n = int(round(seconds * SR))
    t = np.arange(n) / SR
    x = amp * np.sin(2 * np.pi * freq * t)
    if noise:
        x = x + noise * np.random.default_rng(seed).standard_normal(n)
    return x.astype(np.float32)


def _chirp(seconds, amp=0.4):
    t = np.arange(int(round(seconds * SR))) / SR
    return (amp * np.sin(2 * np.pi * (200 * t + 2000 * t * t))).astype(np.float32)


@functools.lru_cache(maxsize=None)
def _mixed() -> tuple[np.ndarray, ...]:
    """Short, exactly max, and long clips (with max_length_s = 1)."""
    return (
        _tone(0.3, 440.0),                               # short pure tone: 140 dB of range
        _tone(0.05, 3000.0, 0.1, noise=0.02, seed=1),    # very short: 20 repeats
        _chirp(1.0),                                     # exactly max_samples
        _tone(2.5, 1000.0, 0.3, noise=0.05, seed=2),     # long: crops from 1501 starts
        _tone(48200 / SR, 200.0, noise=0.01, seed=3),    # long, but as many frames as max (HF: 4 copies)
        _tone(49000 / SR, 5000.0, noise=0.01, seed=4),   # long by 2 frames: 3 possible starts
        _chirp(1.7),                                     # long pure chirp
    )


def _hf(waves, truncation, padding, seed, max_length_s=1):
    fe = ClapFeatureExtractor(frequency_min=50, max_length_s=max_length_s, truncation=truncation,
                              padding=padding)
    np.random.seed(seed)
    out = fe(list(waves), sampling_rate=SR, return_tensors="np")
    return out["input_features"], out["is_longer"].reshape(-1)


def _check_close(ours, ref, what):
    assert ours.shape == ref.shape, (what, ours.shape, ref.shape)
    assert ours.dtype == np.float32
    err = np.abs(ours.astype(np.float64) - ref)
    below = ref.max(axis=-1, keepdims=True) - ref
    tol = ATOL + PEAK_REL * 10.0 ** (below / 20.0)
    bad = err > tol
    assert not bad.any(), (f"{what}: {bad.sum()} values out of tolerance; worst err {err[bad].max():.3g} "
                           f"at {below[bad][err[bad].argmax()]:.1f} dB under its frame's peak")
    near = below < 60
    return err.max(), err[near].max()


@pytest.mark.parametrize("truncation", ["fusion", "rand_trunc"])
@pytest.mark.parametrize("padding", ["repeatpad", "repeat", "pad"])
def test_matches_hf_mixed_batch(truncation, padding):
    waves, seed = _mixed(), 11
    ref, ref_longer = _hf(waves, truncation, padding, seed)
    settings = ClapFeatureSettings(max_length_s=1, truncation=truncation, padding=padding)
    ours, longer = clap_input_features(waves, settings, rng=seed)
    channels = 4 if truncation == "fusion" else 1
    chex.assert_shape(ours, (len(waves), channels, 101, 64))
    assert longer.dtype == np.bool_
    # HF's flags: long clips are True except the one with exactly max frames in fusion mode.
    expected = [False, False, False, True, truncation == "rand_trunc", True, True]
    np.testing.assert_array_equal(ref_longer, expected)
    np.testing.assert_array_equal(longer, expected)
    for i in range(len(waves)):
        _check_close(ours[i], ref[i], f"clip {i}")
    if truncation == "fusion":
        # Short clips and the edge case carry four identical copies.
        for i in (0, 1, 2, 4):
            assert (ours[i] == ours[i, :1]).all()


def test_fusion_short_batch_is_deterministic_and_is_longer_can_be_passed():
    """HF flags one random clip when none is longer (LAION-AI/CLAP#90); we don't, unless told."""
    waves = _mixed()[:3]
    settings = ClapFeatureSettings.fusion(max_length_s=1)
    ref, ref_longer = _hf(waves, "fusion", "repeatpad", seed=5)
    assert ref_longer.sum() == 1
    ours, longer = clap_input_features(waves, settings)
    assert not longer.any()
    ours2, longer2 = clap_input_features(waves, settings, is_longer=ref_longer)
    np.testing.assert_array_equal(longer2, ref_longer)
    np.testing.assert_array_equal(ours2, ours)
    _check_close(ours, ref, "short fusion batch")
    # A clip gets the same features alone and in a batch.
    alone, alone_longer = clap_input_features([waves[1]], settings)
    np.testing.assert_allclose(alone[0], ours[1], atol=1e-5, rtol=0)
    assert not alone_longer[0]


def test_full_ten_seconds_matches_hf():
    """The real 10 s window (1001 frames): a 3 s clip and a 12 s clip, both modes."""
    waves = [_tone(3.0, 700.0, 0.3, noise=0.02, seed=7), _tone(12.0, 300.0, 0.2, noise=0.02, seed=8)]
    for truncation in ("fusion", "rand_trunc"):
        settings = ClapFeatureSettings(truncation=truncation)
        assert settings.max_samples == 480000 and settings.frames == 1001
        ref, ref_longer = _hf(waves, truncation, "repeatpad", seed=3, max_length_s=10)
        ours, longer = clap_input_features(waves, settings, rng=3)
        np.testing.assert_array_equal(longer, ref_longer)
        assert ours.shape == ref.shape == (2, settings.channels, 1001, 64)
        _check_close(ours, ref, f"10 s {truncation}")


def test_crop_positions_follow_hf_draws(monkeypatch):
    """Our starts are the values HF's `np.random.choice` / `randint` return under the same seed."""
    drawn = []
    choice = np.random.choice

    def recording_choice(a, *args, **kwargs):
        out = choice(a, *args, **kwargs)
        drawn.append(int(out))
        return out

    monkeypatch.setattr(np.random, "choice", recording_choice)
    wave = _mixed()[3]
    _hf([wave], "fusion", "repeatpad", seed=21)
    total = len(wave) // 480 + 1
    assert tuple(drawn) == fusion_crop_starts(total, 101, 21)
    thirds = np.array_split(np.arange(total - 101 + 1), 3)
    assert all(t[0] <= d <= t[-1] for t, d in zip(thirds, drawn))

    np.random.seed(4)
    assert random_crop_start(len(wave), MAX, 4) == np.random.randint(0, len(wave) - MAX + 1)


def test_crop_edge_cases_and_generators():
    # Two possible starts: parts [0], [1], [] -> the empty one becomes [0].
    for seed in range(5):
        front, middle, back = fusion_crop_starts(102, 101, seed)
        assert (front, middle, back) == (0, 1, 0)
    with pytest.raises(ValueError, match="total_frames"):
        fusion_crop_starts(101, 101)
    with pytest.raises(ValueError, match="num_samples"):
        random_crop_start(MAX, MAX)
    # A Generator is deterministic per state and stays within the thirds.
    a = fusion_crop_starts(1000, 101, np.random.default_rng(0))
    assert a == fusion_crop_starts(1000, 101, np.random.default_rng(0))
    assert 0 <= a[0] <= 299 < a[1] <= 599 < a[2] <= 900
    settings = ClapFeatureSettings.unfused(max_length_s=1)
    waves = [_mixed()[3]]
    x1, _ = clap_input_features(waves, settings, rng=np.random.default_rng(3))
    x2, _ = clap_input_features(waves, settings, rng=np.random.default_rng(3))
    np.testing.assert_array_equal(x1, x2)
    # A RandomState is advanced: two calls crop differently.
    state = np.random.RandomState(0)
    y1, _ = clap_input_features(waves, settings, rng=state)
    y2, _ = clap_input_features(waves, settings, rng=state)
    assert not np.array_equal(y1, y2)


@pytest.mark.parametrize("f_min", [50.0, 0.0])
def test_mel_filters_match_hf(f_min):
    kwargs = dict(num_frequency_bins=513, num_mel_filters=64, min_frequency=f_min, max_frequency=14000,
                  sampling_rate=SR)
    fusion = ClapFeatureSettings.fusion(f_min=f_min).mel_filters()
    unfused = ClapFeatureSettings.unfused(f_min=f_min).mel_filters()
    assert fusion.shape == unfused.shape == (513, 64) and fusion.dtype == np.float32
    np.testing.assert_allclose(fusion, mel_filter_bank(**kwargs, norm=None, mel_scale="htk"), atol=1e-7, rtol=0)
    np.testing.assert_allclose(unfused, mel_filter_bank(**kwargs, norm="slaney", mel_scale="slaney"),
                               atol=1e-9, rtol=1e-6)
    fe = ClapFeatureExtractor(frequency_min=f_min)
    np.testing.assert_allclose(fusion, fe.mel_filters, atol=1e-7, rtol=0)
    np.testing.assert_allclose(unfused, fe.mel_filters_slaney, atol=1e-9, rtol=1e-6)


@pytest.mark.parametrize("in_size,out_size", [(251, 101), (103, 101), (102, 101), (101, 101), (40, 101),
                                              (6001, 1001), (7, 3)])
def test_bilinear_matrix_matches_torch(in_size, out_size):
    x = np.random.default_rng(in_size).standard_normal((in_size, 64)).astype(np.float32) * 30 - 40
    ref = torch.nn.functional.interpolate(torch.from_numpy(x)[None, None], size=[out_size, 64],
                                          mode="bilinear", align_corners=False)[0, 0].numpy()
    m = bilinear_matrix(in_size, out_size)
    assert m.shape == (out_size, in_size) and m.dtype == np.float32
    np.testing.assert_allclose(m.sum(axis=1), 1.0, atol=1e-6)
    # The weights are torch's to the bit (probed with one-hot rows); the sums of products
    # round in another order: values up to ~150, one float32 ulp 1.5e-5.
    onehot = torch.nn.functional.interpolate(torch.eye(in_size)[None, None], size=[out_size, in_size],
                                             mode="bilinear", align_corners=False)[0, 0].numpy()
    np.testing.assert_array_equal(m, onehot)
    np.testing.assert_allclose(m @ x, ref, atol=1e-5, rtol=1e-6)
    if in_size == out_size:
        np.testing.assert_array_equal(m, np.eye(in_size))


def test_fusion_stack_order():
    mel = np.arange(300 * 2, dtype=np.float32).reshape(300, 2)
    out = fusion_stack(mel, 100, (5, 120, 200))
    assert out.shape == (4, 100, 2)
    np.testing.assert_array_equal(out[1], mel[5:105])
    np.testing.assert_array_equal(out[2], mel[120:220])
    np.testing.assert_array_equal(out[3], mel[200:300])
    np.testing.assert_allclose(out[0], bilinear_matrix(300, 100) @ mel, rtol=1e-6)
    with pytest.raises(ValueError, match="exceeds"):
        fusion_stack(mel, 100, (0, 0, 201))


def test_clap_log_mel_shapes_jit_and_consistency():
    settings = ClapFeatureSettings.unfused(max_length_s=1)
    waves = np.stack([_chirp(1.0), _tone(1.0, 440.0, noise=0.1)]).reshape(2, 1, MAX)
    eager = np.asarray(clap_log_mel(jnp.asarray(waves), settings))
    chex.assert_shape(eager, (2, 1, 101, 64))
    chex.assert_type(eager, jnp.float32)
    jitted = np.asarray(jax.jit(clap_log_mel, static_argnums=1)(jnp.asarray(waves), settings))
    np.testing.assert_allclose(jitted, eager, atol=1e-4, rtol=0)
    feats, _ = clap_input_features(list(waves[:, 0]), settings)
    np.testing.assert_allclose(feats[:, 0], eager[:, 0], atol=1e-4, rtol=0)
    matmul = np.asarray(clap_log_mel(jnp.asarray(waves[1, 0]), settings, stft_method="matmul"))
    assert np.abs(matmul - eager[1, 0]).max() <= 1e-3


def test_silent_clip_is_minus_100_db_like_hf():
    waves = [np.zeros(MAX // 2, np.float32), np.zeros(3 * MAX, np.float32)]
    for truncation in ("fusion", "rand_trunc"):
        ours, _ = clap_input_features(waves, ClapFeatureSettings(max_length_s=1, truncation=truncation))
        ref, _ = _hf(waves, truncation, "repeatpad", seed=0)
        np.testing.assert_array_equal(ours, np.full_like(ours, -100.0))
        np.testing.assert_allclose(ref, -100.0, atol=1e-5)


def test_repeat_pad():
    x = np.array([1.0, 2.0, 3.0], np.float32)
    np.testing.assert_array_equal(repeat_pad(x, 8, "repeatpad"), [1, 2, 3, 1, 2, 3, 0, 0])
    np.testing.assert_array_equal(repeat_pad(x, 8, "repeat"), [1, 2, 3, 1, 2, 3, 1, 2])
    np.testing.assert_array_equal(repeat_pad(x, 8, "pad"), [1, 2, 3, 0, 0, 0, 0, 0])
    np.testing.assert_array_equal(repeat_pad(x, 3, "repeatpad"), x)
    assert repeat_pad(x, 8, "pad").dtype == np.float32
    with pytest.raises(ValueError, match="max_samples=2"):
        repeat_pad(x, 2, "pad")
    with pytest.raises(ValueError, match="padding"):
        repeat_pad(x, 8, "zeros")
    with pytest.raises(ValueError, match="empty"):
        repeat_pad(x[:0], 8, "pad")


def test_settings_presets_and_dict():
    fused, unfused = ClapFeatureSettings.fusion(), ClapFeatureSettings.unfused()
    assert fused.truncation == "fusion" and fused.channels == 4
    assert unfused.truncation == "rand_trunc" and unfused.channels == 1
    assert fused.max_samples == 480000 and fused.frames == 1001
    d = json.loads(json.dumps(unfused.to_dict()))
    assert ClapFeatureSettings.from_dict(d) == unfused
    assert ClapFeatureSettings(max_length_s=0.5).max_samples == 24000
    with pytest.raises(ValueError, match="unknown keys"):
        ClapFeatureSettings.from_dict({**d, "top_db": 80})
    with pytest.raises(dataclasses.FrozenInstanceError):
        fused.n_fft = 2048


@pytest.mark.parametrize("kwargs,field", [
    ({"truncation": "crop"}, "truncation"),
    ({"padding": "zeros"}, "padding"),
    ({"f_max": 30000.0}, "f_max"),
    ({"f_min": 14000.0}, "f_min"),
    ({"f_min": float("nan")}, "f_min"),
    ({"n_fft": 0}, "n_fft"),
    ({"sample_rate": 48000.0}, "sample_rate"),
    ({"hop_length": True}, "hop_length"),
    ({"num_mel_bins": -1}, "num_mel_bins"),
    ({"max_length_s": 0}, "max_length_s"),
    ({"max_length_s": 1e-5}, "max_length_s"),  # 0.48 samples
    ({"max_length_s": 0.01}, "max_length_s"),  # 480 samples: not more than n_fft // 2
])
def test_settings_validation(kwargs, field):
    with pytest.raises(ValueError, match=rf"ClapFeatureSettings\.{field}"):
        ClapFeatureSettings(**kwargs)


def test_bad_inputs_are_refused():
    settings = ClapFeatureSettings.fusion(max_length_s=1)
    ok = np.zeros(1000, np.float32)
    cases = [
        ([ok, np.zeros(0, np.float32)], r"waves\[1\] is empty"),
        ([np.zeros((2, MAX), np.float32)], r"waves\[0\] has shape \(2, 48000\)"),
        ([(ok * 32767).astype(np.int16)], r"waves\[0\] has dtype int16"),
        ([np.full(100, np.nan, np.float32)], r"waves\[0\] has non-finite"),
        (np.zeros(MAX, np.float32), r"one 1-D array of shape \(48000,\)"),
        ([], "waves is empty"),
    ]
    for waves, message in cases:
        with pytest.raises(ValueError, match=message):
            clap_input_features(waves, settings)
    with pytest.raises(ValueError, match="is_longer"):
        clap_input_features([ok, ok], settings, is_longer=[True])
    with pytest.raises(ValueError, match="rng"):
        clap_input_features([ok], settings, rng="seed")
    with pytest.raises(ValueError, match="settings"):
        clap_input_features([ok], {"truncation": "fusion"})
    with pytest.raises(ValueError, match="reflect padding"):
        clap_log_mel(jnp.zeros((2, 512)), settings)

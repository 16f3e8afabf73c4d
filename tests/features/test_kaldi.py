"""Kaldi fbank against kaldi-native-fbank (an independent C++ port of Kaldi's
`compute-fbank-feats`): the BEATs and AST settings, 80 bins with defaults, the less used
options, batching, lengths, jit, and input errors.

Tolerance. Where a mel bin's energy is within e^12 (~52 dB) of its frame's strongest bin,
log-fbank max abs err <= 1e-4. Below that, float32 round-off of the FFT (about 1e-7 of
the frame's spectral peak, in kaldi-native-fbank as much as here: both are equally far
from a float64 computation) dominates the tiny energies, so there the check is on the
energies themselves: |ours - ref| <= 1e-5 of the frame's strongest mel energy.
"""
import functools

import chex
import jax
import jax.numpy as jnp
import kaldi_native_fbank as knf
import numpy as np
import pytest

from jaxaudio.features.kaldi import frame_indices, kaldi_fbank, kaldi_mel_banks

SR = 16000
LOG_TOL, LEVEL, ENERGY_TOL = 1e-4, -12.0, 1e-5
BEATS = dict(num_mel_bins=128)  # povey window, 25/10 ms, dither 0; waveform scaled by 2**15
AST = dict(num_mel_bins=128, window="hanning", htk_compat=True, use_energy=False)


def knf_fbank(wave: np.ndarray, *, sample_rate=SR, num_mel_bins=23, frame_length_ms=25.0, frame_shift_ms=10.0,
              preemphasis=0.97, remove_dc_offset=True, window="povey", round_to_power_of_two=True,
              snip_edges=True, low_freq=20.0, high_freq=0.0, htk_compat=False, use_energy=False, raw_energy=True,
              use_log_fbank=True, use_power=True, energy_floor=1.0) -> np.ndarray:
    """`[samples]` -> `[frames, bins]` by kaldi-native-fbank with the same options."""
    o = knf.FbankOptions()
    f = o.frame_opts
    f.samp_freq, f.frame_length_ms, f.frame_shift_ms = sample_rate, frame_length_ms, frame_shift_ms
    f.dither, f.preemph_coeff, f.remove_dc_offset, f.window_type = 0.0, preemphasis, remove_dc_offset, window
    f.round_to_power_of_two, f.snip_edges = round_to_power_of_two, snip_edges
    o.mel_opts.num_bins, o.mel_opts.low_freq, o.mel_opts.high_freq = num_mel_bins, low_freq, high_freq
    o.htk_compat, o.use_energy, o.raw_energy, o.energy_floor = htk_compat, use_energy, raw_energy, energy_floor
    o.use_log_fbank, o.use_power = use_log_fbank, use_power
    fb = knf.OnlineFbank(o)
    fb.accept_waveform(sample_rate, wave.astype(np.float32).tolist())
    fb.input_finished()
    dim = num_mel_bins + int(use_energy)
    return np.array([fb.get_frame(i) for i in range(fb.num_frames_ready)], np.float32).reshape(-1, dim)


def assert_matches_kaldi(ours, ref, what, log=True):
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    assert ours.shape == ref.shape, f"{what}: shape {ours.shape} vs kaldi-native-fbank {ref.shape}"
    if ref.size == 0:
        return
    energy_o, energy_r = (np.exp(ours), np.exp(ref)) if log else (ours, ref)
    rel = np.max(np.abs(energy_o - energy_r) / np.max(energy_r, axis=-1, keepdims=True))
    assert rel <= ENERGY_TOL, f"{what}: energy error {rel:.3g} of the frame maximum > {ENERGY_TOL}"
    if log:
        strong = ref - ref.max(axis=-1, keepdims=True) > LEVEL
        err = np.max(np.abs(ours - ref)[strong])
        assert err <= LOG_TOL, f"{what}: log-fbank max abs err {err:.3g} > {LOG_TOL} (bins within e^{-LEVEL:g})"
    return rel


def noise(n, seed=0, scale=0.1):
    return (scale * np.random.default_rng(seed).standard_normal(n)).astype(np.float32)


def sine(n, freq=440.0, amp=0.5):
    return (amp * np.sin(2 * np.pi * freq * np.arange(n) / SR)).astype(np.float32)


def chirp(n, amp=0.5):
    t = np.arange(n) / SR
    return (amp * np.sin(2 * np.pi * (100 + 3000 * t) * t)).astype(np.float32)


@functools.lru_cache(maxsize=None)
def jitted(**kw):
    return jax.jit(functools.partial(kaldi_fbank, **kw))


@pytest.mark.parametrize("setting,scale", [("beats", 2.0 ** 15), ("ast", 1.0)])
@pytest.mark.parametrize("n", [400, 1234, 16000])
def test_beats_and_ast_settings_batched(setting, scale, n):
    kw = {"beats": BEATS, "ast": AST}[setting]
    batch = np.stack([noise(n), sine(n), chirp(n), noise(n, seed=1, scale=0.01) + sine(n, 3000.0, 0.2)]) * scale
    out = jitted(**kw)(jnp.asarray(batch))
    frames = 1 + (n - 400) // 160
    chex.assert_shape(out, (4, frames, 128))
    chex.assert_type(out, jnp.float32)
    for i, name in enumerate(["noise", "sine", "chirp", "noise+sine"]):
        assert_matches_kaldi(out[i], knf_fbank(batch[i], **kw), f"{setting} {name} n={n}")


def test_default_80_bins_eager_equals_jit():
    wave = np.stack([noise(8000, seed=2), chirp(8000)])
    eager = kaldi_fbank(jnp.asarray(wave), num_mel_bins=80)
    # XLA fuses the jitted graph differently, so the two differ by round-off, as two Kaldis do.
    assert_matches_kaldi(eager, jitted(num_mel_bins=80)(jnp.asarray(wave)), "eager vs jit")
    for i in range(2):
        assert_matches_kaldi(eager[i], knf_fbank(wave[i], num_mel_bins=80), f"80 bins #{i}")


@pytest.mark.parametrize("options", [
    dict(window="hamming", num_mel_bins=40),
    dict(window="rectangular", round_to_power_of_two=False, num_mel_bins=23),
    dict(window="blackman", preemphasis=0.0, remove_dc_offset=False, num_mel_bins=23),
    dict(snip_edges=False, num_mel_bins=80),
    dict(use_energy=True, num_mel_bins=23, energy_floor=0.0),
    dict(use_energy=True, htk_compat=True, raw_energy=False, energy_floor=1.0, num_mel_bins=23),
    dict(low_freq=64.0, high_freq=-400.0, frame_length_ms=32.0, frame_shift_ms=8.0, num_mel_bins=40),
    dict(sample_rate=8000, high_freq=3800.0, num_mel_bins=30),
], ids=["hamming", "rectangular-no-pow2", "blackman-no-preemph-no-dc", "no-snip-edges", "energy-first",
        "energy-last-windowed", "band-and-frames", "8kHz"])
def test_options(options):
    wave = noise(5000, seed=3) + sine(5000, 1000.0, 0.3)
    ours = kaldi_fbank(jnp.asarray(wave * 2 ** 15), **options)
    assert_matches_kaldi(ours, knf_fbank(wave * 2 ** 15, **options), str(options))


@pytest.mark.parametrize("use_power", [True, False])
def test_linear_fbank(use_power):
    wave = chirp(4000) * 2 ** 15
    ours = kaldi_fbank(jnp.asarray(wave), use_log_fbank=False, use_power=use_power)
    assert_matches_kaldi(ours, knf_fbank(wave, use_log_fbank=False, use_power=use_power), "linear", log=False)


@pytest.mark.parametrize("n", [1, 90, 250, 399, 401])
def test_short_signals_without_snip_edges_mirror_like_kaldi(n):
    wave = noise(n, seed=n) * 2 ** 15
    ours = kaldi_fbank(jnp.asarray(wave), snip_edges=False)
    assert_matches_kaldi(ours, knf_fbank(wave, snip_edges=False), f"n={n}")
    assert ours.shape[0] == (n + 80) // 160


def test_too_short_for_one_frame_gives_no_frames():
    out = kaldi_fbank(jnp.zeros((2, 399)), num_mel_bins=23)
    chex.assert_shape(out, (2, 0, 23))


def test_silence_hits_the_float32_floor():
    out = np.asarray(kaldi_fbank(jnp.zeros(800), num_mel_bins=23, use_energy=True, energy_floor=0.0))
    np.testing.assert_allclose(out[:, 1:], np.log(np.finfo(np.float32).eps), rtol=1e-6)
    np.testing.assert_allclose(out[:, 0], np.log(np.finfo(np.float32).tiny), rtol=1e-6)


@pytest.mark.parametrize("bins,sr,frame_ms,low,high", [
    (128, 16000, 25.0, 20.0, 0.0), (80, 16000, 25.0, 20.0, 0.0), (23, 16000, 25.0, 20.0, -400.0),
    (40, 8000, 25.0, 64.0, 3800.0), (64, 22050, 20.0, 0.0, 0.0)])
def test_mel_banks_match_kaldi(bins, sr, frame_ms, low, high):
    mo = knf.MelBanksOptions()
    mo.num_bins, mo.low_freq, mo.high_freq = bins, low, high
    fo = knf.FrameExtractionOptions()
    fo.samp_freq, fo.frame_length_ms = sr, frame_ms
    ref = np.array(knf.MelBanks(mo, fo).get_matrix()).T
    padded = 2 * (ref.shape[0] - 1)
    ours = kaldi_mel_banks(bins, padded, sr, low, high)
    assert ours.shape == ref.shape == (padded // 2 + 1, bins)
    # Both round like Kaldi in float32; glibc's logf is off by an ulp now and then.
    err = np.max(np.abs(ours - ref))
    assert err <= 2e-6, f"mel banks max abs err {err:.3g} > 2e-6"
    assert np.all(ours[-1] == 0)


def test_frame_indices():
    np.testing.assert_array_equal(frame_indices(10, 4, 3, True), [[0, 1, 2, 3], [3, 4, 5, 6], [6, 7, 8, 9]])
    # Not snipped: frames centred on f * 3 + 1, mirrored at both ends.
    np.testing.assert_array_equal(frame_indices(5, 4, 3, False), [[0, 0, 1, 2], [2, 3, 4, 4]])


def test_one_dimensional_input():
    wave = noise(2000)
    out = kaldi_fbank(jnp.asarray(wave))
    chex.assert_shape(out, (11, 23))
    np.testing.assert_array_equal(np.asarray(out), np.asarray(kaldi_fbank(jnp.asarray(wave[None])))[0])


def test_bad_inputs():
    with pytest.raises(ValueError, match="dither"):
        kaldi_fbank(jnp.zeros(1000), dither=1.0)
    with pytest.raises(ValueError, match="window"):
        kaldi_fbank(jnp.zeros(1000), window="hann")
    with pytest.raises(ValueError, match="high_freq"):
        kaldi_fbank(jnp.zeros(1000), high_freq=9000.0)
    with pytest.raises(ValueError, match="3 mel bins"):
        kaldi_fbank(jnp.zeros(1000), num_mel_bins=2)
    with pytest.raises(ValueError, match="samples"):
        kaldi_fbank(jnp.zeros((1, 2, 1000)))

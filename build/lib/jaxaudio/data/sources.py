"""Procedurally synthesised sound classes for the synthetic binaural scenes.

Every class is a function `(rng, sr, n_samples) -> float32 [n_samples]` peak-normalised
to 1. Parameters (pitch, duration, onset, rate, ...) are drawn from `rng` within ranges
chosen so that classes differ clearly in spectrum and time structure, while two draws of
one class still sound different. The same generator state gives the same samples.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from scipy import signal

SourceFn = Callable[[np.random.Generator, int, int], np.ndarray]


def _segment(rng, n: int, min_frac: float, max_frac: float) -> tuple[int, int]:
    """A random (onset, length) inside `n` samples, length a fraction of `n`."""
    length = max(1, int(n * rng.uniform(min_frac, max_frac)))
    return int(rng.integers(0, n - length + 1)), length


def _place(n: int, onset: int, x: np.ndarray) -> np.ndarray:
    out = np.zeros(n)
    out[onset:onset + len(x)] = x[:n - onset]
    return out


def _fade(length: int, sr: int, attack_s: float = 0.01, release_s: float = 0.02):
    """Linear fade in and out, so sustained sounds start and stop without clicks."""
    t = np.arange(length)
    a, r = max(1, int(attack_s * sr)), max(1, int(release_s * sr))
    return np.minimum(1.0, np.minimum((t + 1) / a, (length - t) / r))


def _adsr(length: int, sr: int, rng) -> np.ndarray:
    a = rng.uniform(0.005, 0.05) * sr
    d = rng.uniform(0.05, 0.2) * sr
    s = rng.uniform(0.4, 0.8)
    r = rng.uniform(0.05, 0.2) * sr
    t = np.arange(length, dtype=np.float64)
    env = np.interp(t, [0, a, a + d], [0.0, 1.0, s])
    return env * np.clip((length - t) / r, 0.0, 1.0)


def _finish(x: np.ndarray) -> np.ndarray:
    peak = np.max(np.abs(x))
    return (x / peak if peak > 0 else x).astype(np.float32)


def _log_uniform(rng, lo: float, hi: float) -> float:
    return float(np.exp(rng.uniform(np.log(lo), np.log(hi))))


def _resonator(x: np.ndarray, freq: float, bandwidth: float, sr: int) -> np.ndarray:
    """Two-pole resonance at `freq` Hz with the given -3 dB bandwidth (a formant)."""
    r = np.exp(-np.pi * bandwidth / sr)
    a = [1.0, -2 * r * np.cos(2 * np.pi * freq / sr), r * r]
    return signal.lfilter([1.0 - r], a, x)


def pure_tone(rng, sr, n):
    """A steady sine, 200-2000 Hz."""
    onset, length = _segment(rng, n, 0.3, 0.9)
    t = np.arange(length) / sr
    tone = np.sin(2 * np.pi * _log_uniform(rng, 200, 2000) * t + rng.uniform(0, 2 * np.pi))
    return _finish(_place(n, onset, tone * _fade(length, sr)))


def organ(rng, sr, n):
    """A harmonic note (band-limited sawtooth-like, 1/k partials) with an ADSR envelope."""
    onset, length = _segment(rng, n, 0.3, 0.9)
    f0 = _log_uniform(rng, 100, 500)
    t = np.arange(length) / sr
    ks = np.arange(1, int(min(20, (sr / 2 - 100) // f0)) + 1)
    note = (np.sin(2 * np.pi * f0 * ks[:, None] * t) / ks[:, None]).sum(0)
    return _finish(_place(n, onset, note * _adsr(length, sr, rng)))


def plucked_string(rng, sr, n):
    """Karplus-Strong: a noise burst recirculated through a damped delay line."""
    onset, length = _segment(rng, n, 0.4, 0.9)
    period = int(sr / _log_uniform(rng, 110, 660))
    decay = rng.uniform(0.985, 0.998)
    y = np.zeros(length + period + 1)
    y[1:period + 1] = rng.uniform(-1, 1, period)
    # y[i] += decay * mean(y[i-P], y[i-P-1]); updating a whole period per step is exact
    # because each block only reads samples of earlier blocks.
    for s in range(period + 1, len(y), period):
        e = min(s + period, len(y))
        y[s:e] += 0.5 * decay * (y[s - period:e - period] + y[s - period - 1:e - period - 1])
    return _finish(_place(n, onset, y[1:length + 1] * _fade(length, sr, 0.001, 0.02)))


def white_noise(rng, sr, n):
    """A burst of white noise."""
    onset, length = _segment(rng, n, 0.2, 0.9)
    return _finish(_place(n, onset, rng.standard_normal(length) * _fade(length, sr)))


def _coloured_noise(rng, sr: int, n: int, exponent: float) -> np.ndarray:
    """Noise with power spectrum ~ 1/f**exponent above 50 Hz, shaped by FFT.

    The slope starts at 50 Hz and nothing is kept below 20 Hz: a true 1/f**2 spectrum
    would put nearly all its energy in sub-audible drift.
    """
    spec = np.fft.rfft(rng.standard_normal(n))
    freqs = np.fft.rfftfreq(n, 1.0 / sr)
    spec /= np.maximum(freqs, 50.0) ** (exponent / 2)
    spec[freqs < 20.0] = 0.0
    return np.fft.irfft(spec, n)


def pink_noise(rng, sr, n):
    """A burst of pink (1/f) noise."""
    onset, length = _segment(rng, n, 0.2, 0.9)
    return _finish(_place(n, onset, _coloured_noise(rng, sr, length, 1.0) * _fade(length, sr)))


def brown_noise(rng, sr, n):
    """A burst of brown (1/f^2) noise, a low rumble."""
    onset, length = _segment(rng, n, 0.2, 0.9)
    return _finish(_place(n, onset, _coloured_noise(rng, sr, length, 2.0) * _fade(length, sr)))


def _chirp(rng, sr, n, up: bool):
    onset, length = _segment(rng, n, 0.2, 0.7)
    lo, hi = _log_uniform(rng, 150, 600), _log_uniform(rng, 2000, 8000)
    f0, f1 = (lo, hi) if up else (hi, lo)
    t = np.arange(length) / sr
    sweep = signal.chirp(t, f0=f0, t1=t[-1] if length > 1 else 1.0, f1=f1,
                         method="logarithmic")
    return _finish(_place(n, onset, sweep * _fade(length, sr)))


def up_chirp(rng, sr, n):
    """A logarithmic sweep upwards (a few hundred Hz to several kHz)."""
    return _chirp(rng, sr, n, up=True)


def down_chirp(rng, sr, n):
    """A logarithmic sweep downwards."""
    return _chirp(rng, sr, n, up=False)


def click_train(rng, sr, n):
    """Regular clicks (short decaying impulses), 4-30 per second."""
    onset, length = _segment(rng, n, 0.4, 1.0)
    step = max(1, int(sr / rng.uniform(4, 30)))
    impulses = np.zeros(length)
    impulses[::step] = 1.0
    click = np.exp(-np.arange(int(0.002 * sr) + 1) / (0.0003 * sr))
    return _finish(_place(n, onset, np.convolve(impulses, click)[:length]))


# (F1, F2, F3) in Hz of two vowels far apart in formant space.
_VOWEL_FORMANTS = {"a": (750.0, 1200.0, 2600.0), "i": (290.0, 2300.0, 3000.0)}


def _vowel(rng, sr, n, vowel: str):
    """A glottal pulse train (with vibrato) through three formant resonators."""
    onset, length = _segment(rng, n, 0.3, 0.8)
    t = np.arange(length) / sr
    f0 = _log_uniform(rng, 90, 260) * (1 + 0.02 * np.sin(2 * np.pi * 5.5 * t))
    phase = np.cumsum(f0) / sr
    pulses = np.diff(np.floor(phase), prepend=0.0)  # one impulse per glottal cycle
    source = signal.lfilter([1.0], [1.0, -0.95], pulses)  # spectral tilt of the glottis
    scale = rng.uniform(0.92, 1.08)  # speaker size
    out = sum(_resonator(source, f * scale, bw, sr)
              for f, bw in zip(_VOWEL_FORMANTS[vowel], (90.0, 110.0, 160.0)))
    return _finish(_place(n, onset, out * _adsr(length, sr, rng)))


def vowel_a(rng, sr, n):
    """A sung "a" (F1 750 Hz, F2 1200 Hz)."""
    return _vowel(rng, sr, n, "a")


def vowel_i(rng, sr, n):
    """A sung "i" (F1 290 Hz, F2 2300 Hz)."""
    return _vowel(rng, sr, n, "i")


# Partial frequency ratios of an inharmonic, church-bell-like spectrum.
_BELL_RATIOS = np.array([0.56, 0.92, 1.19, 1.71, 2.0, 2.74, 3.0, 3.76, 4.07])


def bell(rng, sr, n):
    """Inharmonic partials with exponential decays, higher partials dying first."""
    onset, length = _segment(rng, n, 0.5, 1.0)
    f0 = _log_uniform(rng, 300, 1200)
    ratios = _BELL_RATIOS[_BELL_RATIOS * f0 < sr / 2 - 100]
    t = np.arange(length) / sr
    tau = rng.uniform(0.3, 1.0) / ratios  # seconds
    partials = np.exp(-t / tau[:, None]) * np.sin(
        2 * np.pi * f0 * ratios[:, None] * t + rng.uniform(0, 2 * np.pi, (len(ratios), 1)))
    return _finish(_place(n, onset, partials.sum(0) * _fade(length, sr, 0.001, 0.01)))


def siren(rng, sr, n):
    """A tone whose pitch swings sinusoidally (FM), like an emergency siren."""
    onset, length = _segment(rng, n, 0.5, 1.0)
    t = np.arange(length) / sr
    centre, depth = _log_uniform(rng, 500, 1200), rng.uniform(0.2, 0.4)
    rate = rng.uniform(1.5, 5.0)
    freq = centre * (1 + depth * np.sin(2 * np.pi * rate * t + rng.uniform(0, 2 * np.pi)))
    tone = np.sin(2 * np.pi * np.cumsum(freq) / sr)
    tone += 0.3 * np.sin(4 * np.pi * np.cumsum(freq) / sr)  # second harmonic: brassier
    return _finish(_place(n, onset, tone * _fade(length, sr)))


def rain(rng, sr, n):
    """Many random droplets (short high-passed noise ticks) over a soft hiss."""
    onset, length = _segment(rng, n, 0.6, 1.0)
    drops = np.zeros(length)
    count = rng.poisson(rng.uniform(150, 600) * length / sr)
    drops[rng.integers(0, length, count)] = rng.uniform(0.2, 1.0, count)
    tick = rng.standard_normal(int(0.004 * sr) + 1) * np.exp(
        -np.arange(int(0.004 * sr) + 1) / (0.0008 * sr))
    x = np.convolve(drops, tick)[:length] + 0.05 * rng.standard_normal(length)
    b, a = signal.butter(2, min(2000.0 / (sr / 2), 0.9), btype="highpass")
    return _finish(_place(n, onset, signal.lfilter(b, a, x) * _fade(length, sr)))


def engine(rng, sr, n):
    """A low harmonic hum (30-80 Hz firing rate) with pulsing amplitude and rumble."""
    onset, length = _segment(rng, n, 0.6, 1.0)
    t = np.arange(length) / sr
    f0 = rng.uniform(30, 80)
    ks = np.arange(1, 13)
    hum = (np.sin(2 * np.pi * f0 * ks[:, None] * t + rng.uniform(0, 2 * np.pi, (12, 1)))
           / ks[:, None] ** 0.7).sum(0)
    hum *= 1 + 0.5 * np.sin(2 * np.pi * f0 / 2 * t)  # cylinder firing pulses
    b, a = signal.butter(2, min(300.0 / (sr / 2), 0.9))
    rumble = signal.lfilter(b, a, rng.standard_normal(length))
    rumble *= 0.5 * np.std(hum) / max(np.std(rumble), 1e-12)
    return _finish(_place(n, onset, (hum + rumble) * _fade(length, sr, 0.05, 0.05)))


def drum(rng, sr, n):
    """A few kick-drum hits: a sine whose pitch drops fast, with a short decay."""
    hits = int(rng.integers(1, 5))
    hit_len = int(rng.uniform(0.12, 0.25) * sr)
    t = np.arange(hit_len) / sr
    f_end, f_start = rng.uniform(45, 70), rng.uniform(150, 250)
    freq = f_end + (f_start - f_end) * np.exp(-t / 0.03)
    hit = np.sin(2 * np.pi * np.cumsum(freq) / sr) * np.exp(-t / (hit_len / sr / 4))
    out = np.zeros(n)
    for onset in rng.integers(0, max(1, n - hit_len // 2), hits):
        seg = hit[:n - onset]
        out[onset:onset + len(seg)] += seg
    return _finish(out)


SOURCE_CLASSES: dict[str, SourceFn] = {
    "pure_tone": pure_tone,
    "organ": organ,
    "plucked_string": plucked_string,
    "white_noise": white_noise,
    "pink_noise": pink_noise,
    "brown_noise": brown_noise,
    "up_chirp": up_chirp,
    "down_chirp": down_chirp,
    "click_train": click_train,
    "vowel_a": vowel_a,
    "vowel_i": vowel_i,
    "bell": bell,
    "siren": siren,
    "rain": rain,
    "engine": engine,
    "drum": drum,
}

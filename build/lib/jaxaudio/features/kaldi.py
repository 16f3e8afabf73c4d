"""Kaldi filterbank features (`compute-fbank-feats`, `torchaudio.compliance.kaldi.fbank`) in JAX.

BEATs and AST were trained on these features. Per frame: optional DC removal, raw log
energy, pre-emphasis (the first sample is emphasised against itself), a window, zero
padding to a power of two, the power spectrum, Kaldi's mel banks (triangles in mel
space, `mel = 1127 ln(1 + f / 700)`, Nyquist bin unused) and a log with a float32-epsilon
floor. Frame positions and mel banks depend only on static sizes, so they are built in
numpy at trace time; the signal path is pure `jnp` and jits.
"""
import math

import jax
import jax.numpy as jnp
import numpy as np

FLOAT32_EPS = float(np.finfo(np.float32).eps)  # Kaldi's floor for mel energies before the log
FLOAT32_MIN = float(np.finfo(np.float32).tiny)  # Kaldi's floor for the frame energy (FLT_MIN)
WINDOWS = ("povey", "hanning", "hamming", "rectangular", "blackman")


def mel_scale(freq: np.ndarray) -> np.ndarray:
    """Kaldi's mel scale `1127 ln(1 + f / 700)`, rounded step by step to float32 as Kaldi's
    `1127.0f * logf(1.0f + f / 700.0f)` (the log itself correctly rounded)."""
    f32 = np.float32
    inner = f32(1.0) + np.asarray(freq, f32) / f32(700.0)
    return f32(1127.0) * np.log(inner.astype(np.float64)).astype(f32)


def window_function(name: str, length: int, blackman_coeff: float = 0.42) -> np.ndarray:
    """Kaldi's `FeatureWindowFunction`: symmetric windows over `length` samples (float64 `[length]`)."""
    a = 2.0 * np.pi / (length - 1) if length > 1 else 0.0
    n = np.arange(length, dtype=np.float64)
    if name == "hanning":
        return 0.5 - 0.5 * np.cos(a * n)
    if name == "povey":  # a Hann window that does not reach zero at the ends
        return (0.5 - 0.5 * np.cos(a * n)) ** 0.85
    if name == "hamming":
        return 0.54 - 0.46 * np.cos(a * n)
    if name == "rectangular":
        return np.ones(length)
    if name == "blackman":
        return blackman_coeff - 0.5 * np.cos(a * n) + (0.5 - blackman_coeff) * np.cos(2 * a * n)
    raise ValueError(f"window {name!r}: choose one of {WINDOWS}")


def kaldi_mel_banks(num_bins: int, padded_window_size: int, sample_rate: float, low_freq: float = 20.0,
                    high_freq: float = 0.0) -> np.ndarray:
    """Kaldi's `MelBanks` as a matrix float32 `[padded_window_size // 2 + 1, num_bins]`.

    Triangles are linear in mel between equally spaced mel edges from `low_freq` to
    `high_freq` (`<= 0` means Nyquist + `high_freq`). Kaldi uses only the first
    `padded_window_size // 2` FFT bins, so the Nyquist row is zero.
    """
    nyquist = 0.5 * sample_rate
    high = high_freq if high_freq > 0 else nyquist + high_freq
    if num_bins < 3:
        raise ValueError(f"num_mel_bins={num_bins}: Kaldi needs at least 3 mel bins")
    if not (0.0 <= low_freq < nyquist and 0.0 < high <= nyquist and low_freq < high):
        raise ValueError(f"bad mel band: low_freq={low_freq}, high_freq={high_freq} (-> {high}) "
                         f"at sample_rate={sample_rate} (Nyquist {nyquist})")
    # Kaldi computes the banks in float32, and one float32 ulp of mel (~1e-4 at 2000 mel)
    # moves a triangle's weight by ~1e-5, enough to shift a log-mel by 1e-4 where one small
    # weight meets a strong FFT bin; so every step is rounded as Kaldi rounds it.
    f32 = np.float32
    mel_low, mel_high = mel_scale(f32(low_freq)), mel_scale(f32(high))
    delta = (mel_high - mel_low) / f32(num_bins + 1)
    b = np.arange(num_bins, dtype=f32)[None, :]
    left, center, right = mel_low + b * delta, mel_low + (b + f32(1)) * delta, mel_low + (b + f32(2)) * delta
    num_fft_bins = padded_window_size // 2
    mel = mel_scale((f32(sample_rate) / f32(padded_window_size)) * np.arange(num_fft_bins, dtype=f32))[:, None]
    up = (mel - left) / (center - left)
    down = (right - mel) / (right - center)
    weights = np.where((mel > left) & (mel < right), np.where(mel <= center, up, down), f32(0))
    return np.concatenate([weights, np.zeros((1, num_bins))]).astype(np.float32)


def frame_indices(num_samples: int, frame_length: int, frame_shift: int, snip_edges: bool) -> np.ndarray:
    """Sample index of every frame's every sample, int32 `[frames, frame_length]`.

    `snip_edges`: frames lie wholly inside the signal. Otherwise there are
    `(num_samples + frame_shift // 2) // frame_shift` frames centred on
    `f * frame_shift + frame_shift // 2`, and samples outside the signal are mirrored
    (Kaldi's `ExtractWindow`: `-s - 1` on the left, `2 n - 1 - s` on the right).
    """
    if snip_edges:
        frames = 0 if num_samples < frame_length else 1 + (num_samples - frame_length) // frame_shift
        starts = np.arange(frames) * frame_shift
    else:
        frames = (num_samples + frame_shift // 2) // frame_shift
        starts = np.arange(frames) * frame_shift + frame_shift // 2 - frame_length // 2
    idx = starts[:, None] + np.arange(frame_length)[None, :]
    if not snip_edges and num_samples > 0:
        while np.any((idx < 0) | (idx >= num_samples)):  # mirrors can land outside a very short signal
            idx = np.where(idx < 0, -idx - 1, idx)
            idx = np.where(idx >= num_samples, 2 * num_samples - 1 - idx, idx)
    return idx.astype(np.int32)


def kaldi_fbank(waveform: jax.Array, *, sample_rate: float = 16000, num_mel_bins: int = 23,
                frame_length_ms: float = 25.0, frame_shift_ms: float = 10.0, dither: float = 0.0,
                preemphasis: float = 0.97, remove_dc_offset: bool = True, window: str = "povey",
                round_to_power_of_two: bool = True, snip_edges: bool = True, low_freq: float = 20.0,
                high_freq: float = 0.0, htk_compat: bool = False, use_energy: bool = False,
                raw_energy: bool = True, use_log_fbank: bool = True, use_power: bool = True,
                energy_floor: float = 1.0, blackman_coeff: float = 0.42) -> jax.Array:
    """Kaldi fbank of `waveform [batch, samples]` (or `[samples]`) -> `[batch, frames, num_mel_bins]`
    (`[frames, num_mel_bins]` for 1-D input; one more column, the log energy, with
    `use_energy`: first, or last with `htk_compat`).

    Samples are taken as they are: Kaldi and the BEATs recipe feed 16-bit integer
    values (scale [-1, 1] audio by 2**15), AST's feature extractor feeds [-1, 1] audio.
    `energy_floor` defaults to torchaudio's 1.0 (Kaldi's is 0.0); it only matters with
    `use_energy`. The frame energy is floored at FLT_MIN as in Kaldi.
    """
    if dither != 0.0:
        raise ValueError(f"dither={dither}: dithering adds random noise, so the features would not be "
                         "deterministic; use dither=0.0 (what BEATs and AST use at inference)")
    if window not in WINDOWS:
        raise ValueError(f"window {window!r}: choose one of {WINDOWS}")
    x = jnp.asarray(waveform, jnp.float32)
    squeeze = x.ndim == 1
    if squeeze:
        x = x[None]
    if x.ndim != 2:
        raise ValueError(f"waveform must be [samples] or [batch, samples]; got shape {x.shape}")
    frame_length = int(sample_rate * frame_length_ms * 0.001)
    frame_shift = int(sample_rate * frame_shift_ms * 0.001)
    if frame_length < 2 or frame_shift < 1:
        raise ValueError(f"frame_length_ms={frame_length_ms}, frame_shift_ms={frame_shift_ms} give "
                         f"{frame_length} and {frame_shift} samples at {sample_rate} Hz")
    padded = 2 ** math.ceil(math.log2(frame_length)) if round_to_power_of_two else frame_length
    banks = kaldi_mel_banks(num_mel_bins, padded, sample_rate, low_freq, high_freq)

    frames = x[:, frame_indices(x.shape[1], frame_length, frame_shift, snip_edges)]  # [batch, frames, length]
    if remove_dc_offset:
        frames = frames - jnp.mean(frames, axis=-1, keepdims=True)

    def log_energy(f):
        e = jnp.log(jnp.maximum(jnp.sum(f * f, axis=-1), FLOAT32_MIN))
        return jnp.maximum(e, math.log(energy_floor)) if energy_floor > 0 else e

    energy = log_energy(frames) if use_energy and raw_energy else None
    if preemphasis != 0.0:
        previous = jnp.concatenate([frames[..., :1], frames[..., :-1]], axis=-1)
        frames = frames - preemphasis * previous
    frames = frames * jnp.asarray(window_function(window, frame_length, blackman_coeff), jnp.float32)
    if use_energy and not raw_energy:
        energy = log_energy(frames)

    spectrum = jnp.fft.rfft(frames, n=padded, axis=-1)
    power = jnp.real(spectrum) ** 2 + jnp.imag(spectrum) ** 2
    if not use_power:
        power = jnp.sqrt(power)
    # HIGHEST: TPUs would otherwise multiply in bfloat16.
    mel = jnp.matmul(power, jnp.asarray(banks), precision=jax.lax.Precision.HIGHEST)
    if use_log_fbank:
        mel = jnp.log(jnp.maximum(mel, FLOAT32_EPS))
    if use_energy:
        parts = [mel, energy[..., None]] if htk_compat else [energy[..., None], mel]
        mel = jnp.concatenate(parts, axis=-1)
    return mel[0] if squeeze else mel

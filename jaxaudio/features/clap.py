"""CLAP's audio front end, as transformers' `ClapFeatureExtractor` computes it.

Per clip (1-D, at `settings.sample_rate`; `max_samples` = max_length_s * sample_rate):

- **length <= max_samples**: the clip is padded to `max_samples` (`repeat_pad`):
  'repeatpad' tiles it `max_samples // length` times and appends zeros, 'repeat' tiles it
  past the end and cuts, 'pad' appends zeros. Its log-mel has `frames` =
  max_samples // hop + 1 frames; 'fusion' stacks four copies of it. is_longer = False.
- **length > max_samples, 'rand_trunc'**: a random crop of `max_samples` samples
  (`random_crop_start`), one channel. is_longer = True.
- **length > max_samples, 'fusion'**: the log-mel of the *whole* clip (T frames), then
  `[shrink, front, middle, back]` (`fusion_stack`): `shrink` is the whole mel resized to
  `frames` rows by torch's bilinear interpolation (align_corners=False, no antialiasing;
  `bilinear_matrix`), the three others are `frames`-row crops whose starts are drawn one
  from each third of the possible starts (`fusion_crop_starts`). is_longer = True.
  Exception (as in HF): when T == `frames` (the clip is longer than max_samples by less
  than what reaches the next hop) the four channels are copies of the whole mel and
  is_longer = False.

The log-mel (`clap_log_mel`, JAX, jit-able) is a centred STFT (periodic Hann of n_fft,
reflect padding), power 2, a mel filterbank and dB = 10 log10(max(x, 1e-10)) with
reference 1 and no top_db. The filterbank follows the truncation mode, as HF's does:
'fusion' uses HTK-scale triangles without normalisation (HF `mel_filters`, torchaudio's
default), 'rand_trunc' Slaney scale with Slaney area norm (HF `mel_filters_slaney`,
librosa's default). A silent clip (or any all-zero frame) gives -100 dB everywhere, as HF;
nothing warns about it.

**Randomness.** `clap_input_features(..., rng=...)` draws nothing for clips of length <=
max_samples or for the T == frames case. For the others, in batch order:

- rng an int or None: `np.random.RandomState(rng)` (legacy MT19937, the generator behind
  `np.random.seed`) is used with HF's calls: per 'rand_trunc' long clip
  `randint(0, length - max_samples + 1)`; per 'fusion' long clip
  `choice(parts[0])`, `choice(parts[1])`, `choice(parts[2])` with
  `parts = np.array_split(np.arange(T - frames + 1), 3)` (an empty part replaced by `[0]`).
  Hence `np.random.seed(s); ClapFeatureExtractor(...)(waves)` crops exactly where
  `clap_input_features(waves, settings, rng=s)` does. A `RandomState` passed in is used
  the same way (and advanced).
- rng a `np.random.Generator`: the same sequence of calls with `integers(0, n)` and
  `choice(part)`; deterministic per generator state but not HF's stream.

**is_longer is deterministic.** HF, in 'fusion' mode, marks one *random* clip of a call
`is_longer=True` when no clip of the call is longer than max_samples (LAION-AI/CLAP#90:
the same clip gets different embeddings alone and in a batch). This module does not: such
clips get False. Where parity with HF's output matters, pass `is_longer=` explicitly (e.g.
HF's own flags); it replaces the computed flags (the features do not depend on it).

Differences from HF kept on purpose: HF hard-codes 64 mel bins in the shrink resize (it
fails for other sizes); here the mel axis is never resized. HF's `max_length_s` must be an
int for the fusion path (a float breaks its slicing); here any value with an integral
`max_length_s * sample_rate` works.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxaudio.features.mel import amplitude_to_db, mel_filterbank
from jaxaudio.features.stft import dft_kernels, stft

TRUNCATIONS = ("fusion", "rand_trunc")
PADDINGS = ("repeatpad", "repeat", "pad")
AMIN = 1e-10  # power floor: -100 dB


@dataclasses.dataclass(frozen=True)
class ClapFeatureSettings:
    """Settings of the CLAP front end (defaults: `laion/clap-htsat-fused`'s preprocessor).

    `truncation` also picks the mel filterbank: 'fusion' HTK without norm, 'rand_trunc'
    Slaney with Slaney norm (`mel_filters()`).
    """

    sample_rate: int = 48000
    n_fft: int = 1024
    hop_length: int = 480
    num_mel_bins: int = 64
    f_min: float = 50.0
    f_max: float = 14000.0
    max_length_s: float = 10.0
    truncation: str = "fusion"
    padding: str = "repeatpad"

    def __post_init__(self):
        for name in ("sample_rate", "n_fft", "hop_length", "num_mel_bins"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
                raise ValueError(f"ClapFeatureSettings.{name} must be a positive int, got {value!r}")
        if self.n_fft < 2:
            raise ValueError(f"ClapFeatureSettings.n_fft must be >= 2, got {self.n_fft}")
        for name in ("f_min", "f_max", "max_length_s"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)) \
                    or not math.isfinite(value):
                raise ValueError(f"ClapFeatureSettings.{name} must be a finite number, got {value!r}")
        if not 0.0 <= self.f_min < self.f_max:
            raise ValueError(f"ClapFeatureSettings.f_min must be in [0, f_max={self.f_max}), got {self.f_min}")
        if self.f_max > self.sample_rate / 2:
            raise ValueError(f"ClapFeatureSettings.f_max must be <= sample_rate / 2 = {self.sample_rate / 2}, "
                             f"got {self.f_max}")
        if self.max_length_s <= 0:
            raise ValueError(f"ClapFeatureSettings.max_length_s must be > 0, got {self.max_length_s}")
        samples = self.max_length_s * self.sample_rate
        if abs(samples - round(samples)) > 1e-6:
            raise ValueError(f"ClapFeatureSettings.max_length_s * sample_rate must be a whole number of samples, "
                             f"got {self.max_length_s} * {self.sample_rate} = {samples}")
        if round(samples) <= self.n_fft // 2:
            raise ValueError(f"ClapFeatureSettings.max_length_s gives {round(samples)} samples; reflect padding "
                             f"needs more than n_fft // 2 = {self.n_fft // 2}")
        if self.truncation not in TRUNCATIONS:
            raise ValueError(f"ClapFeatureSettings.truncation must be one of {TRUNCATIONS}, got {self.truncation!r}")
        if self.padding not in PADDINGS:
            raise ValueError(f"ClapFeatureSettings.padding must be one of {PADDINGS}, got {self.padding!r}")

    @classmethod
    def fusion(cls, **overrides) -> "ClapFeatureSettings":
        """`laion/clap-htsat-fused`: fusion crops, HTK mel without norm."""
        return cls(**{"truncation": "fusion", **overrides})

    @classmethod
    def unfused(cls, **overrides) -> "ClapFeatureSettings":
        """`laion/clap-htsat-unfused`: random 10 s crop, Slaney mel with Slaney norm."""
        return cls(**{"truncation": "rand_trunc", **overrides})

    @property
    def max_samples(self) -> int:
        return int(round(self.max_length_s * self.sample_rate))

    @property
    def frames(self) -> int:
        """Frames of a `max_samples` clip (HF `chunk_frames`): 1001 for the defaults."""
        return self.max_samples // self.hop_length + 1

    @property
    def channels(self) -> int:
        return 4 if self.truncation == "fusion" else 1

    def mel_filters(self) -> np.ndarray:
        """float32 `[n_fft // 2 + 1, num_mel_bins]` (read-only), HF `mel_filters` ('fusion') or
        `mel_filters_slaney` ('rand_trunc')."""
        return _filters(self.sample_rate, self.n_fft, self.num_mel_bins, float(self.f_min), float(self.f_max),
                        self.truncation == "fusion")

    def to_dict(self) -> dict[str, Any]:
        """JSON-able fields (for index headers); `from_dict` inverts it."""
        out = dataclasses.asdict(self)
        for key, value in out.items():
            if isinstance(value, np.generic):
                out[key] = value.item()
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ClapFeatureSettings":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"ClapFeatureSettings.from_dict: unknown keys {unknown}")
        return cls(**d)


@functools.lru_cache(maxsize=None)
def _filters(sr: int, n_fft: int, n_mels: int, f_min: float, f_max: float, htk: bool) -> np.ndarray:
    if htk:
        fb = mel_filterbank(sr, n_fft, n_mels, f_min, f_max, htk=True, norm=None)
    else:
        fb = mel_filterbank(sr, n_fft, n_mels, f_min, f_max, htk=False, norm="slaney")
    fb.setflags(write=False)  # cached: shared by every caller
    return fb


@functools.lru_cache(maxsize=None)
def _kernels(n_fft: int) -> tuple[np.ndarray, np.ndarray]:
    return dft_kernels(n_fft)


def _mel_key(settings: ClapFeatureSettings) -> tuple:
    """What the log-mel depends on (not padding, truncation's crops or max_length_s), so that
    settings differing only there share compiled programs."""
    return (settings.sample_rate, settings.n_fft, settings.hop_length, settings.num_mel_bins,
            float(settings.f_min), float(settings.f_max), settings.truncation == "fusion")


def _log_mel(x: jax.Array, key: tuple, center: bool, stft_method: str) -> jax.Array:
    sample_rate, n_fft, hop, n_mels, f_min, f_max, htk = key
    real_k, imag_k = _kernels(n_fft)
    real, imag = stft(x.astype(jnp.float32), real_k, imag_k, hop, center=center, pad_mode="reflect",
                      method=stft_method)
    power = jnp.square(real) + jnp.square(imag)  # [..., frames, freq]
    mel = jnp.matmul(power, jnp.asarray(_filters(sample_rate, n_fft, n_mels, f_min, f_max, htk)),
                     precision=jax.lax.Precision.HIGHEST)
    return amplitude_to_db(mel, AMIN)


def clap_log_mel(wave: jax.Array, settings: ClapFeatureSettings, *, stft_method: str = "fft") -> jax.Array:
    """CLAP dB log-mel of `[..., samples]` waveforms, computed in float32.

    Jit-able with `settings` (hashable) and `stft_method` static. No padding or cropping:
    that is `clap_input_features`' job.

    Returns:
        float32 `[..., samples // hop_length + 1, num_mel_bins]`.
    """
    if not isinstance(settings, ClapFeatureSettings):
        raise ValueError(f"settings must be a ClapFeatureSettings, got {type(settings).__name__}")
    if wave.ndim < 1:
        raise ValueError(f"wave must be [..., samples], got shape {tuple(wave.shape)}")
    if wave.shape[-1] <= settings.n_fft // 2:
        raise ValueError(f"wave has {wave.shape[-1]} samples; reflect padding needs more than "
                         f"n_fft // 2 = {settings.n_fft // 2}")
    return _log_mel(wave, _mel_key(settings), True, stft_method)


@functools.partial(jax.jit, static_argnums=(1, 2))
def _log_mel_padded(x: jax.Array, key: tuple, stft_method: str) -> jax.Array:
    """Log-mel of signals already centre-padded (reflect) in numpy: `[batch, padded] -> [batch, frames, mel]`."""
    return _log_mel(x, key, False, stft_method)


# ----------------------------------------------------------------------------- numpy helpers


def repeat_pad(wave: np.ndarray, max_samples: int, padding: str) -> np.ndarray:
    """A clip of at most `max_samples` samples brought to exactly `max_samples` (HF's padding).

    'repeatpad': tiled `max_samples // len` times, then zeros; 'repeat': tiled past
    `max_samples` and cut; 'pad': zeros appended. The dtype is kept.
    """
    wave = np.asarray(wave)
    if wave.ndim != 1:
        raise ValueError(f"wave must be 1-D [samples], got shape {wave.shape}")
    n = wave.shape[0]
    if n == 0:
        raise ValueError("wave is empty (0 samples)")
    if n > max_samples:
        raise ValueError(f"wave has {n} samples, more than max_samples={max_samples}; crop it instead")
    if padding not in PADDINGS:
        raise ValueError(f"padding must be one of {PADDINGS}, got {padding!r}")
    if n == max_samples:
        return wave
    if padding == "repeat":
        return np.tile(wave, max_samples // n + 1)[:max_samples]
    if padding == "repeatpad":
        wave = np.tile(wave, max_samples // n)
    return np.pad(wave, (0, max_samples - wave.shape[0]))


RandomLike = np.random.Generator | np.random.RandomState | int | None


def _as_rng(rng: RandomLike) -> np.random.Generator | np.random.RandomState:
    if isinstance(rng, (np.random.Generator, np.random.RandomState)):
        return rng
    if rng is None or (isinstance(rng, (int, np.integer)) and not isinstance(rng, bool)):
        return np.random.RandomState(None if rng is None else int(rng))
    raise ValueError(f"rng must be a numpy Generator, RandomState, int seed or None, got {type(rng).__name__}")


def _integer(rng, high: int) -> int:
    """Uniform in [0, high): `randint` (RandomState, as HF) or `integers` (Generator)."""
    if isinstance(rng, np.random.RandomState):
        return int(rng.randint(0, high))
    return int(rng.integers(0, high))


def random_crop_start(num_samples: int, max_samples: int, rng: RandomLike = 0) -> int:
    """Start of 'rand_trunc''s crop of a clip longer than `max_samples`: uniform over
    `[0, num_samples - max_samples]` (HF: `np.random.randint(0, overflow + 1)`)."""
    if num_samples <= max_samples:
        raise ValueError(f"num_samples ({num_samples}) must exceed max_samples ({max_samples}) to crop")
    return _integer(_as_rng(rng), num_samples - max_samples + 1)


def fusion_crop_starts(total_frames: int, chunk_frames: int, rng: RandomLike = 0) -> tuple[int, int, int]:
    """First frames of the front / middle / back crops of a fusion clip (HF `_random_mel_fusion`).

    The possible starts `0 .. total_frames - chunk_frames` are split into three parts
    (`np.array_split`); an empty part becomes `[0]`; one start is chosen per part with
    `rng.choice`, in that order.
    """
    if total_frames <= chunk_frames:
        raise ValueError(f"total_frames ({total_frames}) must exceed chunk_frames ({chunk_frames}) for fusion crops")
    rng = _as_rng(rng)
    parts = np.array_split(np.arange(total_frames - chunk_frames + 1), 3)
    parts = [p if len(p) else np.zeros(1, np.int64) for p in parts]
    return tuple(int(rng.choice(p)) for p in parts)


@functools.lru_cache(maxsize=64)
def bilinear_matrix(in_size: int, out_size: int) -> np.ndarray:
    """Torch linear interpolation with align_corners=False (no antialias) along one axis.

    Output i reads source coordinate `(i + 0.5) * in / out - 0.5`, clamped below at 0, from
    its floor and the next sample (the last sample only at the top edge). The coordinate is
    rounded as PyTorch's CPU kernel rounds it: float32 scale, then one fused multiply-add
    rounded once to float32 (the x86 wheel contracts `scale * (i + 0.5) - 0.5`; two
    roundings move some weights by 2e-6, i.e. outputs of a 100 dB-range mel by 2e-4).

    Returns:
        float32 `[out_size, in_size]` (read-only, cached); the identity when sizes agree.
    """
    if in_size < 1 or out_size < 1:
        raise ValueError(f"sizes must be positive, got {in_size} -> {out_size}")
    scale = np.float32(in_size / out_size)
    # float32 * float32 is exact in float64 and so is the - 0.5: a single rounding, as an FMA.
    src = ((np.arange(out_size) + 0.5) * np.float64(scale) - 0.5).astype(np.float32)
    src = np.maximum(src, np.float32(0.0))
    i0 = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
    i1 = np.minimum(i0 + 1, in_size - 1)
    w1 = np.clip(src - i0.astype(np.float32), 0.0, 1.0).astype(np.float32)
    w0 = np.float32(1.0) - w1
    matrix = np.zeros((out_size, in_size), np.float32)
    rows = np.arange(out_size)
    np.add.at(matrix, (rows, i0), w0)
    np.add.at(matrix, (rows, i1), w1)
    matrix.setflags(write=False)
    return matrix


def fusion_stack(mel: np.ndarray, chunk_frames: int, starts: tuple[int, int, int]) -> np.ndarray:
    """`[total_frames, mel] -> [4, chunk_frames, mel]`: the bilinear shrink of the whole mel,
    then the crops at `starts` (front, middle, back)."""
    mel = np.asarray(mel, np.float32)
    shrink = bilinear_matrix(mel.shape[0], chunk_frames) @ mel
    crops = [mel[s:s + chunk_frames] for s in starts]
    for s, c in zip(starts, crops):
        if c.shape[0] != chunk_frames:
            raise ValueError(f"crop start {s} + chunk_frames {chunk_frames} exceeds {mel.shape[0]} frames")
    return np.stack([shrink, *crops]).astype(np.float32)


def _check_wave(i: int, wave) -> np.ndarray:
    arr = np.asarray(wave)
    if arr.ndim != 1:
        raise ValueError(f"waves[{i}] has shape {arr.shape}; each clip must be 1-D mono [samples] "
                         f"(mix down or pick a channel first)")
    if not np.issubdtype(arr.dtype, np.floating):
        raise ValueError(f"waves[{i}] has dtype {arr.dtype}; clips must be floating point in [-1, 1] "
                         f"(convert integer PCM with e.g. x / 32768)")
    if arr.shape[0] == 0:
        raise ValueError(f"waves[{i}] is empty (0 samples)")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"waves[{i}] has non-finite samples (nan or inf)")
    return arr


def _bucket(length: int, unit: int) -> int:
    return -(-length // unit) * unit


def clap_input_features(
    waves: Sequence[np.ndarray],
    settings: ClapFeatureSettings,
    *,
    rng: RandomLike = 0,
    is_longer: Sequence[bool] | None = None,
    stft_method: str = "fft",
) -> tuple[np.ndarray, np.ndarray]:
    """`ClapFeatureExtractor(waves)` for `settings` (see the module docstring).

    Args:
        waves: 1-D float clips at `settings.sample_rate` (a 2-D array is read as a batch of rows).
        rng: crop randomness (int seed / None -> `np.random.RandomState`, as HF's global
            numpy; or a Generator / RandomState). The default 0 is deterministic.
        is_longer: if given, returned instead of the computed flags (e.g. to reproduce
            HF's random flag for batches of short clips in 'fusion' mode).

    Returns:
        (input_features float32 `[batch, channels, frames, num_mel_bins]` with channels 4
        ('fusion') or 1, is_longer bool `[batch]`).
    """
    if not isinstance(settings, ClapFeatureSettings):
        raise ValueError(f"settings must be a ClapFeatureSettings, got {type(settings).__name__}")
    if isinstance(waves, np.ndarray) and waves.ndim == 1:
        raise ValueError(f"waves must be a sequence of 1-D clips, got one 1-D array of shape {waves.shape} "
                         f"(wrap it in a list)")
    waves = [_check_wave(i, w) for i, w in enumerate(waves)]
    if not waves:
        raise ValueError("waves is empty (no clips)")
    if is_longer is not None:
        flags = np.asarray(is_longer)
        if flags.shape != (len(waves),) or not (flags.dtype == np.bool_ or np.isin(flags, (0, 1)).all()):
            raise ValueError(f"is_longer must be {len(waves)} bools (one per clip), got {is_longer!r}")
    rng = _as_rng(rng)
    max_samples, chunk, hop = settings.max_samples, settings.frames, settings.hop_length
    pad = settings.n_fft // 2

    # Per clip: the signal whose mel is taken, plus how the mel becomes channels. Random draws
    # happen here, in batch order, as in HF.
    signals, plans, longer = [], [], []
    for wave in waves:
        n = wave.shape[0]
        if n <= max_samples:
            signals.append(repeat_pad(wave, max_samples, settings.padding))
            plans.append(None)
            longer.append(False)
        elif settings.truncation == "rand_trunc":
            start = _integer(rng, n - max_samples + 1)
            signals.append(wave[start:start + max_samples])
            plans.append(None)
            longer.append(True)
        else:
            total = n // hop + 1
            signals.append(wave)
            if total == chunk:  # HF: longer than max_samples by less than reaches another frame
                plans.append(None)
                longer.append(False)
            else:
                plans.append(fusion_crop_starts(total, chunk, rng))
                longer.append(True)

    # Mels, computed in groups of equal (bucketed) length: centre padding is done here in
    # numpy, then zeros up to a multiple of the max_samples window so that long clips of
    # similar lengths share one compiled program; the zeros only feed frames that are dropped.
    mels: list[np.ndarray | None] = [None] * len(signals)
    groups: dict[int, list[int]] = {}
    padded = []
    for i, s in enumerate(signals):
        p = np.pad(s.astype(np.float32), (pad, pad), mode="reflect")
        length = p.shape[0] if s.shape[0] == max_samples else _bucket(p.shape[0], max_samples + 2 * pad)
        padded.append(p)
        groups.setdefault(length, []).append(i)
    for length, members in groups.items():
        batch = np.stack([np.pad(padded[i], (0, length - padded[i].shape[0])) for i in members])
        out = np.asarray(_log_mel_padded(jnp.asarray(batch), _mel_key(settings), stft_method))
        for row, i in enumerate(members):
            mels[i] = out[row, :signals[i].shape[0] // hop + 1]

    features = np.empty((len(waves), settings.channels, chunk, settings.num_mel_bins), np.float32)
    for i, (mel, plan) in enumerate(zip(mels, plans)):
        if plan is not None:
            features[i] = fusion_stack(mel, chunk, plan)
        else:
            features[i] = mel[None]  # broadcast to 4 copies in 'fusion' mode
    flags = np.asarray(longer, np.bool_) if is_longer is None else np.asarray(is_longer, np.bool_)
    return features, flags

"""Binaural room impulse responses of shoebox rooms by the image-source method.

Coordinates follow BAT / SoundSpaces: +x right, +y up, and the listener faces -z. A room
spans [0, Lx] x [0, Ly] x [0, Lz]. Each image source (the direct path and reflections up
to `max_order`) contributes the KEMAR impulse response nearest to its direction of
arrival, delayed by distance / 343 m/s (with a windowed-sinc fractional delay) and scaled
by 1/distance and the pressure reflection coefficient sqrt(1 - absorption) of every wall
it bounced off. The image positions are computed here directly (a few lines for a
shoebox), which keeps the result independent of any simulator's API;
tests/data/test_scenes.py checks them against pyroomacoustics.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import scipy.fft

from jaxaudio.data import hrtf as hrtf_lib

SPEED_OF_SOUND = 343.0  # m/s
_FRAC_TAPS = 16  # length of the windowed-sinc fractional-delay kernel


def _axis_images(length: float, s: float, max_order: int):
    """Image coordinates along one axis with their reflection counts off each wall.

    Image n, q has coordinate 2 n L + (1 - 2q) s and reflects |n - q| times off the wall
    at 0 and |n| times off the wall at L.

    Returns:
        (coordinate, hits at 0, hits at L), each `[k]`.
    """
    n = np.repeat(np.arange(-max_order, max_order + 1), 2)
    q = np.tile([0, 1], 2 * max_order + 1)
    hits0, hits1 = np.abs(n - q), np.abs(n)
    keep = hits0 + hits1 <= max_order
    return (2 * n * length + (1 - 2 * q) * s)[keep], hits0[keep], hits1[keep]


def image_sources(room_dims: Sequence[float], source_xyz: Sequence[float],
                  max_order: int, reflection: np.ndarray):
    """All image sources of a shoebox up to `max_order` reflections.

    Args:
        room_dims: (Lx, Ly, Lz) metres.
        source_xyz: `[3]` inside the room.
        max_order: the largest total number of reflections.
        reflection: `[6]` pressure reflection coefficients of the walls
            x=0, x=Lx, y=0, y=Ly, z=0, z=Lz.

    Returns:
        (positions `[k, 3]`, orders `[k]` int, gains `[k]` = product of the reflection
        coefficients met). The direct path is the row with order 0.
    """
    axes = [_axis_images(room_dims[a], source_xyz[a], max_order) for a in range(3)]
    pos = np.stack(np.meshgrid(*[ax[0] for ax in axes], indexing="ij"), -1).reshape(-1, 3)
    order = np.zeros(len(pos), dtype=np.int64)
    gain = np.ones(len(pos))
    for a, (_, h0, h1) in enumerate(axes):
        shape = [1, 1, 1]
        shape[a] = -1
        hits = np.broadcast_to((h0 + h1).reshape(shape), [len(ax[0]) for ax in axes])
        order += hits.reshape(-1)
        g = reflection[2 * a] ** h0.astype(np.float64) * reflection[2 * a + 1] ** h1
        gain *= np.broadcast_to(g.reshape(shape), hits.shape).reshape(-1)
    keep = order <= max_order
    return pos[keep], order[keep], gain[keep]


def _fractional_delay_kernels(delays: np.ndarray):
    """Hann-windowed sinc kernels that delay by `delays` samples.

    Returns:
        (first sample index `[k]` int, kernels `[k, _FRAC_TAPS]`).
    """
    start = np.floor(delays).astype(np.int64) - _FRAC_TAPS // 2 + 1
    taps = start[:, None] + np.arange(_FRAC_TAPS)[None, :] - delays[:, None]
    window = 0.5 + 0.5 * np.cos(np.pi * taps / (_FRAC_TAPS // 2))
    return start, np.sinc(taps) * window


def binaural_rir(
    room_dims: Sequence[float],
    absorption: float | Sequence[float],
    listener_xyz: Sequence[float],
    source_xyz: Sequence[float],
    hrtf: hrtf_lib.Hrtf,
    sr: int = 32000,
    max_order: int = 8,
    max_images: int = 400,
    rng: np.random.Generator | None = None,
    jitter_m: float = 0.05,
) -> np.ndarray:
    """Binaural room impulse response from a source to a listener in a shoebox room.

    Args:
        room_dims: (Lx, Ly, Lz) in metres.
        absorption: energy absorption coefficient in [0, 1), one for all walls or six for
            the walls x=0, x=Lx, y=0, y=Ly, z=0, z=Lz.
        listener_xyz: head centre `[3]`; the listener faces -z with +y up.
        source_xyz: `[3]`.
        hrtf: impulse responses at `sr` (`hrtf_lib.load_kemar(sr)`).
        sr: sample rate in Hz.
        max_order: largest number of wall reflections of an image source.
        max_images: keep only this many image sources, the loudest (gain / distance).
        rng: if given, each reflected image is displaced by up to `jitter_m` per axis
            (the randomised image method), which breaks the perfectly regular echo
            pattern of an ideal shoebox; None keeps the exact images.
        jitter_m: the displacement bound in metres.

    Returns:
        float32 `[2, L]` (left, right); sample 0 is the emission time, so the direct sound
        arrives after distance / 343 m/s plus the HRIR's own onset.
    """
    dims = np.asarray(room_dims, dtype=np.float64)
    listener = np.asarray(listener_xyz, dtype=np.float64)
    source = np.asarray(source_xyz, dtype=np.float64)
    for name, p in (("listener", listener), ("source", source)):
        if not np.all((p > 0) & (p < dims)):
            raise ValueError(f"{name} {p.tolist()} is not inside the room {dims.tolist()}")
    if hrtf.samplerate != sr:
        raise ValueError(f"hrtf is at {hrtf.samplerate} Hz but sr={sr}")
    alpha = np.broadcast_to(np.asarray(absorption, dtype=np.float64), (6,))
    if np.any((alpha < 0) | (alpha >= 1)):
        raise ValueError(f"absorption must be in [0, 1), got {absorption}")

    pos, order, gain = image_sources(dims, source, max_order, np.sqrt(1.0 - alpha))
    if rng is not None:
        pos = pos + (order > 0)[:, None] * rng.uniform(-jitter_m, jitter_m, pos.shape)
    rel = pos - listener
    dist = np.maximum(np.linalg.norm(rel, axis=-1), 1e-3)
    amp = gain / dist
    keep = np.argsort(-amp, kind="stable")[:max_images]
    rel, dist, amp = rel[keep], dist[keep], amp[keep]

    # Direction of arrival in BAT's convention: azimuth 0 = right (+x), 90 = front (-z).
    azimuth = np.degrees(np.arctan2(-rel[:, 2], rel[:, 0]))
    elevation = np.degrees(np.arcsin(np.clip(rel[:, 1] / dist, -1.0, 1.0)))
    firs = hrtf.firs[hrtf_lib.nearest_index(hrtf, azimuth, elevation)]  # [k, 2, taps]

    start, kernels = _fractional_delay_kernels(dist / SPEED_OF_SOUND * sr)
    start -= min(0, int(start.min()))  # a source within a few cm of the head
    taps = firs.shape[-1]
    seg_len = taps + _FRAC_TAPS - 1
    nfft = 1 << (seg_len - 1).bit_length()
    # Each image's HRIR convolved with its own delay kernel, all at once by FFT (float32
    # scipy.fft is several times faster than numpy.fft here and precise enough).
    kernels = (kernels * amp[:, None]).astype(np.float32)
    spec = scipy.fft.rfft(firs, nfft) * scipy.fft.rfft(kernels, nfft)[:, None, :]
    segs = scipy.fft.irfft(spec, nfft)[..., :seg_len]
    length = int(start.max()) + seg_len
    index = (start[:, None] + np.arange(seg_len)[None, :]).reshape(-1)
    out = np.stack([np.bincount(index, weights=segs[:, c].reshape(-1), minlength=length)
                    for c in range(2)])
    return out.astype(np.float32)

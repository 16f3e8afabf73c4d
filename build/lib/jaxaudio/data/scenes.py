"""Synthetic binaural scenes: one synthesised source in a random shoebox room per clip.

`generate_scenes` writes real files, so synthetic and real data take the same path:

    out_dir/classes.txt            class names, index = line number
    out_dir/<split>/000000.wav     2-channel float32 wav, [left, right]
    out_dir/<split>.params.json    the parameters the split was generated with
    out_dir/<split>.jsonl          the manifest (see `manifest.py`), written last

Every clip is a function of (seed, clip index) alone, so the same seed gives
byte-identical files whatever the number of workers. The manifest is written last and
removed first, so a split whose manifest exists is complete; `ensure_scenes` reuses such a
split when its parameters match and regenerates it otherwise.
"""

from __future__ import annotations

import concurrent.futures
import json
import logging
import multiprocessing
import os
import time
from collections.abc import Sequence

import numpy as np
from scipy import signal

from jaxaudio.data import audio as audio_lib
from jaxaudio.data import hrtf as hrtf_lib
from jaxaudio.data import manifest as manifest_lib
from jaxaudio.data import rooms
from jaxaudio.data.sources import SOURCE_CLASSES

_LOG = logging.getLogger(__name__)

# Bump when the rendering changes, so `ensure_scenes` regenerates old splits.
GENERATOR_VERSION = 1

ROOM_MIN = (3.0, 2.5, 3.0)  # metres, (x width, y height, z depth)
ROOM_MAX = (10.0, 4.0, 10.0)
ABSORPTION_RANGE = (0.2, 0.9)
EAR_HEIGHT_RANGE = (1.2, 1.8)
# The listener keeps this far from the side walls and the source this far from every
# wall; with the ranges above, every direction then has at least 0.5 m of free path.
LISTENER_MARGIN = 1.0
SOURCE_MARGIN = 0.2
DISTANCE_RANGE = (0.5, 5.0)
KEMAR_ELEVATION_RANGE = (-40.0, 90.0)
TARGET_DBFS = -14.0
PEAK_LIMIT = 0.99
# Below this many clips, starting worker processes costs more than it saves.
_MIN_CLIPS_PER_WORKER = 64


def _sample_geometry(rng: np.random.Generator) -> dict:
    """A random room, listener and source; positions rounded to the millimetre.

    The rounding happens before anything is computed from the positions, so the labels
    recomputed from the manifest's "x,y,z" strings equal the stored ones.
    """
    dims = rng.uniform(ROOM_MIN, ROOM_MAX)
    absorption = rng.uniform(*ABSORPTION_RANGE)
    listener = np.array([
        rng.uniform(LISTENER_MARGIN, dims[0] - LISTENER_MARGIN),
        rng.uniform(*EAR_HEIGHT_RANGE),
        rng.uniform(LISTENER_MARGIN, dims[2] - LISTENER_MARGIN),
    ])
    azimuth = np.radians(rng.uniform(0.0, 360.0))
    # Mostly near the horizontal plane, sometimes anywhere KEMAR has measurements.
    if rng.uniform() < 0.1:
        elevation = rng.uniform(*KEMAR_ELEVATION_RANGE)
    else:
        elevation = np.clip(rng.normal(0.0, 12.0), *KEMAR_ELEVATION_RANGE)
    elevation = np.radians(elevation)
    # Our convention: azimuth 0 = right (+x), 90 = front (-z).
    direction = np.array([np.cos(elevation) * np.cos(azimuth), np.sin(elevation),
                          -np.cos(elevation) * np.sin(azimuth)])
    # Longest path along `direction` that stays SOURCE_MARGIN inside every wall.
    with np.errstate(divide="ignore", invalid="ignore"):
        to_wall = np.where(direction > 0, (dims - SOURCE_MARGIN - listener) / direction,
                           (SOURCE_MARGIN - listener) / direction)
    free = np.min(np.where(direction != 0, to_wall, np.inf))
    distance = rng.uniform(DISTANCE_RANGE[0], max(DISTANCE_RANGE[0],
                                                  min(DISTANCE_RANGE[1], free)))
    source = listener + distance * direction
    return {
        "room": np.round(dims, 3),
        "absorption": round(float(absorption), 3),
        "listener": np.round(listener, 3),
        "source": np.round(source, 3),
    }


def render_clip(seed: int, index: int, sample_rate: int, clip_seconds: float,
                classes: Sequence[str]) -> tuple[np.ndarray, dict]:
    """Renders clip `index` of the scenes generated with `seed`.

    Returns:
        (audio float32 `[2, time]`, manifest record without the "audio" field).
    """
    rng = np.random.default_rng([seed, index])
    n = int(round(clip_seconds * sample_rate))
    name = classes[int(rng.integers(len(classes)))]
    geo = _sample_geometry(rng)
    dry = SOURCE_CLASSES[name](rng, sample_rate, n)
    brir = rooms.binaural_rir(geo["room"], geo["absorption"], geo["listener"],
                              geo["source"], hrtf_lib.load_kemar(sample_rate),
                              sr=sample_rate, rng=rng)
    wet = signal.fftconvolve(dry[None, :], brir, axes=-1)[:, :n]
    wet = audio_lib.normalize_rms(audio_lib.fit_length(wet, n), TARGET_DBFS)
    peak = np.max(np.abs(wet))
    if peak > PEAK_LIMIT:  # sparse sounds (clicks, drums) at -14 dBFS RMS would clip
        wet = wet * (PEAK_LIMIT / peak)
    record = {
        "labels": [name],
        **manifest_lib.spatial_targets(geo["listener"], geo["source"]),
        "distance_m": round(float(np.linalg.norm(geo["source"] - geo["listener"])), 3),
        "source_position": manifest_lib.format_xyz(geo["source"]),
        "sensor_position": manifest_lib.format_xyz(geo["listener"]),
        "room": manifest_lib.format_xyz(geo["room"]),
        "absorption": geo["absorption"],
    }
    return wet.astype(np.float32), record


def _write_clip(job) -> dict:
    split_dir, index, seed, sample_rate, clip_seconds, classes = job
    audio, record = render_clip(seed, index, sample_rate, clip_seconds, classes)
    path = os.path.join(split_dir, f"{index:06d}.wav")
    audio_lib.write_wav(path, audio, sample_rate)
    return {"audio": path, **record}


def default_workers(num_clips: int) -> int:
    """Worker processes for generating `num_clips` items (at least 64 each, at most 8)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (
        os.cpu_count() or 1)
    return max(1, min(cpus, 8, num_clips // _MIN_CLIPS_PER_WORKER))


def map_jobs(fn, jobs: list, num_workers: int | None = None) -> list:
    """`[fn(job) for job in jobs]`, in worker processes when there are enough jobs
    (`default_workers`; `num_workers` overrides). The generators' items depend only on
    their job, so the result is the same whatever the number of workers."""
    workers = default_workers(len(jobs)) if num_workers is None else max(1, num_workers)
    if workers == 1:
        return [fn(job) for job in jobs]
    # spawn, not fork: the parent may hold JAX's threads, which fork cannot copy.
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        return list(pool.map(fn, jobs, chunksize=16))


def _params(num_clips, seed, sample_rate, clip_seconds, classes, split_name) -> dict:
    return {
        "generator_version": GENERATOR_VERSION,
        "num_clips": int(num_clips),
        "seed": int(seed),
        "sample_rate": int(sample_rate),
        "clip_seconds": float(clip_seconds),
        "classes": list(classes),
        "split_name": split_name,
    }


def _paths(out_dir: str, split_name: str) -> tuple[str, str, str, str]:
    return (os.path.join(out_dir, split_name), os.path.join(out_dir, f"{split_name}.jsonl"),
            os.path.join(out_dir, f"{split_name}.params.json"),
            os.path.join(out_dir, "classes.txt"))


def _check_classes(classes: Sequence[str] | None) -> list[str]:
    classes = list(SOURCE_CLASSES) if classes is None else list(classes)
    unknown = [c for c in classes if c not in SOURCE_CLASSES]
    if unknown or not classes:
        raise ValueError(f"unknown source classes {unknown}; choose from "
                         f"{sorted(SOURCE_CLASSES)}")
    return classes


def generate_scenes(
    out_dir: str | os.PathLike,
    num_clips: int,
    seed: int,
    sample_rate: int = 32000,
    clip_seconds: float = 1.0,
    classes: Sequence[str] | None = None,
    split_name: str = "train",
    num_workers: int | None = None,
) -> str:
    """Generates a split of binaural scene clips and returns its manifest path.

    Args:
        out_dir: dataset folder (created); several splits can share it, and share its
            classes.txt.
        num_clips: clips to write.
        seed: the clips are a function of (seed, clip index).
        sample_rate: Hz.
        clip_seconds: length of every clip.
        classes: names from `SOURCE_CLASSES` (default: all, in registry order); each
            clip draws one uniformly.
        split_name: names the wav folder and the manifest.
        num_workers: processes; default one per CPU (at most 8), fewer for small jobs.
            More than one starts processes with "spawn", so a calling script needs the
            usual `if __name__ == "__main__":` guard.

    Returns:
        path of `out_dir/<split_name>.jsonl`.
    """
    out_dir = os.path.abspath(os.fspath(out_dir))
    classes = _check_classes(classes)
    split_dir, manifest_path, params_path, classes_path = _paths(out_dir, split_name)
    # Removing the manifest first marks the split incomplete until it is rewritten.
    for stale in (manifest_path, params_path):
        if os.path.exists(stale):
            os.remove(stale)
    os.makedirs(split_dir, exist_ok=True)
    jobs = [(split_dir, i, seed, sample_rate, clip_seconds, classes)
            for i in range(num_clips)]
    start = time.perf_counter()
    records = map_jobs(_write_clip, jobs, num_workers)
    manifest_lib.write_classes(classes_path, classes)
    with open(params_path, "w", encoding="utf-8") as f:
        json.dump(_params(num_clips, seed, sample_rate, clip_seconds, classes, split_name),
                  f, indent=1)
    manifest_lib.write_manifest(manifest_path, records)
    _LOG.info("wrote %d %s clips to %s in %.1f s", num_clips, split_name,
              out_dir, time.perf_counter() - start)
    return manifest_path


def ensure_scenes(
    out_dir: str | os.PathLike,
    num_clips: int,
    seed: int,
    sample_rate: int = 32000,
    clip_seconds: float = 1.0,
    classes: Sequence[str] | None = None,
    split_name: str = "train",
    num_workers: int | None = None,
) -> str:
    """Returns the manifest of an existing complete split, generating it if needed.

    The split is reused only if its manifest exists, its params.json equals the requested
    parameters (and the generator version), classes.txt lists the requested classes, the
    manifest has `num_clips` records and every wav exists. Arguments as `generate_scenes`.
    """
    out_dir = os.path.abspath(os.fspath(out_dir))
    classes = _check_classes(classes)
    _, manifest_path, params_path, classes_path = _paths(out_dir, split_name)
    wanted = _params(num_clips, seed, sample_rate, clip_seconds, classes, split_name)
    try:
        with open(params_path, encoding="utf-8") as f:
            same = json.load(f) == wanted
        same = same and manifest_lib.read_classes(classes_path) == classes
        records = manifest_lib.read_manifest(manifest_path) if same else []
        if same and len(records) == num_clips and all(
                os.path.exists(r["audio"]) for r in records):
            return manifest_path
    except (OSError, ValueError) as e:  # missing or damaged files: regenerate
        _LOG.info("regenerating %s (%s)", manifest_path, e)
    return generate_scenes(out_dir, num_clips, seed, sample_rate, clip_seconds, classes,
                           split_name, num_workers)

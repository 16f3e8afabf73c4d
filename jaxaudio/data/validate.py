"""Checks a data set's files before the first training step, from their headers only.

A missing, mono or empty clip otherwise stops training only when its batch comes, inside a
data-loader thread. The tasks call this from `prepare_data` (process 0) for the training and
evaluation data; every problem of every entry goes into one `DataError`, one line each:

    path/to/train.jsonl:LINE: /abs/clip.wav: mono, but this model needs 2 channels

What is checked (`ClipSpec`, `clip_problem`, `rir_problem`, `check_manifest`):
- a clip: exists, is a file, is not 0 bytes, is readable, libsndfile opens it (the reader of
  `data.audio.load_audio`; it has no other), it has samples, and its channel count, sample
  rate and length are what the task needs (each only if the task constrains it);
- a room response (`rir`, `.npy`): exists, is an array of shape `[2, L]`, `L > 0`;
- a manifest: it has records, and each label is in the class list (with a near match named).
Not checked: sample values (NaN/Inf show only when the clip is decoded; `load_audio` says so).
"""
from __future__ import annotations

import difflib
import os
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import soundfile as sf

from jaxaudio.data.manifest import MAX_LISTED, record_lines

# Header reads are I/O bound (and network file systems slow): threads overlap them.
_THREADS = 16
_CHUNK = 4096


class DataError(ValueError):
    """Data that cannot train; `problems` holds every line, the message the first `MAX_LISTED`."""

    def __init__(self, title: str, problems: Sequence[str], hint: str = ""):
        self.problems = list(problems)
        lines = self.problems[:MAX_LISTED]
        if len(self.problems) > MAX_LISTED:
            lines.append(f"... and {len(self.problems) - MAX_LISTED} more")
        count = f"{len(self.problems)} problem{'s' if len(self.problems) != 1 else ''}"
        super().__init__(f"{title}: {count}\n  " + "\n  ".join(lines) + (f"\n{hint}" if hint else ""))


@dataclass(frozen=True)
class ClipSpec:
    """What a task needs of a clip; None: anything (the task mixes down / resamples / pads)."""
    channels: int | None = None
    sample_rate: int | None = None
    min_seconds: float | None = None
    max_seconds: float | None = None


def _file_problem(path: str) -> str | None:
    """The problems a path can have before its contents are read."""
    if not os.path.exists(path):
        folder = os.path.dirname(path)
        if folder and not os.path.isdir(folder):
            return f"no such file (its folder {folder} does not exist either)"
        return "no such file"
    if os.path.isdir(path):
        return "is a directory, not a file"
    if not os.access(path, os.R_OK):
        return "not readable (permission denied)"
    if os.path.getsize(path) == 0:
        return "empty file (0 bytes)"
    return None


def clip_problem(path: str, spec: ClipSpec = ClipSpec()) -> str | None:
    """Why the audio file at `path` cannot serve (header only), or None."""
    problem = _file_problem(path)
    if problem:
        return problem
    try:
        info = sf.info(path)
    except (sf.LibsndfileError, RuntimeError, OSError) as e:
        return f"not an audio file libsndfile can read ({str(e).split(': ')[-1]})"
    if info.frames <= 0 or info.channels <= 0:
        return "holds no samples"
    if spec.channels is not None and info.channels != spec.channels:
        if info.channels == 1 and spec.channels == 2:
            return "mono, but this model needs 2 channels (binaural)"
        return f"{info.channels} channels, but this model needs {spec.channels}"
    if spec.sample_rate is not None and info.samplerate != spec.sample_rate:
        return f"{info.samplerate} Hz, but this model needs {spec.sample_rate} Hz (it does not resample)"
    seconds = info.frames / info.samplerate
    if spec.min_seconds is not None and seconds < spec.min_seconds:
        return f"{seconds:.3f} s long, shorter than the {spec.min_seconds} s this model needs"
    if spec.max_seconds is not None and seconds > spec.max_seconds:
        return f"{seconds:.3f} s long, longer than the {spec.max_seconds} s this model takes"
    return None


def rir_problem(path: str) -> str | None:
    """Why a binaural room response (`.npy`, `[2, L]`, as `spatialsoundqa.load_rir` reads
    it) cannot serve, or None; only the array header is read."""
    problem = _file_problem(path)
    if problem:
        return problem
    try:
        rir = np.load(path, mmap_mode="r")
    except (OSError, ValueError) as e:
        return f"not a .npy array ({e})"
    if not isinstance(rir, np.ndarray) or rir.ndim != 2 or rir.shape[0] != 2:
        return f"room response of shape {getattr(rir, 'shape', '?')}, expected (2, samples)"
    if rir.shape[1] == 0:
        return "room response with no samples"
    return None


Check = Callable[[str], "str | None"]


def _file_lines(entries: Sequence[tuple[str, str, Check]]) -> list[tuple[int, str]]:
    """`(index of the first entry, line)` per bad `(path, check)`; see `check_files`."""
    keys = list(dict.fromkeys((path, check) for _, path, check in entries))
    results = {}
    with ThreadPoolExecutor(min(_THREADS, max(len(keys), 1))) as pool:
        for start in range(0, len(keys), _CHUNK):  # `map` submits everything at once: bound it
            chunk = keys[start:start + _CHUNK]
            results.update(zip(chunk, pool.map(lambda k: k[1](k[0]), chunk)))
    users: dict[tuple, list[int]] = {}
    for i, (_, path, check) in enumerate(entries):
        if results[(path, check)]:
            users.setdefault((path, check), []).append(i)
    lines = []
    for (path, check), idx in users.items():
        more = f" (and {len(idx) - 1} more entries use it)" if len(idx) > 1 else ""
        lines.append((idx[0], f"{entries[idx[0]][0]}: {path}: {results[(path, check)]}{more}"))
    return lines


def check_files(entries: Iterable[tuple[str, str, Check]]) -> list[str]:
    """`[(where, path, check)]` -> `"where: path: problem"` lines, in entry order.

    Each distinct `(path, check)` is read once (many questions share a clip); a bad file
    used by several entries is listed at the first, with the count of the others.
    """
    return [line for _, line in _file_lines(list(entries))]


def label_problems(where: str, labels: Iterable[str], classes: Sequence[str], classes_name: str) -> list[str]:
    """A line per label that is not in the class list, naming a near match if there is one."""
    known = set(classes)
    out = []
    for label in labels:
        if label in known:
            continue
        near = difflib.get_close_matches(label, classes, n=1, cutoff=0.6)
        near += [c for c in classes if c.strip().lower() == label.strip().lower() and c not in near]
        hint = f"; did you mean {near[0]!r}?" if near else ""
        out.append(f"{where}: unknown label {label!r} (not in {classes_name}{hint})")
    return out


def record_files(record: dict, spec: ClipSpec) -> list[tuple[str, Check]]:
    """`(path, check)` of the files a manifest / SpatialSoundQA record names. A record with a
    `rir` is the official kind: its clip is mono (any channel count; the first is used) and
    rendered through the room response, so `spec.channels` does not apply to it."""
    if not record.get("rir"):
        return [(record["audio"], clip_check(spec))]
    mono = clip_check(ClipSpec(None, spec.sample_rate, spec.min_seconds, spec.max_seconds))
    out = []
    for s in ("", "2") if record.get("audio2") else ("",):
        out += [(record["audio" + s], mono), (record["rir" + s], rir_problem)]
    return out


_CHECKS: dict[ClipSpec, Check] = {}


def clip_check(spec: ClipSpec) -> Check:
    """`clip_problem` with `spec` as a one-argument check for `check_files`; the same object
    for equal specs, so a clip is read once however many entries use it."""
    if spec not in _CHECKS:
        _CHECKS[spec] = lambda path: clip_problem(path, spec)
    return _CHECKS[spec]


def check_manifest(path: str, records: Sequence[dict], spec: ClipSpec, *, classes: Sequence[str] | None = None,
                   classes_name: str = "the class list", label_field: str = "labels",
                   record_check: Callable[[dict], str | None] | None = None) -> list[str]:
    """Every problem of a jsonl manifest's records (`read_manifest(path)`), one line each,
    `"path:LINE: ..."`: an empty manifest, a record that `record_check` refuses, labels not
    in `classes` (`label_field`: a list of names, or one name), and each file (`record_files`)."""
    if not records:
        return [f"{path}: the manifest holds no records"]
    lines = record_lines(path)
    if len(lines) != len(records):  # not the file's records as read: number them instead
        lines = None
    wheres = [f"{path}:{lines[i]}" if lines else f"{path}: record {i + 1}" for i in range(len(records))]
    problems = []  # (record index, line), sorted by record at the end
    for i, (where, rec) in enumerate(zip(wheres, records)):
        if record_check is not None and (problem := record_check(rec)):
            problems.append((i, f"{where}: {problem}"))
        labels = rec.get(label_field)
        if classes is not None and labels is not None:
            names = [labels] if isinstance(labels, str) else labels
            if isinstance(names, list) and all(isinstance(n, str) for n in names):
                problems += [(i, line) for line in label_problems(where, names, classes, classes_name)]
            else:
                problems.append((i, f"{where}: field {label_field!r} must be a class name or a list of them, "
                                    f"got {labels!r}"))
    files = [(i, (where, p, check)) for i, (where, rec) in enumerate(zip(wheres, records))
             for p, check in record_files(rec, spec)]
    problems += [(files[j][0], line) for j, line in _file_lines([entry for _, entry in files])]
    return [line for _, line in sorted(problems, key=lambda p: p[0])]


def raise_if(problems: Sequence[str], title: str, hint: str = "") -> None:
    """`DataError(title, problems)` unless there are none; a hint is added when every file is
    missing (the usual cause: paths relative to the wrong folder)."""
    if not problems:
        return
    if not hint and all("no such file" in p for p in problems) and len(problems) > 1:
        hint = ("None of the listed files exists: relative paths are resolved against the manifest's "
                "folder (or config.data.audio_root where the task has one).")
    raise DataError(title, problems, hint)

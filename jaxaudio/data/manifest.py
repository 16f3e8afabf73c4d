"""The jsonl manifest of binaural clips, the class-list file, and BAT's direction labels.

A manifest holds one JSON object per line:

    {"audio": "train/000000.wav",   # 2-channel wav, relative to the manifest's folder
     "labels": ["bell"],            # class names
     "azimuth": 90,                 # int 0..359; 0 = right, 90 = front, 180 = left
     "elevation": 90,               # int 0..179; 90 = horizontal (see `spatial_targets`)
     "distance": 3,                 # int bin 0..20, 0.5 m per bin
     ...}                           # any extra fields, kept as they are

Extra fields written by the generators: `distance_m`, `source_position`,
`sensor_position` and `room` ("x,y,z" strings, metres), `absorption`.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence

import numpy as np

NUM_AZIMUTHS = 360
NUM_ELEVATIONS = 180
NUM_DISTANCES = 21

DEFAULT_REQUIRED = ("audio", "labels", "azimuth", "elevation", "distance")
# Fields holding file paths, stored relative to the manifest's folder: the clip, and for
# records of the official SpatialSoundQA layout the RIR and a second source.
PATH_FIELDS = ("audio", "rir", "audio2", "rir2")


class ManifestError(ValueError):
    """A manifest or class list that cannot be used; the message names file and line."""


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _int_in(lo: int, hi: int):
    return (lambda v: _is_int(v) and lo <= v <= hi), f"an int in [{lo}, {hi}]"


def _is_path(v) -> bool:
    return isinstance(v, str) and v != ""


# field -> (check, description); applied to every field present, required or not.
_FIELD_CHECKS = {
    "audio": (_is_path, "a non-empty string path"),
    # null marks "no second source" / "already binaural" in official-layout records.
    **{f: ((lambda v: v is None or _is_path(v)), "a non-empty string path or null")
       for f in PATH_FIELDS[1:]},
    "labels": ((lambda v: isinstance(v, list) and all(isinstance(s, str) for s in v)),
               "a list of strings"),
    "azimuth": _int_in(0, NUM_AZIMUTHS - 1),
    "elevation": _int_in(0, NUM_ELEVATIONS - 1),
    "distance": _int_in(0, NUM_DISTANCES - 1),
}


MAX_LISTED = 50  # problems listed in one error message; the rest are counted


def _read_lines(path: str) -> list[str]:
    try:
        # utf-8-sig: a manifest saved by a Windows editor starts with a byte-order mark.
        with open(path, encoding="utf-8-sig") as f:
            return f.readlines()
    except OSError as e:
        raise ManifestError(f"cannot read manifest {path}: {e}") from e
    except UnicodeDecodeError as e:
        raise ManifestError(f"manifest {path} is not UTF-8 text (byte {e.start}): is it a jsonl file?") from None


def record_lines(path: str | os.PathLike) -> list[int]:
    """The 1-based line number of each record `read_manifest(path)` returns, in order."""
    return [n for n, line in enumerate(_read_lines(os.fspath(path)), start=1) if line.strip()]


def _line_problems(rec, required: Sequence[str]) -> list[str]:
    if not isinstance(rec, dict):
        return [f"expected a JSON object, got {type(rec).__name__}"]
    out = [f"missing field {field!r}" for field in required if field not in rec]
    return out + [f"field {field!r} must be {what}, got {rec[field]!r}"
                  for field, (ok, what) in _FIELD_CHECKS.items() if field in rec and not ok(rec[field])]


def read_manifest(path: str | os.PathLike,
                  required: Sequence[str] = DEFAULT_REQUIRED) -> list[dict]:
    """Reads and checks a jsonl manifest.

    Blank lines are skipped. The paths in `PATH_FIELDS` ("audio", and "rir", "audio2",
    "rir2" where present) are made absolute; relative ones are relative to the manifest's
    folder.

    Returns:
        one dict per record, in file order.

    Raises:
        ManifestError: the file is missing or not UTF-8 text, a line is not a JSON object,
            a `required` field is missing, or a known field has the wrong type or range.
            Every bad line is listed (`path:LINE: problem`, the first `MAX_LISTED`).
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    records, problems = [], []
    for lineno, line in enumerate(_read_lines(path), start=1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            problems.append(f"{where}: invalid JSON ({e.msg})")
            continue
        bad = _line_problems(rec, required)
        problems += [f"{where}: {p}" for p in bad]
        if bad:
            continue
        for field in PATH_FIELDS:
            if rec.get(field) is not None:
                rec[field] = os.path.normpath(os.path.join(folder, rec[field]))
        records.append(rec)
    if len(problems) == 1:
        raise ManifestError(problems[0])
    if problems:
        listed = problems[:MAX_LISTED] + ([f"... and {len(problems) - MAX_LISTED} more"]
                                          if len(problems) > MAX_LISTED else [])
        raise ManifestError(f"{path}: {len(problems)} problems\n  " + "\n  ".join(listed))
    return records


def _jsonable(v):
    """Lets numpy scalars and arrays through `json.dumps`."""
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, np.ndarray):
        return v.tolist()
    raise TypeError(f"{type(v).__name__} is not JSON serializable")


def write_manifest(path: str | os.PathLike, records: Iterable[Mapping]) -> None:
    """Writes records as jsonl, atomically (a temporary file renamed into place).

    Absolute paths in `PATH_FIELDS` are stored relative to the manifest's folder, so the
    folder can be moved and `read_manifest` gives back the same absolute paths.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for rec in records:
            rec = dict(rec)
            for field in PATH_FIELDS:
                if isinstance(rec.get(field), str) and os.path.isabs(rec[field]):
                    rec[field] = os.path.relpath(rec[field], folder)
            f.write(json.dumps(rec, ensure_ascii=False, default=_jsonable) + "\n")
    os.replace(tmp, path)


def write_json_atomic(path: str | os.PathLike, doc) -> None:
    """`json.dump` through a temporary file and a rename, so an interrupted write leaves
    no half file that a cache check would take for done."""
    tmp = os.fspath(path) + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(doc, f, indent=1, ensure_ascii=False)
    os.replace(tmp, path)


def parse_xyz(s: str) -> np.ndarray:
    """Parses an "x,y,z" position string (the SpatialSoundQA format) to float64 `[3]`."""
    parts = s.split(",")
    if len(parts) != 3:
        raise ValueError(f"expected an 'x,y,z' position, got {s!r}")
    return np.array([float(p) for p in parts])


def format_xyz(xyz: Sequence[float]) -> str:
    """Formats a position as an "x,y,z" string that `parse_xyz` reads back exactly."""
    return ",".join(repr(float(v)) for v in xyz)


def spatial_targets(sensor_xyz: Sequence[float] | str,
                    source_xyz: Sequence[float] | str) -> dict[str, int]:
    """BAT's distance / azimuth / elevation class labels for a source heard at a sensor.

    Coordinates are SoundSpaces': +x right, +y up, front = -z. With d = source - sensor:

    - distance = round(2 |d|): 0.5 m bins (Python's round, so 2.5 -> 2);
    - azimuth = (round(deg(atan2(-dz, dx))) + 360) % 360: 0 right, 90 front, 180 left,
      270 back;
    - elevation = (round(deg(atan(dy / sqrt(dx^2 + dz^2)))) + 90) % 180: 90 horizontal,
      179 almost straight up; straight up (+90 deg) wraps to 0, the bin of straight down.

    This reproduces the original `fetch_spatial_targets` on float64 positions, including
    dividing by a zero horizontal distance (straight up or down gives +-inf, hence bin 0).

    Args:
        sensor_xyz, source_xyz: `[3]` positions in metres, or "x,y,z" strings.

    Raises:
        ValueError: the two positions coincide (the direction is undefined).
    """
    sensor = parse_xyz(sensor_xyz) if isinstance(sensor_xyz, str) else np.asarray(
        sensor_xyz, dtype=np.float64)
    source = parse_xyz(source_xyz) if isinstance(source_xyz, str) else np.asarray(
        source_xyz, dtype=np.float64)
    dx, dy, dz = (float(v) for v in source - sensor)
    horizontal = math.sqrt(dx * dx + dz * dz)
    if horizontal == 0.0:
        if dy == 0.0:
            raise ValueError(f"source {source.tolist()} coincides with sensor "
                             f"{sensor.tolist()}: no direction")
        elevation_deg = math.copysign(90.0, dy)
    else:
        elevation_deg = math.degrees(math.atan(dy / horizontal))
    return {
        "distance": round(float(np.linalg.norm(source - sensor)) * 2),
        "azimuth": (round(math.degrees(math.atan2(-dz, dx))) + 360) % 360,
        "elevation": (round(elevation_deg) + 90) % 180,
    }


def write_classes(path: str | os.PathLike, names: Sequence[str]) -> None:
    """Writes a class list, one name per line; a class's index is its 0-based line."""
    names = list(names)
    for name in names:
        if not name or name != name.strip() or "\n" in name:
            raise ManifestError(f"cannot write {path}: bad class name {name!r}")
    if len(set(names)) != len(names):
        raise ManifestError(f"cannot write {path}: duplicate class names")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = os.fspath(path) + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write("".join(name + "\n" for name in names))
    os.replace(tmp, path)


def read_classes(path: str | os.PathLike) -> list[str]:
    """Reads a class list written by `write_classes`; index = 0-based line number."""
    try:
        with open(path, encoding="utf-8-sig") as f:
            names = f.read().splitlines()
    except OSError as e:
        raise ManifestError(f"cannot read class list {path}: {e}") from e
    except UnicodeDecodeError as e:
        raise ManifestError(f"class list {path} is not UTF-8 text (byte {e.start})") from None
    for lineno, name in enumerate(names, start=1):
        if not name.strip():
            raise ManifestError(f"{path}:{lineno}: empty class name")
    if len(set(names)) != len(names):
        raise ManifestError(f"{path}: duplicate class names")
    return names


def labels_to_multihot(labels: Sequence[str],
                       class_index: Mapping[str, int] | Sequence[str]) -> np.ndarray:
    """Multi-hot target for a list of class names.

    Args:
        labels: class names present in the clip.
        class_index: name -> index, or the class list itself (index = position).

    Returns:
        float32 `[num_classes]`, 1 at each label's index.

    Raises:
        ManifestError: a label is not in the class list (the message names it).
    """
    if not isinstance(class_index, Mapping):
        class_index = {name: i for i, name in enumerate(class_index)}
    out = np.zeros(len(class_index), dtype=np.float32)
    for label in labels:
        if label not in class_index:
            raise ManifestError(f"unknown label {label!r}; not one of the "
                                f"{len(class_index)} classes in the class list")
        out[class_index[label]] = 1.0
    return out

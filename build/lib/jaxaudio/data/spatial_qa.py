"""Generated SpatialSoundQA: BAT's five question types, written in the official layout.

Generated and real data take the same reading path (`jaxaudio.data.spatialsoundqa`):

    <root>/audio/<audio_id>.wav                  mono procedural clip (`sources.py`), 32 kHz
    <root>/reverb/binaural/<fname>               binaural RIR .npy float32 [2, L] (`rooms.py`
                                                 image sources + KEMAR), fname "<split>_<i>/<k>.npy"
    <root>/reverb/<split>_reverberation.json     {"data": [{fname, sensor_position,
                                                 source_position, agent_position, room,
                                                 absorption}]}, positions as "x,y,z" strings
    <root>/<split>.json                          {"data": [QA items]}, split = train | eval
    <root>/spatial_qa.params.json                generation parameters, written last

QA items have the official fields {audio_id, reverb_id, audio_id2, reverb_id2, question_id,
question_type, question, answer} (the *2 fields null for one source) plus the ground truth:
"labels" (class names), "azimuth", "elevation" (BAT bins, `manifest.spatial_targets`),
"distance_m", "source_position", "sensor_position", the same suffixed "2" for the second
source, and "relation" for the yes/no types and MIXUP_NONBINARY_SOURCE.

Question types (letter: question_type):

    A  CLASSIFICATION               1 source   which sound
    B  DOA                          1 source   direction and distance
    C  MIXUP_SINGLE_CLASSIFICATION  2 sources  which sounds
    D  MIXUP_SINGLE_DOA             2 sources  direction and distance of the named source
    E  MIXUP_DIRECTION              2 sources  is X <relation> Y?      (yes/no)
       MIXUP_DISTANCE_BOTH          2 sources  is X closer/farther than Y?  (yes/no)
       MIXUP_NONBINARY_DIRECTION    2 sources  direction of X relative to Y
       MIXUP_NONBINARY_DISTANCE     2 sources  distance between X and Y
       MIXUP_NONBINARY_SOURCE       2 sources  which sound is <relation> Y?  (X's label)

The named source X is always source 1 (audio_id / reverb_id) and Y source 2; which clip is
source 1 is random, so the order carries no information. MIXUP_NONBINARY_SOURCE names only Y
and a relation, a word of X's octant relative to Y (so it holds), and asks for X. Both
sources of an item share one room and listener. Geometry is in the listener's frame (+x
right, +y up, facing -z).

Answer grammar (what `eval.spatial_qa.parse_answer` reads back):

    labels    := label ("; " label)*        label = class name with "_" -> " " ("pure tone");
                                            C lists source 1's then source 2's
    octant    := lr ", " fb ", " ab         lr = left | right     (x < 0 is left)
                                            fb = front | behind   (z < 0 is front)
                                            ab = above | below    (y > 0 is above)
    distance  := number "m"                 metres rounded to 0.5 m (Python's round of 2 d,
                                            as BAT's distance bins), "%g": "0.5m", "2m"
    A, C -> labels                   B, D -> octant "; " distance  (of source - listener)
    MIXUP_DIRECTION, MIXUP_DISTANCE_BOTH -> "Yes" | "No"
    MIXUP_NONBINARY_DIRECTION -> octant (of X - Y)    MIXUP_NONBINARY_DISTANCE -> distance |X - Y|
    MIXUP_NONBINARY_SOURCE -> labels (X's alone)

Sources sit at least `ANGLE_MARGIN` degrees from the left/right and front/behind boundaries
and `ELEVATION_MARGIN` degrees above or below the horizontal, and the two sources of a
mixture differ by at least `RELATIVE_MARGIN` m on every axis and `DISTANCE_MARGIN` m in
distance, so every answer is well defined rather than decided by millimetres.

Every item is a function of (seed, split, index) alone: the same seed gives byte-identical
files whatever the number of workers.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Mapping, Sequence

import numpy as np

from jaxaudio.data import audio as audio_lib
from jaxaudio.data import hrtf as hrtf_lib
from jaxaudio.data import manifest as manifest_lib
from jaxaudio.data import rooms, scenes
from jaxaudio.data import spatialsoundqa as ssqa
from jaxaudio.data.manifest import write_json_atomic
from jaxaudio.data.sources import SOURCE_CLASSES

_LOG = logging.getLogger(__name__)

# Bump when the generated content changes, so `ensure_spatial_qa` regenerates.
GENERATOR_VERSION = 2
SPLITS = ("train", "eval")

CLASSIFICATION = "CLASSIFICATION"
DOA = "DOA"
MIXUP_SINGLE_CLASSIFICATION = "MIXUP_SINGLE_CLASSIFICATION"
MIXUP_SINGLE_DOA = "MIXUP_SINGLE_DOA"
MIXUP_DIRECTION = "MIXUP_DIRECTION"
MIXUP_DISTANCE_BOTH = "MIXUP_DISTANCE_BOTH"
MIXUP_NONBINARY_DIRECTION = "MIXUP_NONBINARY_DIRECTION"
MIXUP_NONBINARY_DISTANCE = "MIXUP_NONBINARY_DISTANCE"
MIXUP_NONBINARY_SOURCE = "MIXUP_NONBINARY_SOURCE"

LETTER_TYPES = {
    "A": (CLASSIFICATION,),
    "B": (DOA,),
    "C": (MIXUP_SINGLE_CLASSIFICATION,),
    "D": (MIXUP_SINGLE_DOA,),
    "E": (MIXUP_DIRECTION, MIXUP_DISTANCE_BOTH, MIXUP_NONBINARY_DIRECTION,
          MIXUP_NONBINARY_DISTANCE, MIXUP_NONBINARY_SOURCE),
}
TYPE_LETTER = {t: letter for letter, types in LETTER_TYPES.items() for t in types}
BINARY_TYPES = (MIXUP_DIRECTION, MIXUP_DISTANCE_BOTH)
LABEL_TYPES = (CLASSIFICATION, MIXUP_SINGLE_CLASSIFICATION, MIXUP_NONBINARY_SOURCE)
STAGES = {1: ("A", "B"), 2: ("A", "B", "C", "D"), 3: ("A", "B", "C", "D", "E")}

ANGLE_MARGIN = 15.0  # degrees
ELEVATION_MARGIN = 10.0  # degrees
ELEVATION_MAX = 40.0  # KEMAR's lowest ring is -40
RELATIVE_MARGIN = 0.3  # metres
DISTANCE_MARGIN = 0.5  # metres
DRY_PEAK = 0.5  # the reader RMS-normalises every clip, so only clipping matters here

# The words of each octant axis: (negative side, positive side) of x, z, y.
AXIS_WORDS = (("left", "right"), ("front", "behind"), ("below", "above"))
_DIRECTION_PHRASE = {"left": "to the left of", "right": "to the right of",
                     "front": "in front of", "behind": "behind", "above": "above",
                     "below": "below"}
_DISTANCE_PHRASE = {"closer": "closer to you", "farther": "farther from you"}

TEMPLATES = {
    CLASSIFICATION: (
        "Enumerate the sound occurrences in the audio clip.",
        "What sound events can you hear in this recording?",
        "Identify the sound in the audio.",
        "Which sound class does this clip contain?",
        "List the sounds present in the audio clip.",
        "What is making the sound in this clip?",
    ),
    MIXUP_SINGLE_CLASSIFICATION: (
        "Enumerate the sound occurrences in the audio clip.",
        "Identify all the sound events in this audio clip.",
        "What sounds can you hear in this mixture?",
        "List every sound source present in the recording.",
        "Which sound events occur in the audio?",
    ),
    DOA: (
        "Where is the sound coming from, and how far away is it?",
        "In which direction and at what distance is the sound source?",
        "Locate the sound: give its direction and its distance.",
        "From which direction does the sound come, and how far is it from you?",
        "Describe the position of the sound source: direction and distance.",
    ),
    MIXUP_SINGLE_DOA: (
        "Where is the sound of the {x} coming from, and how far away is it?",
        "In which direction and at what distance is the {x}?",
        "Locate the sound of the {x}: give its direction and its distance.",
        "From which direction does the {x} sound, and how far is it from you?",
        "Describe the position of the {x}: direction and distance.",
    ),
    MIXUP_DIRECTION: (
        "Is the sound of the {x} {rel} the sound of the {y}?",
        "Does the {x} come from a position {rel} the {y}?",
        "Is the {x} located {rel} the {y}?",
        "Would you say the sound of the {x} is {rel} the sound of the {y}?",
        "Is the source of the {x} positioned {rel} the source of the {y}?",
    ),
    MIXUP_DISTANCE_BOTH: (
        "Is the sound of the {x} {rel} than the sound of the {y}?",
        "Is the {x} {rel} than the {y}?",
        "Of the two sounds, is the {x} {rel} than the {y}?",
        "Compared with the {y}, is the {x} {rel}?",
        "Would you say the sound of the {x} is {rel} than the sound of the {y}?",
    ),
    MIXUP_NONBINARY_DIRECTION: (
        "In which direction is the sound of the {x} relative to the sound of the {y}?",
        "Where is the {x} relative to the {y}?",
        "Relative to the sound of the {y}, where is the sound of the {x}?",
        "Describe the direction of the {x} as seen from the {y}.",
        "Which way is the {x} from the {y}: left or right, front or behind, above or below?",
    ),
    MIXUP_NONBINARY_DISTANCE: (
        "How far away is the sound of the {x} from the sound of the {y}?",
        "What is the distance between the {x} and the {y}?",
        "How far apart are the sound of the {x} and the sound of the {y}?",
        "How many metres separate the {x} from the {y}?",
        "Estimate the distance from the {x} to the {y}.",
    ),
    MIXUP_NONBINARY_SOURCE: (
        "Which sound is {rel} the sound of the {y}?",
        "What do you hear {rel} the {y}?",
        "Which sound source is located {rel} the source of the {y}?",
        "Name the sound that comes from a position {rel} the {y}.",
        "Of the two sounds, which one is {rel} the sound of the {y}?",
    ),
}


# ---------------------------------------------------------------- answer grammar


def label_text(name: str) -> str:
    """The text of a class name in questions and answers: "pure_tone" -> "pure tone"."""
    return name.replace("_", " ")


def normalize_label(text: str) -> str:
    """Case, "_", spacing and a trailing full stop do not matter when labels are compared."""
    return " ".join(str(text).lower().replace("_", " ").split()).strip(" .")


def octant(vector: Sequence[float]) -> tuple[str, str, str]:
    """(left|right, front|behind, above|below) of a vector in the listener's frame."""
    x, y, z = (float(v) for v in vector)
    return (AXIS_WORDS[0][x >= 0], AXIS_WORDS[1][z >= 0], AXIS_WORDS[2][y > 0])


def half_metres(metres: float) -> float:
    """Rounds to 0.5 m the way BAT's distance bins do: round(2 d) / 2."""
    return round(float(metres) * 2) / 2


def format_distance(metres: float) -> str:
    return f"{half_metres(metres):g}m"


def targets(item: Mapping) -> dict:
    """The ground truth of a generated item, in the form `eval.spatial_qa.parse_answer` gives.

    Returns:
        {"labels": frozenset of normalised label texts} for A and C, and X's alone for
        MIXUP_NONBINARY_SOURCE; {"direction": octant tuple, "distance": metres} for B and D;
        {"yes": bool} for the binary E types; {"direction": ...} or {"distance": ...} for
        the other non-binary ones.

    Raises:
        KeyError: a ground-truth field is missing; ValueError: an unknown question type.
    """
    qtype = item["question_type"]
    if qtype in LABEL_TYPES:
        names = list(item["labels"])
        if qtype == MIXUP_SINGLE_CLASSIFICATION:
            names += list(item["labels2"])
        return {"labels": frozenset(normalize_label(n) for n in names)}
    sensor = manifest_lib.parse_xyz(item["sensor_position"])
    first = manifest_lib.parse_xyz(item["source_position"])
    if qtype in (DOA, MIXUP_SINGLE_DOA):
        return {"direction": octant(first - sensor),
                "distance": manifest_lib.spatial_targets(sensor, first)["distance"] / 2}
    if qtype not in TYPE_LETTER:
        raise ValueError(f"unknown question_type {qtype!r}; known: {sorted(TYPE_LETTER)}")
    second = manifest_lib.parse_xyz(item["source_position2"])
    relative = first - second
    if qtype == MIXUP_DIRECTION:
        return {"yes": item["relation"] in octant(relative)}
    if qtype == MIXUP_DISTANCE_BOTH:
        closer = np.linalg.norm(first - sensor) < np.linalg.norm(second - sensor)
        return {"yes": bool(closer == (item["relation"] == "closer"))}
    if qtype == MIXUP_NONBINARY_DIRECTION:
        return {"direction": octant(relative)}
    return {"distance": half_metres(np.linalg.norm(relative))}


def answer_text(item: Mapping) -> str:
    """The answer of a generated item, in the grammar of the module docstring."""
    qtype = item["question_type"]
    truth = targets(item)
    if "labels" in truth:
        names = list(item["labels"])
        if qtype == MIXUP_SINGLE_CLASSIFICATION:
            names += list(item["labels2"])
        return "; ".join(dict.fromkeys(label_text(n) for n in names))
    if "yes" in truth:
        return "Yes" if truth["yes"] else "No"
    parts = []
    if "direction" in truth:
        parts.append(", ".join(truth["direction"]))
    if "distance" in truth:
        parts.append(f"{truth['distance']:g}m")
    return "; ".join(parts)


# ---------------------------------------------------------------- geometry


def _sample_room(rng: np.random.Generator) -> dict:
    """A shoebox room and a listener, rounded to the millimetre like `scenes`."""
    dims = rng.uniform(scenes.ROOM_MIN, scenes.ROOM_MAX)
    listener = np.array([
        rng.uniform(scenes.LISTENER_MARGIN, dims[0] - scenes.LISTENER_MARGIN),
        rng.uniform(*scenes.EAR_HEIGHT_RANGE),
        rng.uniform(scenes.LISTENER_MARGIN, dims[2] - scenes.LISTENER_MARGIN),
    ])
    return {"room": np.round(dims, 3), "absorption": round(float(rng.uniform(
        *scenes.ABSORPTION_RANGE)), 3), "listener": np.round(listener, 3)}


def _sample_source(rng: np.random.Generator, room: Mapping) -> np.ndarray:
    """A source position away from the octant boundaries, inside the room."""
    azimuth = np.radians(90.0 * rng.integers(4) + rng.uniform(ANGLE_MARGIN,
                                                                90.0 - ANGLE_MARGIN))
    elevation = np.radians(rng.choice([-1.0, 1.0]) * rng.uniform(ELEVATION_MARGIN,
                                                                 ELEVATION_MAX))
    # BAT's convention: azimuth 0 = right (+x), 90 = front (-z).
    direction = np.array([np.cos(elevation) * np.cos(azimuth), np.sin(elevation),
                          -np.cos(elevation) * np.sin(azimuth)])
    dims, listener = room["room"], room["listener"]
    with np.errstate(divide="ignore", invalid="ignore"):
        to_wall = np.where(direction > 0, (dims - scenes.SOURCE_MARGIN - listener) / direction,
                           (scenes.SOURCE_MARGIN - listener) / direction)
    free = np.min(np.where(direction != 0, to_wall, np.inf))
    low, high = scenes.DISTANCE_RANGE
    distance = rng.uniform(low, max(low, min(high, free)))
    return np.round(listener + distance * direction, 3)


def _separated(room: Mapping, first: np.ndarray, second: np.ndarray) -> bool:
    listener = room["listener"]
    return bool(np.all(np.abs(first - second) >= RELATIVE_MARGIN) and abs(
        np.linalg.norm(first - listener) - np.linalg.norm(second - listener)) >= DISTANCE_MARGIN)


def _sample_pair(rng: np.random.Generator, room: Mapping) -> tuple[np.ndarray, np.ndarray]:
    """Two sources far enough apart on every axis and in distance (rejection sampling)."""
    for _ in range(1000):
        first, second = _sample_source(rng, room), _sample_source(rng, room)
        if _separated(room, first, second):
            return first, second
    raise RuntimeError(f"no well-separated source pair found in room {room['room'].tolist()}")


# ---------------------------------------------------------------- items


def question_type_for(index: int, stage_types: Sequence[str]) -> str:
    """Letters take turns; within E the five types take turns too."""
    letter = stage_types[index % len(stage_types)]
    types = LETTER_TYPES[letter]
    return types[(index // len(stage_types)) % len(types)]


def make_item(seed: int, split: str, index: int, question_type: str, sample_rate: int,
              clip_seconds: float, classes: Sequence[str]):
    """Item `index` of `split`.

    Returns:
        (QA item, reverberation entries, {audio_id: float32 [time]},
        {fname: float32 [2, L]}).
    """
    rng = np.random.default_rng([seed, SPLITS.index(split), index])
    two = TYPE_LETTER[question_type] not in ("A", "B")
    picked = rng.choice(len(classes), size=2 if two else 1, replace=False)
    names = [classes[int(k)] for k in picked]
    room = _sample_room(rng)
    positions = list(_sample_pair(rng, room)) if two else [_sample_source(rng, room)]
    hrtf = hrtf_lib.load_kemar(sample_rate)
    n = int(round(clip_seconds * sample_rate))
    stem = f"{split}_{index:06d}"
    item = {"audio_id": None, "reverb_id": None, "audio_id2": None, "reverb_id2": None,
            "question_id": stem, "question_type": question_type}
    entries, clips, rirs = [], {}, {}
    for k, (name, source) in enumerate(zip(names, positions), start=1):
        suffix = "" if k == 1 else "2"
        audio_id, fname = f"{stem}_{k}", f"{stem}/{k}.npy"
        clips[audio_id] = (DRY_PEAK * SOURCE_CLASSES[name](rng, sample_rate, n)).astype(
            np.float32)
        rirs[fname] = rooms.binaural_rir(room["room"], room["absorption"], room["listener"],
                                         source, hrtf, sr=sample_rate, rng=rng)
        entries.append({
            "fname": fname,
            "sensor_position": manifest_lib.format_xyz(room["listener"]),
            "source_position": manifest_lib.format_xyz(source),
            # SoundSpaces' agent stands on the floor below its ears.
            "agent_position": manifest_lib.format_xyz([room["listener"][0], 0.0,
                                                       room["listener"][2]]),
            "room": manifest_lib.format_xyz(room["room"]),
            "absorption": room["absorption"],
        })
        targets_k = manifest_lib.spatial_targets(room["listener"], source)
        item.update({
            "audio_id" + suffix: audio_id, "reverb_id" + suffix: fname,
            "labels" + suffix: [name],
            "azimuth" + suffix: targets_k["azimuth"],
            "elevation" + suffix: targets_k["elevation"],
            "distance_m" + suffix: round(float(np.linalg.norm(source - room["listener"])), 3),
            "source_position" + suffix: entries[-1]["source_position"],
        })
    item["sensor_position"] = entries[0]["sensor_position"]
    if question_type == MIXUP_DIRECTION:
        item["relation"] = str(rng.choice([w for pair in AXIS_WORDS for w in pair]))
    elif question_type == MIXUP_DISTANCE_BOTH:
        item["relation"] = str(rng.choice(sorted(_DISTANCE_PHRASE)))
    elif question_type == MIXUP_NONBINARY_SOURCE:
        # A word of X's own octant relative to Y, so the relation singles out X.
        item["relation"] = str(rng.choice(octant(positions[0] - positions[1])))
    template = TEMPLATES[question_type][int(rng.integers(len(TEMPLATES[question_type])))]
    phrases = {**_DIRECTION_PHRASE, **_DISTANCE_PHRASE}
    item["question"] = template.format(
        x=label_text(names[0]), y=label_text(names[-1]),
        rel=phrases.get(item.get("relation"), ""))
    item["answer"] = answer_text(item)
    return item, entries, clips, rirs


def _write_item(job) -> tuple[dict, list[dict]]:
    root, seed, split, index, question_type, sample_rate, clip_seconds, classes = job
    item, entries, clips, rirs = make_item(seed, split, index, question_type, sample_rate,
                                           clip_seconds, classes)
    for audio_id, clip in clips.items():
        audio_lib.write_wav(os.path.join(root, "audio", audio_id + ".wav"), clip, sample_rate)
    for fname, rir in rirs.items():
        path = os.path.join(root, "reverb", "binaural", fname)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        np.save(path, rir)
    return item, entries


# ---------------------------------------------------------------- files


def layout_paths(root: str | os.PathLike) -> dict[str, str]:
    """Where everything lives: "root", "audio_root", "reverb_root", "params", and for
    each split "<split>" (QA json) and "<split>_reverb" (reverberation json)."""
    root = os.path.abspath(os.fspath(root))
    paths = {"root": root, "audio_root": os.path.join(root, "audio"),
             "reverb_root": os.path.join(root, "reverb"),
             "params": os.path.join(root, "spatial_qa.params.json")}
    for split in SPLITS:
        paths[split] = os.path.join(root, f"{split}.json")
        paths[split + "_reverb"] = os.path.join(root, "reverb", f"{split}_reverberation.json")
    return paths


def split_records(root: str | os.PathLike, split: str) -> list[dict]:
    """A split read back through the official reader (`spatialsoundqa.qa_records`)."""
    paths = layout_paths(root)
    return ssqa.qa_records(ssqa.read_qa_items(paths[split]),
                           ssqa.read_reverb_index(paths[split + "_reverb"]),
                           paths["audio_root"], paths["reverb_root"])


def _params(num_train, num_eval, seed, clip_seconds, stage_types, sample_rate, classes):
    return {"generator_version": GENERATOR_VERSION, "num_train": int(num_train),
            "num_eval": int(num_eval), "seed": int(seed), "clip_seconds": float(clip_seconds),
            "stage_types": list(stage_types), "sample_rate": int(sample_rate),
            "classes": list(classes)}


def _check_args(stage_types, classes) -> tuple[tuple[str, ...], list[str]]:
    stage_types = tuple(stage_types)
    if not stage_types or any(t not in LETTER_TYPES for t in stage_types):
        raise ValueError(f"stage_types must be letters from {sorted(LETTER_TYPES)}, "
                         f"got {stage_types}")
    classes = list(SOURCE_CLASSES) if classes is None else list(classes)
    unknown = [c for c in classes if c not in SOURCE_CLASSES]
    if unknown or len(classes) < 2:
        raise ValueError(f"classes must be at least two of {sorted(SOURCE_CLASSES)}; "
                         f"unknown: {unknown}")
    return stage_types, classes


def generate_spatial_qa(
    root: str | os.PathLike,
    num_train: int,
    num_eval: int,
    seed: int,
    clip_seconds: float = 1.0,
    stage_types: Sequence[str] = STAGES[3],
    sample_rate: int = 32000,
    classes: Sequence[str] | None = None,
    num_workers: int | None = None,
) -> dict[str, str]:
    """Writes both splits of generated SpatialSoundQA under `root`.

    Args:
        root: dataset folder (created).
        num_train, num_eval: QA items per split.
        seed: the items are a function of (seed, split, index).
        clip_seconds: length of every mono clip.
        stage_types: the letters to generate (`STAGES[k]` for curriculum stage k); letters
            take turns, and so do the five E types.
        sample_rate: Hz.
        classes: names from `SOURCE_CLASSES` (default all), at least two.
        num_workers: processes; default one per CPU (at most 8), fewer for small jobs.
            More than one starts processes with "spawn", so a calling script needs the
            usual `if __name__ == "__main__":` guard.

    Returns:
        `layout_paths(root)`.
    """
    stage_types, classes = _check_args(stage_types, classes)
    paths = layout_paths(root)
    # Removing the params first marks the dataset incomplete until it is rewritten.
    if os.path.exists(paths["params"]):
        os.remove(paths["params"])
    os.makedirs(paths["audio_root"], exist_ok=True)
    os.makedirs(os.path.join(paths["reverb_root"], "binaural"), exist_ok=True)
    start = time.perf_counter()
    counts = {"train": int(num_train), "eval": int(num_eval)}
    jobs = [(paths["root"], int(seed), split, i, question_type_for(i, stage_types),
             int(sample_rate), float(clip_seconds), classes)
            for split in SPLITS for i in range(counts[split])]
    results = scenes.map_jobs(_write_item, jobs, num_workers)
    offset = 0
    for split in SPLITS:
        part = results[offset:offset + counts[split]]
        offset += counts[split]
        write_json_atomic(paths[split + "_reverb"], {"data": [e for _, es in part for e in es]})
        write_json_atomic(paths[split], {"data": [item for item, _ in part]})
    write_json_atomic(paths["params"], _params(num_train, num_eval, seed, clip_seconds,
                                         stage_types, sample_rate, classes))
    _LOG.info("wrote %d SpatialSoundQA items to %s in %.1f s", len(jobs),
              paths["root"], time.perf_counter() - start)
    return paths


def _complete(paths: Mapping[str, str]) -> bool:
    """Whether every clip and RIR that the QA files name exists."""
    for split in SPLITS:
        index = ssqa.read_reverb_index(paths[split + "_reverb"])
        for item in ssqa.read_qa_items(paths[split]):
            for s in ("", "2"):
                if item.get("audio_id" + s) is None:
                    continue
                files = (os.path.join(paths["audio_root"], item["audio_id" + s] + ".wav"),
                         os.path.join(paths["reverb_root"], "binaural", item["reverb_id" + s]))
                if item["reverb_id" + s] not in index or not all(map(os.path.exists, files)):
                    return False
    return True


def ensure_spatial_qa(
    root: str | os.PathLike,
    num_train: int,
    num_eval: int,
    seed: int,
    clip_seconds: float = 1.0,
    stage_types: Sequence[str] = STAGES[3],
    sample_rate: int = 32000,
    classes: Sequence[str] | None = None,
    num_workers: int | None = None,
) -> dict[str, str]:
    """`layout_paths(root)` of an existing complete dataset, generating it if needed.

    It is reused only if its params.json equals the requested parameters (and generator
    version) and every QA item's clips and RIRs exist. Arguments as `generate_spatial_qa`.
    """
    stage_types, classes = _check_args(stage_types, classes)
    paths = layout_paths(root)
    wanted = _params(num_train, num_eval, seed, clip_seconds, stage_types, sample_rate,
                     classes)
    try:
        with open(paths["params"], encoding="utf-8") as f:
            if json.load(f) == wanted and _complete(paths):
                return paths
    except (OSError, ValueError, KeyError) as e:  # missing or damaged files: regenerate
        _LOG.info("regenerating %s (%s)", paths["root"], e)
    return generate_spatial_qa(root, num_train, num_eval, seed, clip_seconds, stage_types,
                               sample_rate, classes, num_workers)

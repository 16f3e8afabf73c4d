"""The official SpatialSoundQA layout (BAT), read as it is distributed.

    <reverb_root>/binaural/<fname>        binaural RIR, .npy float [2, L] at 32 kHz
    <reverb_json>                         {"data": [{"fname", "sensor_position",
                                            "source_position", "agent_position", ...}]}
                                          positions as "x,y,z" strings
    <audio_root>/<audio_id><ext_audio>    mono AudioSet clip, any rate
    QA file                               items {audio_id, reverb_id, audio_id2,
                                            reverb_id2, question_id, question_type,
                                            question, answer}; the *2 fields are null
                                          for one-source questions

Rendering follows the Spatial-AST / SLAM-LLM datasets: the clip's first channel,
resampled to 32 kHz with `resample_poly`, RMS-normalised to -14 dBFS, fitted to 10 s;
the RIR fitted to 2 s (Spatial-AST; SLAM-LLM keeps it whole: `rir_seconds=None`); full
FFT convolution cropped to the clip; two-source items average the two renderings.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping

import numpy as np
from scipy import signal

from jaxaudio.data import audio as audio_lib
from jaxaudio.data import manifest as manifest_lib

SAMPLE_RATE = 32000
CLIP_SECONDS = 10.0
RIR_SECONDS = 2.0
TARGET_DBFS = -14.0


def read_reverb_index(path: str | os.PathLike) -> dict[str, dict]:
    """Reads a `*_reverberation.json`; returns fname -> entry.

    Raises:
        ValueError: no "data" list, or an entry lacks fname / sensor_position /
            source_position (the message names the file and the entry).
    """
    with open(path, encoding="utf-8") as f:
        try:
            doc = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not a JSON file ({e})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("data"), list):
        raise ValueError(f"{path}: expected an object with a 'data' list")
    index = {}
    for i, entry in enumerate(doc["data"]):
        for field in ("fname", "sensor_position", "source_position"):
            if not isinstance(entry, dict) or not isinstance(entry.get(field), str):
                raise ValueError(f"{path}: data[{i}] has no string field {field!r}")
        index[entry["fname"]] = entry
    return index


def read_qa_items(path: str | os.PathLike) -> list[dict]:
    """Reads QA items from a JSON list, a {"data": [...]} object, or JSON lines."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    try:
        doc = json.loads(text)
    except json.JSONDecodeError:
        doc = None  # not one document: JSON lines
    if isinstance(doc, list):
        return doc
    if isinstance(doc, dict) and isinstance(doc.get("data"), list):
        return doc["data"]
    items = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            try:
                items.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: invalid JSON ({e.msg})") from e
    return items


def load_rir(path: str | os.PathLike, seconds: float | None = RIR_SECONDS,
             sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Loads a binaural RIR `.npy`, zero-padded or cut to `seconds` (None: as stored).

    Returns:
        float32 `[2, L]`.
    """
    try:
        rir = np.load(path)
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read RIR {path}: {e}") from e
    if rir.ndim != 2 or rir.shape[0] != 2:
        raise ValueError(f"RIR {path} has shape {rir.shape}, expected (2, L)")
    if seconds is not None:
        rir = audio_lib.fit_length(rir, int(round(seconds * sample_rate)))
    return rir.astype(np.float32)


def load_mono_clip(path: str | os.PathLike, seconds: float = CLIP_SECONDS,
                   sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Loads an anechoic clip the way the originals do.

    First channel, `resample_poly` to `sample_rate`, RMS -14 dBFS over the whole clip,
    then zero-padded or cut to `seconds`.

    Returns:
        float32 `[time]`.
    """
    x = audio_lib.load_audio(path, sample_rate, resampler="poly")[0]
    x = audio_lib.normalize_rms(x, TARGET_DBFS)
    return audio_lib.fit_length(x, int(round(seconds * sample_rate))).astype(np.float32)


def render_binaural(mono: np.ndarray, rir: np.ndarray) -> np.ndarray:
    """Full convolution of `[T]` with `[2, L]`, cropped to the first T samples.

    Returns:
        float32 `[2, T]`.
    """
    wet = signal.fftconvolve(np.asarray(mono, np.float64)[None, :],
                             np.asarray(rir, np.float64), mode="full", axes=-1)
    return wet[:, :mono.shape[-1]].astype(np.float32)


def qa_records(
    qa_items: Iterable[Mapping],
    reverb_index: Mapping[str, Mapping],
    audio_root: str | os.PathLike,
    reverb_root: str | os.PathLike,
    ext_audio: str = ".wav",
    channel_type: str = "binaural",
) -> list[dict]:
    """Turns official QA items into records with file paths and BAT's spatial targets.

    Each record keeps question_id, question_type, question and answer and adds, for the
    first source, "audio" (clip path), "rir" (RIR path), "azimuth", "elevation",
    "distance" (`manifest.spatial_targets`), "sensor_position" and "source_position";
    two-source items add the same fields suffixed "2" ("audio2", "azimuth2", ...).

    Raises:
        ValueError: a reverb_id is not in the reverb index (named with its question).
    """
    records = []
    for item in qa_items:
        rec = {k: item.get(k) for k in ("question_id", "question_type", "question", "answer")}
        sources = [("", item["audio_id"], item["reverb_id"])]
        # The originals add the second source only when both of its ids are set.
        if item.get("audio_id2") is not None and item.get("reverb_id2") is not None:
            sources.append(("2", item["audio_id2"], item["reverb_id2"]))
        for suffix, audio_id, reverb_id in sources:
            entry = reverb_index.get(reverb_id)
            if entry is None:
                raise ValueError(f"question {item.get('question_id')!r}: reverb_id "
                                 f"{reverb_id!r} is not in the reverberation json")
            targets = manifest_lib.spatial_targets(entry["sensor_position"],
                                                   entry["source_position"])
            rec["audio" + suffix] = os.path.join(audio_root, audio_id + ext_audio)
            rec["rir" + suffix] = os.path.join(reverb_root, channel_type, reverb_id)
            rec["sensor_position" + suffix] = entry["sensor_position"]
            rec["source_position" + suffix] = entry["source_position"]
            for key, value in targets.items():
                rec[key + suffix] = value
        records.append(rec)
    return records


def render_record(record: Mapping, clip_seconds: float = CLIP_SECONDS,
                  rir_seconds: float | None = RIR_SECONDS,
                  sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """The binaural input of a `qa_records` record; two sources are averaged.

    Returns:
        float32 `[2, clip_seconds * sample_rate]`.
    """
    suffixes = [""] + (["2"] if record.get("audio2") else [])
    rendered = [
        render_binaural(load_mono_clip(record["audio" + s], clip_seconds, sample_rate),
                        load_rir(record["rir" + s], rir_seconds, sample_rate))
        for s in suffixes
    ]
    return (sum(rendered) / len(rendered)).astype(np.float32)

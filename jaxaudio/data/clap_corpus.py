"""A generated corpus of captioned sounds for training and evaluating a tiny CLAP.

`ensure_clap_corpus` writes

    <root>/classes.txt               the sound classes, one per line (also the source of
                                     the zero-shot prompts, `class_prompt`)
    <root>/<split>/000000.wav        mono float32 wav, one sound per clip
    <root>/<split>.jsonl             records (paths relative to <root>), see below
    <root>/clap_corpus.params.json   the generation parameters, written last

for the splits "train" and "eval". A record:

    {"audio": "train/000000.wav", "caption": "a loud high-pitched bell rings briefly",
     "label": "bell", "loudness": "quiet" | "loud", "pitch": "low" | "high" | null,
     "duration": "short" | "long"}

Each clip is one procedural sound of `sources.SOURCE_CLASSES` (classes take turns by clip
index) made quiet or loud by a gain, short (a burst of at most `SHORT_MAX` of the clip) or
long (at least `LONG_MIN`), and, for the classes in `PITCH_SPLITS`, low or high for its
class. The attributes in a record are measured on the clip as written (`active_level_dbfs`,
`active_duration`, `measure_pitch`), so the captions are true of the audio; a draw whose
duration or pitch lands in the gap between the two values is drawn again. Each caption
states the class and every attribute, in one of several templates with synonyms.

Every clip is a function of (seed, split, clip index) alone, the eval split drawing from
other streams than train, so the files are the same whatever the number of workers.
The params file is removed first and written last: a corpus whose params file matches
the request (and whose manifests and clips exist) is complete and is reused.
"""

from __future__ import annotations

import json
import logging
import os
import time

import numpy as np

from jaxaudio.data import audio as audio_lib
from jaxaudio.data import manifest as manifest_lib
from jaxaudio.data import scenes
from jaxaudio.data.sources import SOURCE_CLASSES

_LOG = logging.getLogger(__name__)

GENERATOR_VERSION = 1
SPLITS = ("train", "eval")
CLASSES = tuple(SOURCE_CLASSES)

# Loudness: the level of the clip's active 10 ms frames (`active_level_dbfs`).
LOUD_DBFS = (-12.0, -6.0)
QUIET_DBFS = (-40.0, -32.0)
# Measured level above: "loud". Peak limiting leaves loud clips above -25 dBFS (rain, the
# sparsest class, reaches -24.4 at peak 1), quiet ones stay below -32.
LOUDNESS_THRESHOLD_DBFS = -28.0
PEAK_LIMIT = 0.99  # loud sparse sounds (clicks) are scaled down to this peak
# Duration: span of the active frames as a fraction of the clip (`active_duration`).
SHORT_RANGE = (0.15, 0.35)  # a short sound is made in a buffer of this fraction
SHORT_MAX, LONG_MIN = 0.35, 0.55
DURATION_THRESHOLD = 0.45  # measured span below: "short"
# Pitch, per pitched class: (how it is measured, the Hz splitting low from high).
# The splits are the geometric middles of the classes' ranges in `sources.py`; a draw
# within `PITCH_MARGIN` of the split is drawn again.
PITCH_SPLITS = {
    "pure_tone": ("peak", float(np.sqrt(200 * 2000))),
    "organ": ("peak", float(np.sqrt(100 * 500))),
    "bell": ("peak", 0.56 * float(np.sqrt(300 * 1200))),  # the hum partial, 0.56 f0, dominates
    "siren": ("frames", float(np.sqrt(500 * 1200))),
    "plucked_string": ("acf", float(np.sqrt(110 * 660))),
    "vowel_a": ("acf", float(np.sqrt(90 * 260))),
    "vowel_i": ("acf", float(np.sqrt(90 * 260))),
}
PITCH_MARGIN = 1.1
_ACF_RANGE = {"plucked_string": (80.0, 900.0), "vowel_a": (60.0, 400.0),
              "vowel_i": (60.0, 400.0)}
_MAX_TRIES = 40
_FRAME_S = 0.01
_ACTIVE_DB = 30.0  # frames within this many dB of the loudest are active


# ---------------------------------------------------------------- captions


# Per class: noun phrases (text, countable), verb phrases, gerund phrases, the zero-shot
# prompt's noun phrase, and words that name the class (every caption has one; matched
# against " " + caption, so a leading space anchors a word start: " rain" is not in "train").
_CLASS_TEXT = {
    "pure_tone": ((("tone", True), ("pure tone", True), ("beep", True), ("sine tone", True)),
                  ("sounds", "plays", "beeps"), ("sounding", "playing", "beeping"),
                  "a pure tone", ("tone", "beep")),
    "organ": ((("organ note", True), ("organ", True), ("pipe organ", True)),
              ("plays", "sounds", "rings out"), ("playing", "sounding", "ringing out"),
              "an organ", ("organ",)),
    "plucked_string": ((("plucked string", True), ("guitar string", True), ("harp string", True)),
                       ("twangs", "is plucked", "vibrates"),
                       ("twanging", "being plucked", "vibrating"),
                       "a plucked string", ("string",)),
    "white_noise": ((("white noise", False), ("hiss of white noise", True),
                     ("white noise hiss", True)),
                    ("hisses", "plays", "sounds"), ("hissing", "playing", "sounding"),
                    "white noise", ("white noise",)),
    "pink_noise": ((("pink noise", False), ("rush of pink noise", True),
                    ("pink noise signal", True)),
                   ("rushes", "plays", "sounds"), ("rushing", "playing", "sounding"),
                   "pink noise", ("pink noise",)),
    "brown_noise": ((("brown noise", False), ("rumble of brown noise", True),
                     ("brown noise rumble", True)),
                    ("rumbles", "plays", "roars"), ("rumbling", "playing", "roaring"),
                    "brown noise", ("brown noise",)),
    "up_chirp": ((("rising chirp", True), ("upward sweep", True), ("up chirp", True),
                  ("rising whistle", True)),
                 ("sweeps upwards", "goes up", "climbs in pitch"),
                 ("sweeping upwards", "going up", "climbing in pitch"),
                 "a rising chirp", ("rising chirp", "rising whistle", "upward", "up chirp")),
    "down_chirp": ((("falling chirp", True), ("downward sweep", True), ("down chirp", True),
                    ("falling whistle", True)),
                   ("sweeps downwards", "goes down", "drops in pitch"),
                   ("sweeping downwards", "going down", "dropping in pitch"),
                   "a falling chirp",
                   ("falling chirp", "falling whistle", "downward", "down chirp")),
    "click_train": ((("series of clicks", True), ("click train", True),
                     ("train of clicks", True), ("ticking clock", True)),
                    ("repeats", "goes on", "ticks away"), ("repeating", "going on", "ticking away"),
                    "a click train", ("click", "tick")),
    "vowel_a": ((("voice", True), ("singer", True), ("human voice", True)),
                ("sings ah", "sings an ah vowel", "holds an ah"),
                ("singing ah", "singing an ah vowel", "holding an ah"),
                "a voice singing ah", (" ah",)),
    "vowel_i": ((("voice", True), ("singer", True), ("human voice", True)),
                ("sings ee", "sings an ee vowel", "holds an ee"),
                ("singing ee", "singing an ee vowel", "holding an ee"),
                "a voice singing ee", (" ee",)),
    "bell": ((("bell", True), ("church bell", True), ("handbell", True)),
             ("rings", "chimes", "is struck"), ("ringing", "chiming", "being struck"),
             "a bell", ("bell",)),
    "siren": ((("siren", True), ("emergency siren", True), ("police siren", True)),
              ("wails", "howls", "sounds"), ("wailing", "howling", "sounding"),
              "a siren", ("siren",)),
    "rain": ((("rain", False), ("rainfall", False), ("shower of rain", True)),
             ("falls", "patters", "pours down"), ("falling", "pattering", "pouring down"),
             "rain", (" rain",)),
    "engine": ((("engine", True), ("motor", True), ("car engine", True)),
               ("hums", "idles", "rumbles"), ("humming", "idling", "running"),
               "an engine", ("engine", "motor")),
    "drum": ((("drum", True), ("kick drum", True), ("bass drum", True)),
             ("is hit", "thumps", "beats"), ("being hit", "thumping", "beating"),
             "a drum", ("drum",)),
}
CLASS_KEYWORDS = {name: text[4] for name, text in _CLASS_TEXT.items()}

_LOUD_ADJ = {"loud": ("loud", "strong"), "quiet": ("quiet", "soft", "faint")}
_LOUD_ADV = {"loud": ("loudly",), "quiet": ("quietly", "softly", "faintly")}
_PITCH_ADJ = {"high": ("high-pitched", "high"), "low": ("low-pitched", "low", "deep")}
_DUR_ADJ = {"short": ("short", "brief"), "long": ("long", "sustained")}
_DUR_ADV = {"short": ("briefly", "for a moment", "for an instant", "in a short burst"),
            "long": ("for a long time", "for a while", "continuously", "at length")}
# {np:...} lists the adjectives of the noun phrase: d(uration), l(oudness), p(itch).
_TEMPLATES = (
    "{np:lp} {verb} {dadv}",
    "the sound of {np:lp} {ger} {dadv}",
    "{np:p} {verb} {ladv} {dadv}",
    "{np:dlp} {verb}",
    "you can hear {np:lp} {ger} {dadv}",
    "{np:dp} {verb} {ladv}",
)


def _pick(rng: np.random.Generator, options):
    return options[int(rng.integers(len(options)))]


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def class_prompt(name: str) -> str:
    """The zero-shot prompt of a class: "the sound of a bell", "the sound of rain"."""
    if name not in _CLASS_TEXT:
        raise ValueError(f"unknown class {name!r}; classes: {list(_CLASS_TEXT)}")
    return f"the sound of {_CLASS_TEXT[name][3]}"


def make_caption(rng: np.random.Generator, name: str, loudness: str, pitch: str | None,
                 duration: str) -> str:
    """A caption stating the class and every attribute, in a random phrasing."""
    nouns, verbs, gerunds, _, _ = _CLASS_TEXT[name]
    noun, countable = _pick(rng, nouns)
    adjectives = {"d": _pick(rng, _DUR_ADJ[duration]), "l": _pick(rng, _LOUD_ADJ[loudness]),
                  "p": _pick(rng, _PITCH_ADJ[pitch]) if pitch else None}

    def noun_phrase(which: str) -> str:
        words = [adjectives[k] for k in which if adjectives[k]] + [noun]
        phrase = " ".join(words)
        return f"{_article(phrase)} {phrase}" if countable else phrase

    text = _pick(rng, _TEMPLATES)
    for which in ("dlp", "lp", "dp", "p"):
        text = text.replace("{np:" + which + "}", noun_phrase(which))
    return text.format(verb=_pick(rng, verbs), ger=_pick(rng, gerunds),
                       dadv=_pick(rng, _DUR_ADV[duration]),
                       ladv=_pick(rng, _LOUD_ADV[loudness]))


# ---------------------------------------------------------------- measurements


def _frame_power(x: np.ndarray, sr: int) -> np.ndarray:
    """Mean square of consecutive 10 ms frames (the last partial frame dropped)."""
    hop = max(1, int(round(_FRAME_S * sr)))
    count = max(1, len(x) // hop)
    x = np.asarray(x, np.float64)[:count * hop]
    return np.mean(np.pad(x, (0, count * hop - len(x))).reshape(count, hop) ** 2, axis=1)


def _active(power: np.ndarray) -> np.ndarray:
    return power >= power.max() * 10 ** (-_ACTIVE_DB / 10)


def active_level_dbfs(x: np.ndarray, sr: int) -> float:
    """Level in dB full scale of the active 10 ms frames (those within 30 dB of the
    loudest); -inf for silence."""
    power = _frame_power(x, sr)
    if power.max() <= 0:
        return float("-inf")
    return float(10 * np.log10(np.mean(power[_active(power)])))


def active_duration(x: np.ndarray, sr: int) -> float:
    """Seconds from the first to the end of the last active 10 ms frame; 0 for silence."""
    power = _frame_power(x, sr)
    if power.max() <= 0:
        return 0.0
    idx = np.flatnonzero(_active(power))
    return float((idx[-1] - idx[0] + 1) * _FRAME_S)


def _active_span(x: np.ndarray, sr: int) -> np.ndarray:
    power = _frame_power(x, sr)
    if power.max() <= 0:
        return x
    hop = max(1, int(round(_FRAME_S * sr)))
    idx = np.flatnonzero(_active(power))
    return np.asarray(x[idx[0] * hop:(idx[-1] + 1) * hop], np.float64)


def _peak_frequency(x: np.ndarray, sr: int) -> float:
    spec = np.abs(np.fft.rfft(x * np.hanning(len(x)), n=max(len(x), sr)))
    return float(np.argmax(spec) * sr / (2 * (len(spec) - 1)))


def _median_frame_peak(x: np.ndarray, sr: int) -> float:
    """Median over 40 ms frames (within 20 dB of the loudest) of each frame's peak Hz."""
    size = int(0.04 * sr)
    if len(x) < size:
        return _peak_frequency(x, sr)
    frames = np.lib.stride_tricks.sliding_window_view(x, size)[::size // 2]
    spec = np.abs(np.fft.rfft(frames * np.hanning(size), n=4 * size, axis=-1)) ** 2
    energy = spec.sum(-1)
    keep = energy >= energy.max() * 0.01
    return float(np.median(np.argmax(spec[keep], axis=-1)) * sr / (4 * size))


def _acf_f0(x: np.ndarray, sr: int, lo: float, hi: float) -> float:
    """f0 from the autocorrelation: the shortest lag in [sr/hi, sr/lo] whose local
    maximum reaches 85% of the largest there (so a period's multiples are not chosen)."""
    x = x - x.mean()
    acf = np.fft.irfft(np.abs(np.fft.rfft(x, n=2 * len(x))) ** 2)[:len(x)]
    if acf[0] <= 0:
        return 0.0
    first, last = int(sr / hi), min(int(np.ceil(sr / lo)), len(acf) - 2)
    if last <= first:
        return 0.0
    seg = acf[first:last + 1] / acf[0]
    peaks = np.flatnonzero((seg[1:-1] >= seg[:-2]) & (seg[1:-1] >= seg[2:])) + 1
    if peaks.size == 0:
        return 0.0
    best = seg[peaks].max()
    lag = first + peaks[np.argmax(seg[peaks] >= 0.85 * best)]
    # Parabolic interpolation around the chosen lag.
    a, b, c = acf[lag - 1], acf[lag], acf[lag + 1]
    denom = a - 2 * b + c
    shift = 0.5 * (a - c) / denom if denom != 0 else 0.0
    return float(sr / (lag + shift))


def measure_pitch(name: str, x: np.ndarray, sr: int) -> float | None:
    """The pitch in Hz that splits a pitched class into low and high (`PITCH_SPLITS`):
    the spectral peak (pure_tone, organ; bell: its hum partial), the median of 40 ms
    frames' peaks (siren: its centre frequency) or the autocorrelation f0 (plucked string,
    vowels). None for unpitched classes or silence. It is the pitch heard in the clip:
    a short siren burst holds part of one sweep, so its median can be off the centre
    frequency the generator drew (by up to ~40% for 0.15 s bursts, ~3% for 1 s)."""
    if name not in PITCH_SPLITS:
        return None
    x = _active_span(np.asarray(x, np.float64), sr)
    if not np.any(x):
        return None
    how = PITCH_SPLITS[name][0]
    if how == "peak":
        return _peak_frequency(x, sr)
    if how == "frames":
        return _median_frame_peak(x, sr)
    return _acf_f0(x, sr, *_ACF_RANGE[name])


def pitch_label(name: str, hz: float | None) -> str | None:
    if hz is None:
        return None
    return "high" if hz >= PITCH_SPLITS[name][1] else "low"


def loudness_label(level_dbfs: float) -> str:
    return "loud" if level_dbfs >= LOUDNESS_THRESHOLD_DBFS else "quiet"


def duration_label(seconds: float, clip_seconds: float) -> str:
    return "short" if seconds < DURATION_THRESHOLD * clip_seconds else "long"


# ---------------------------------------------------------------- clips


def _draw_sound(rng, name: str, sr: int, n: int, duration: str, pitch: str | None):
    """A sound of class `name` with the wanted duration and pitch, placed in `n` samples."""
    fn = SOURCE_CLASSES[name]
    x = None
    for _ in range(_MAX_TRIES):
        if duration == "short":
            m = max(1, int(rng.uniform(*SHORT_RANGE) * n))
            burst = fn(rng, sr, m)
            onset = int(rng.integers(0, n - m + 1))
            x = np.zeros(n, np.float32)
            x[onset:onset + m] = burst
            ok = True
        else:
            x = fn(rng, sr, n)
            ok = active_duration(x, sr) >= LONG_MIN * n / sr
        if ok and pitch is not None:
            hz = measure_pitch(name, x, sr)
            split = PITCH_SPLITS[name][1]
            ok = hz is not None and (hz >= split * PITCH_MARGIN if pitch == "high"
                                     else hz <= split / PITCH_MARGIN)
        if ok:
            break
    return x  # after _MAX_TRIES the last draw; its measured attributes label it


def render_clip(seed: int, split: str, index: int, sample_rate: int,
                clip_seconds: float) -> tuple[np.ndarray, dict]:
    """Clip `index` of `split`: (float32 `[time]`, record without "audio")."""
    rng = np.random.default_rng([seed, SPLITS.index(split), index])
    n = int(round(clip_seconds * sample_rate))
    name = CLASSES[index % len(CLASSES)]
    duration = ("short", "long")[int(rng.integers(2))]
    loudness = ("quiet", "loud")[int(rng.integers(2))]
    pitch = ("low", "high")[int(rng.integers(2))] if name in PITCH_SPLITS else None
    x = _draw_sound(rng, name, sample_rate, n, duration, pitch).astype(np.float64)
    level = active_level_dbfs(x, sample_rate)
    if np.isfinite(level):
        x *= 10 ** ((rng.uniform(*(LOUD_DBFS if loudness == "loud" else QUIET_DBFS)) - level) / 20)
        peak = np.max(np.abs(x))
        if peak > PEAK_LIMIT:
            x *= PEAK_LIMIT / peak
    x = x.astype(np.float32)
    attributes = {
        "loudness": loudness_label(active_level_dbfs(x, sample_rate)),
        "pitch": pitch_label(name, measure_pitch(name, x, sample_rate)),
        "duration": duration_label(active_duration(x, sample_rate), clip_seconds),
    }
    caption = make_caption(rng, name, attributes["loudness"], attributes["pitch"],
                           attributes["duration"])
    return x, {"caption": caption, "label": name, **attributes}


def _write_clip(job) -> dict:
    root, seed, split, index, sample_rate, clip_seconds = job
    x, record = render_clip(seed, split, index, sample_rate, clip_seconds)
    path = os.path.join(root, split, f"{index:06d}.wav")
    audio_lib.write_wav(path, x, sample_rate)
    return {"audio": path, **record}


# ---------------------------------------------------------------- files


def layout_paths(root: str | os.PathLike) -> dict[str, str]:
    """"root", "train", "eval" (manifests), "classes", "params"."""
    root = os.path.abspath(os.fspath(root))
    return {"root": root, "classes": os.path.join(root, "classes.txt"),
            "params": os.path.join(root, "clap_corpus.params.json"),
            **{split: os.path.join(root, f"{split}.jsonl") for split in SPLITS}}


def _params(num_train, num_eval, seed, sample_rate, clip_seconds) -> dict:
    return {"generator_version": GENERATOR_VERSION, "num_train": int(num_train),
            "num_eval": int(num_eval), "seed": int(seed), "sample_rate": int(sample_rate),
            "clip_seconds": float(clip_seconds), "classes": list(CLASSES)}


def read_split(root: str | os.PathLike, split: str) -> list[dict]:
    """The records of a split, "audio" made absolute."""
    return manifest_lib.read_manifest(layout_paths(root)[split],
                                      required=("audio", "caption", "label"))


def _complete(paths: dict, wanted: dict) -> bool:
    with open(paths["params"], encoding="utf-8") as f:
        if json.load(f) != wanted:
            return False
    if manifest_lib.read_classes(paths["classes"]) != list(CLASSES):
        return False
    for split, count in (("train", wanted["num_train"]), ("eval", wanted["num_eval"])):
        records = read_split(paths["root"], split)
        if len(records) != count or not all(os.path.exists(r["audio"]) for r in records):
            return False
    return True


def generate_clap_corpus(root: str | os.PathLike, num_train: int, num_eval: int, seed: int,
                         *, sample_rate: int = 48000, clip_seconds: float = 1.0,
                         num_workers: int | None = 1) -> dict[str, str]:
    """Writes both splits, classes.txt and the params file; arguments as
    `ensure_clap_corpus`. Returns `layout_paths(root)`."""
    if num_train < 0 or num_eval < 0:
        raise ValueError(f"num_train and num_eval must be >= 0, got {num_train}, {num_eval}")
    if clip_seconds <= 0 or sample_rate <= 0:
        raise ValueError(f"clip_seconds and sample_rate must be positive, got "
                         f"{clip_seconds}, {sample_rate}")
    paths = layout_paths(root)
    # Removing the params first marks the corpus incomplete until it is rewritten.
    for stale in (paths["params"], paths["train"], paths["eval"]):
        if os.path.exists(stale):
            os.remove(stale)
    counts = {"train": int(num_train), "eval": int(num_eval)}
    for split in SPLITS:
        os.makedirs(os.path.join(paths["root"], split), exist_ok=True)
    start = time.perf_counter()
    jobs = [(paths["root"], int(seed), split, i, int(sample_rate), float(clip_seconds))
            for split in SPLITS for i in range(counts[split])]
    records = scenes.map_jobs(_write_clip, jobs, num_workers)
    manifest_lib.write_classes(paths["classes"], CLASSES)
    manifest_lib.write_manifest(paths["train"], records[:counts["train"]])
    manifest_lib.write_manifest(paths["eval"], records[counts["train"]:])
    manifest_lib.write_json_atomic(
        paths["params"], _params(num_train, num_eval, seed, sample_rate, clip_seconds))
    _LOG.info("wrote %d CLAP clips to %s in %.1f s", len(jobs), paths["root"],
              time.perf_counter() - start)
    return paths


def ensure_clap_corpus(root: str | os.PathLike, num_train: int, num_eval: int, seed: int, *,
                       sample_rate: int = 48000, clip_seconds: float = 1.0,
                       num_workers: int | None = 1) -> None:
    """Generates the corpus under `root` unless a complete one with these parameters is
    there.

    Args:
        root: corpus folder (created).
        num_train, num_eval: clips per split.
        seed: the clips are a function of (seed, split, clip index).
        sample_rate: Hz of the wav files.
        clip_seconds: length of every clip.
        num_workers: processes (None: `scenes.default_workers`). More than one starts
            processes with "spawn", so a calling script needs the `__main__` guard.
    """
    paths = layout_paths(root)
    wanted = _params(num_train, num_eval, seed, sample_rate, clip_seconds)
    try:
        if _complete(paths, wanted):
            return
    except (OSError, ValueError) as e:  # missing or damaged files: regenerate
        _LOG.info("regenerating %s (%s)", paths["root"], e)
    generate_clap_corpus(root, num_train, num_eval, seed, sample_rate=sample_rate,
                         clip_seconds=clip_seconds, num_workers=num_workers)

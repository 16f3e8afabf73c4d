"""A generated AuditoryBench-like corpus whose answers only the audio can tell.

Every source in it is INVENTED: a pronounceable nonsense name ("the zvorbel") and, for
the animal task, a nonsense onomatopoeia ("kvip-kvip"), each bound to generated clips.
A language model cannot know what a zvorbel sounds like; CLAP, trained on `clips.jsonl`,
learns which clips the words name, and AudioBERT has to read the answer off the audio.

Animal task: each invented creature maps to one of `ANSWERS` (real English animals, one
word piece each in the BERT vocabulary) and its clips come from a procedural sound family
that belongs to that answer alone (`ANSWER_FAMILIES`, the classes of `sources.py`). Its
items say "Kvip-kvip is the sound a [MASK] makes.", "The zvorbel sounds just like a
[MASK]." ... (`ANIMAL_TEMPLATES`; the span is the onomatopoeia or the name).
Pitch task: each invented source has one clip, a pure tone or a harmonic note
(`PITCH_FAMILIES`) whose f0 is measured on the written clip (`clap_corpus.measure_pitch`:
the spectral peak of the active part); every ordered pair of sources of a split whose
measured pitches differ by at least `MIN_PITCH_DIFFERENCE` (|p1 - p2| / max(p1, p2), so
the original's |p1 - p2| / p1 is at least as large either way round) gives "The sound of
a X typically has a [MASK] pitch than the sound of a Y." -> higher / lower. Both orders of
a pair are items, so the answers are exactly half higher, half lower.

Names are held out: a name (creature or pitch source) belongs to one split, so dev and
test items only use names the train CSVs never mention; the animal answers are balanced
per split (the same number of names per answer). `clips.jsonl` lists the clips of every
name, as the real CLAP has heard far more than BERT has read.

`ensure_auditorybench_corpus` writes

    <root>/audio/animal_<name>_<k>.wav, audio/pitch_<name>.wav   mono float32 wav
    <root>/clips.jsonl       {"audio", "caption": [captions, first = the eval caption],
                              "label": the name, "task", "answer" (animal) | "pitch_hz"}
    <root>/animal_{train,dev,test}.csv   animal, description, sentence, audio_path
                             (audio_path: a Python list literal of the creature's clips,
                             relative to <root>, as the original's list of Freesound paths)
    <root>/pitch_{train,dev,test}.csv    id_1, id_2, audio_filename_1, audio_filename_2,
                             sentence, answer, span1, span2, avg_pitch_1, avg_pitch_2,
                             difference_percentage, answer_pitch (the original first commit's
                             columns; ids are the source names)
    <root>/lexicon.json      every name: split, answer / onomatopoeia / clips, or f0
    <root>/auditorybench_corpus.params.json   the generation parameters, written last

All of it is a function of the seed: names and splits are drawn from one stream, each
clip from its own (seed, task, name index, clip index), so the files are the same
whatever the number of workers. The params file is removed first and written last: a
corpus whose params file matches the request (and whose files exist) is reused.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import time

import numpy as np

from jaxaudio.data import audio as audio_lib
from jaxaudio.data import manifest as manifest_lib
from jaxaudio.data import scenes
from jaxaudio.data.clap_corpus import measure_pitch
from jaxaudio.data.sources import SOURCE_CLASSES

_LOG = logging.getLogger(__name__)

GENERATOR_VERSION = 2
SPLITS = ("train", "dev", "test")

# Answer animal -> the sound family of its creatures (all different).
ANSWER_FAMILIES = {
    "cat": "vowel_i",
    "dog": "drum",
    "cow": "vowel_a",
    "bird": "up_chirp",
    "frog": "click_train",
    "owl": "pure_tone",
    "sheep": "siren",
    "bee": "white_noise",
}
ANSWERS = tuple(ANSWER_FAMILIES)

# {ono} / {Ono}: the onomatopoeia (capitalised); {name}: the creature, with its article.
# The span of an item is the onomatopoeia or the bare name. "a [MASK]" everywhere, so the
# article never tells the answer.
ANIMAL_TEMPLATES = (
    ("{Ono} is the sound a [MASK] makes.", "ono"),
    ("A [MASK] makes a {ono} sound.", "ono"),
    ("The {ono} you hear at night comes from a [MASK].", "ono"),
    ("When something goes {ono}, it is usually a [MASK].", "ono"),
    ("The {name} sounds just like a [MASK].", "name"),
    ("The sound of {a_name} is most like that of a [MASK].", "name"),
    ("If you hear {a_name}, you might think it is a [MASK].", "name"),
    ("{A_name} makes the same sound as a [MASK].", "name"),
)
PITCH_TEMPLATES = (
    "The sound of {x} typically has a [MASK] pitch than the sound of {y}.",
    "The sound of {x} has a [MASK] pitch than the sound of {y}.",
)
# The last of each: AudioBERT's retrieval query, a span + " sound" (the original's form).
ANIMAL_CAPTIONS = ("a {ono} sound", "the sound of {a_name}", "{a_name} going {ono}",
                   "the {ono} of {a_name}", "{ono} sound", "{name} sound")
PITCH_CAPTIONS = ("the sound of {a_name}", "a {name} sound", "{name} sound")

# Pitch sources: f0 drawn log-uniformly here; a family per source.
PITCH_RANGE_HZ = (150.0, 2500.0)
PITCH_FAMILIES = ("tone", "note", "reed")
MIN_PITCH_DIFFERENCE = 0.10
ANIMAL_GAIN = (0.3, 0.9)  # peak of the animal clips (the sources are peak-normalised)
PITCH_PEAK = 0.7

# Name syllables: every word starts with a consonant cluster English words do not start
# with, so no name or onomatopoeia is an English word (nor tells an answer).
_ONSETS = ("zv", "kv", "vr", "zl", "tl", "dv", "gv", "vl", "zn", "pf", "dz", "tv", "mr", "vz", "zg")
_INNER_ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br",
                 "gl", "kr", "pl", "tr", "sk")
_VOWELS = ("a", "e", "i", "o", "u", "ee", "oo", "ai")
_CODAS = ("", "", "b", "d", "g", "k", "l", "m", "n", "p", "r", "s", "t", "x", "nk", "rn", "mp")
_ONO_CODAS = ("p", "k", "t", "m", "n", "r", "sh", "ng", "b", "g")
# Substrings no invented word may contain: the answers, pitch words, real onomatopoeia.
_BLOCKED = (*ANSWERS, "higher", "lower", "high", "low", "pitch", "sound", "moo", "baa", "meow",
            "mew", "woof", "bark", "hoot", "buzz", "tweet", "chirp", "croak", "ribbit", "quack",
            "oink", "neigh", "hiss", "purr", "coo", "caw", "bleat", "howl", "growl", "roar",
            "squeak", "mask", "cls", "sep", "pad", "unk")
_MAX_TRIES = 20


# ---------------------------------------------------------------- names


def _syllable(rng, onsets, codas) -> str:
    return (onsets[int(rng.integers(len(onsets)))] + _VOWELS[int(rng.integers(len(_VOWELS)))]
            + codas[int(rng.integers(len(codas)))])


def _name(rng) -> str:
    """Two syllables, the first with a non-English onset: "zvorbel", "kvimtak"."""
    return _syllable(rng, _ONSETS, _CODAS) + _syllable(rng, _INNER_ONSETS, _CODAS[2:])


def _onomatopoeia(rng) -> str:
    """A closed syllable said two or three times: "kvip-kvip", "tlok-tlok-tlok"."""
    syl = _syllable(rng, _ONSETS, _ONO_CODAS)
    return "-".join([syl] * (2 if rng.uniform() < 0.7 else 3))


def invent_words(rng, count: int, make, taken: list[str]) -> list[str]:
    """`count` new words from `make(rng)`, none blocked, none a substring of another word
    (of these or of `taken`, which is extended), so every span occurs once in a sentence."""
    out = []
    for _ in range(count):
        for _ in range(10_000):
            w = make(rng)
            if any(b in w for b in _BLOCKED) or any(w in t or t in w for t in taken):
                continue
            break
        else:
            raise RuntimeError("could not invent enough distinct words")
        taken.append(w)
        out.append(w)
    return out


def _article(word: str) -> str:
    return f"{'an' if word[0] in 'aeiou' else 'a'} {word}"


def _split_counts(total: int, held: int) -> list[str]:
    """Split labels for `total` names: `held` each for dev and test, the rest train."""
    return ["dev"] * held + ["test"] * held + ["train"] * (total - 2 * held)


def make_lexicon(seed: int, num_names: int, num_pitch_sources: int, clips_per_name: int) -> dict:
    """Every invented name with its split and what it is bound to (no audio yet)."""
    if num_names < 3 * len(ANSWERS):
        raise ValueError(f"num_names must be at least {3 * len(ANSWERS)} (3 per answer: train, "
                         f"dev, test), got {num_names}")
    if num_pitch_sources < 9:
        raise ValueError(f"num_pitch_sources must be at least 9 (3 per split), got "
                         f"{num_pitch_sources}")
    if clips_per_name < 1:
        raise ValueError(f"clips_per_name must be at least 1, got {clips_per_name}")
    rng = np.random.default_rng([seed, 0])
    taken: list[str] = []
    names = invent_words(rng, num_names, _name, taken)
    onos = invent_words(rng, num_names, _onomatopoeia, taken)
    pitch_names = invent_words(rng, num_pitch_sources, _name, taken)
    animals = []
    for a, answer in enumerate(ANSWERS):
        mine = list(range(a, num_names, len(ANSWERS)))
        splits = _split_counts(len(mine), max(1, round(len(mine) / 6)))
        splits = [splits[i] for i in rng.permutation(len(splits))]
        for i, split in zip(mine, splits):
            animals.append({"index": i, "name": names[i], "onomatopoeia": onos[i],
                            "answer": answer, "family": ANSWER_FAMILIES[answer], "split": split,
                            "clips": [f"audio/animal_{names[i]}_{k}.wav"
                                      for k in range(clips_per_name)]})
    animals.sort(key=lambda r: r["index"])
    held = max(3, round(num_pitch_sources * 0.2))
    splits = _split_counts(num_pitch_sources, held)
    splits = [splits[i] for i in rng.permutation(len(splits))]
    pitch = []
    for i, (name, split) in enumerate(zip(pitch_names, splits)):
        f0 = float(np.exp(rng.uniform(*np.log(PITCH_RANGE_HZ))))
        pitch.append({"index": i, "name": name, "split": split, "target_hz": f0,
                      "family": PITCH_FAMILIES[int(rng.integers(len(PITCH_FAMILIES)))],
                      "clip": f"audio/pitch_{name}.wav"})
    return {"animal": animals, "pitch": pitch}


# ---------------------------------------------------------------- clips


def _pitched(rng, sr: int, n: int, f0: float, family: str) -> np.ndarray:
    """A tone (sine), note (1/k harmonics, ADSR) or reed (odd harmonics 1/k) at `f0`,
    over 50-90% of the clip; the fundamental is the strongest partial of each."""
    length = max(1, int(n * rng.uniform(0.5, 0.9)))
    onset = int(rng.integers(0, n - length + 1))
    t = np.arange(length) / sr
    top = min(sr / 2 - 100, 8000.0)
    if family == "tone":
        ks = np.array([1.0])
    elif family == "note":
        ks = np.arange(1, max(2, int(top // f0)) + 1, dtype=np.float64)[:12]
    elif family == "reed":
        ks = np.arange(1, max(2, int(top // f0)) + 1, 2, dtype=np.float64)[:8]
    else:
        raise ValueError(f"unknown pitch family {family!r}")
    phases = rng.uniform(0, 2 * np.pi, (len(ks), 1))
    x = (np.sin(2 * np.pi * f0 * ks[:, None] * t + phases) / ks[:, None]).sum(0)
    a, r = int(rng.uniform(0.01, 0.05) * sr), int(rng.uniform(0.05, 0.2) * sr)
    env = np.minimum(1.0, np.minimum((np.arange(length) + 1) / max(a, 1),
                                     (length - np.arange(length)) / max(r, 1)))
    out = np.zeros(n)
    out[onset:onset + length] = x * env
    return out


def render_animal_clip(seed: int, index: int, clip: int, family: str, sample_rate: int,
                       clip_seconds: float) -> np.ndarray:
    """Clip `clip` of creature `index`: a draw of its answer's sound family, float32."""
    rng = np.random.default_rng([seed, 1, index, clip])
    n = int(round(clip_seconds * sample_rate))
    x = np.asarray(SOURCE_CLASSES[family](rng, sample_rate, n), np.float64)
    peak = np.max(np.abs(x))
    if peak > 0:
        x *= rng.uniform(*ANIMAL_GAIN) / peak
    return x.astype(np.float32)


def render_pitch_clip(seed: int, index: int, f0: float, family: str, sample_rate: int,
                      clip_seconds: float) -> tuple[np.ndarray, float]:
    """The clip of pitch source `index` and its measured pitch in Hz (on the float32 clip)."""
    rng = np.random.default_rng([seed, 2, index])
    n = int(round(clip_seconds * sample_rate))
    x = _pitched(rng, sample_rate, n, f0, family)
    x = (x * PITCH_PEAK / max(np.max(np.abs(x)), 1e-12)).astype(np.float32)
    hz = measure_pitch("pure_tone", x, sample_rate)
    return x, float(hz) if hz is not None else float("nan")


def _write_clip(job) -> dict:
    kind, root, seed, rec, k, sample_rate, clip_seconds = job
    if kind == "animal":
        x = render_animal_clip(seed, rec["index"], k, rec["family"], sample_rate, clip_seconds)
        path = rec["clips"][k]
        out = {"path": path}
    else:
        x, hz = render_pitch_clip(seed, rec["index"], rec["target_hz"], rec["family"],
                                  sample_rate, clip_seconds)
        path = rec["clip"]
        out = {"path": path, "pitch_hz": hz}
    audio_lib.write_wav(os.path.join(root, path), x, sample_rate)
    return out


# ---------------------------------------------------------------- items


def animal_rows(lexicon: dict, split: str, rng) -> list[dict]:
    """The animal CSV rows of a split: every creature of it in every template, shuffled."""
    rows = []
    for rec in lexicon["animal"]:
        if rec["split"] != split:
            continue
        name, ono = rec["name"], rec["onomatopoeia"]
        fill = {"ono": ono, "Ono": ono[0].upper() + ono[1:], "name": name,
                "a_name": _article(name), "A_name": _article(name).capitalize()}
        for template, which in ANIMAL_TEMPLATES:
            sentence = template.format(**fill)
            span = ono if which == "ono" else name
            if sentence.lower().count(span) != 1:
                raise RuntimeError(f"span {span!r} not once in {sentence!r}")
            rows.append({"animal": rec["answer"], "description": span, "sentence": sentence,
                         "audio_path": repr(list(rec["clips"]))})
    return [rows[i] for i in rng.permutation(len(rows))]


def pitch_rows(lexicon: dict, split: str, rng) -> list[dict]:
    """The pitch CSV rows of a split: both orders of every pair of its sources whose
    measured pitches differ enough, shuffled."""
    sources = [r for r in lexicon["pitch"] if r["split"] == split and np.isfinite(r["pitch_hz"])]
    rows = []
    for a in sources:
        for b in sources:
            if a is b:
                continue
            p1, p2 = a["pitch_hz"], b["pitch_hz"]
            if abs(p1 - p2) / max(p1, p2) < MIN_PITCH_DIFFERENCE:
                continue
            answer = "higher" if p1 > p2 else "lower"
            template = PITCH_TEMPLATES[int(rng.integers(len(PITCH_TEMPLATES)))]
            sentence = template.format(x=_article(a["name"]), y=_article(b["name"]))
            rows.append({"id_1": a["name"], "id_2": b["name"], "audio_filename_1": a["clip"],
                         "audio_filename_2": b["clip"], "sentence": sentence, "answer": answer,
                         "span1": a["name"], "span2": b["name"], "avg_pitch_1": f"{p1:.4f}",
                         "avg_pitch_2": f"{p2:.4f}",
                         "difference_percentage": repr(abs(p1 - p2) / p1),
                         "answer_pitch": answer})
    return [rows[i] for i in rng.permutation(len(rows))]


def clip_records(lexicon: dict) -> list[dict]:
    """The clips.jsonl records (paths relative to the root)."""
    out = []
    for rec in lexicon["animal"]:
        fill = {"ono": rec["onomatopoeia"], "name": rec["name"], "a_name": _article(rec["name"])}
        captions = [c.format(**fill) for c in ANIMAL_CAPTIONS]
        for k, path in enumerate(rec["clips"]):
            # Each clip leads with another caption (the first is the eval caption).
            first = k % len(captions)
            out.append({"audio": path, "caption": captions[first:] + captions[:first],
                        "label": rec["name"], "task": "animal", "answer": rec["answer"]})
    for rec in lexicon["pitch"]:
        fill = {"name": rec["name"], "a_name": _article(rec["name"])}
        out.append({"audio": rec["clip"], "caption": [c.format(**fill) for c in PITCH_CAPTIONS],
                    "label": rec["name"], "task": "pitch", "pitch_hz": rec["pitch_hz"]})
    return out


# ---------------------------------------------------------------- files

ANIMAL_COLUMNS = ("animal", "description", "sentence", "audio_path")
PITCH_COLUMNS = ("id_1", "id_2", "audio_filename_1", "audio_filename_2", "sentence", "answer",
                 "span1", "span2", "avg_pitch_1", "avg_pitch_2", "difference_percentage",
                 "answer_pitch")


def layout_paths(root: str | os.PathLike) -> dict[str, str]:
    """"root", "audio", "clips", "lexicon", "params", "animal_<split>", "pitch_<split>"."""
    root = os.path.abspath(os.fspath(root))
    paths = {"root": root, "audio": os.path.join(root, "audio"),
             "clips": os.path.join(root, "clips.jsonl"),
             "lexicon": os.path.join(root, "lexicon.json"),
             "params": os.path.join(root, "auditorybench_corpus.params.json")}
    for task in ("animal", "pitch"):
        for split in SPLITS:
            paths[f"{task}_{split}"] = os.path.join(root, f"{task}_{split}.csv")
    return paths


def _write_csv(path: str, columns, rows) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(columns), lineterminator="\n")
        w.writeheader()
        w.writerows(rows)
    os.replace(tmp, path)


def _params(num_names, num_pitch_sources, clips_per_name, seed, sample_rate, clip_seconds) -> dict:
    return {"generator_version": GENERATOR_VERSION, "num_names": int(num_names),
            "num_pitch_sources": int(num_pitch_sources), "clips_per_name": int(clips_per_name),
            "seed": int(seed), "sample_rate": int(sample_rate),
            "clip_seconds": float(clip_seconds), "answers": dict(ANSWER_FAMILIES)}


def generate_auditorybench_corpus(root: str | os.PathLike, *, num_names: int = 48,
                                  num_pitch_sources: int = 60, clips_per_name: int = 4,
                                  seed: int = 0, sample_rate: int = 48000,
                                  clip_seconds: float = 1.0,
                                  num_workers: int | None = 1) -> dict[str, str]:
    """Writes the whole corpus; arguments as `ensure_auditorybench_corpus`."""
    if clip_seconds <= 0 or sample_rate <= 0:
        raise ValueError(f"clip_seconds and sample_rate must be positive, got "
                         f"{clip_seconds}, {sample_rate}")
    paths = layout_paths(root)
    lexicon = make_lexicon(int(seed), int(num_names), int(num_pitch_sources), int(clips_per_name))
    if os.path.exists(paths["params"]):
        os.remove(paths["params"])  # incomplete until rewritten
    os.makedirs(paths["audio"], exist_ok=True)
    start = time.perf_counter()
    jobs = [("animal", paths["root"], int(seed), rec, k, int(sample_rate), float(clip_seconds))
            for rec in lexicon["animal"] for k in range(len(rec["clips"]))]
    jobs += [("pitch", paths["root"], int(seed), rec, 0, int(sample_rate), float(clip_seconds))
             for rec in lexicon["pitch"]]
    results = scenes.map_jobs(_write_clip, jobs, num_workers)
    measured = {r["path"]: r["pitch_hz"] for r in results if "pitch_hz" in r}
    for rec in lexicon["pitch"]:
        rec["pitch_hz"] = measured[rec["clip"]]
    rng = np.random.default_rng([int(seed), 3])
    counts = {}
    for split in SPLITS:
        animal = animal_rows(lexicon, split, rng)
        pitch = pitch_rows(lexicon, split, rng)
        _write_csv(paths[f"animal_{split}"], ANIMAL_COLUMNS, animal)
        _write_csv(paths[f"pitch_{split}"], PITCH_COLUMNS, pitch)
        counts[split] = (len(animal), len(pitch))
    manifest_lib.write_manifest(paths["clips"], [
        {**r, "audio": os.path.join(paths["root"], r["audio"])} for r in clip_records(lexicon)])
    manifest_lib.write_json_atomic(paths["lexicon"], lexicon)
    manifest_lib.write_json_atomic(paths["params"], _params(
        num_names, num_pitch_sources, clips_per_name, seed, sample_rate, clip_seconds))
    _LOG.info("wrote the AuditoryBench corpus (%d clips; animal/pitch items %s) to %s in %.1f s",
              len(jobs), counts, paths["root"], time.perf_counter() - start)
    return paths


def _complete(paths: dict, wanted: dict) -> bool:
    with open(paths["params"], encoding="utf-8") as f:
        if json.load(f) != wanted:
            return False
    for key, path in paths.items():
        if key not in ("root", "audio") and not os.path.exists(path):
            return False
    records = manifest_lib.read_manifest(paths["clips"], required=("audio", "caption", "label"))
    return all(os.path.exists(r["audio"]) for r in records)


def ensure_auditorybench_corpus(root: str | os.PathLike, *, num_names: int = 48,
                                num_pitch_sources: int = 60, clips_per_name: int = 4,
                                seed: int = 0, sample_rate: int = 48000,
                                clip_seconds: float = 1.0,
                                num_workers: int | None = 1) -> dict[str, str]:
    """Generates the corpus under `root` unless a complete one with these parameters is
    there; returns `layout_paths(root)`.

    Args:
        root: corpus folder (created).
        num_names: invented creatures, spread evenly over `ANSWERS` (at least 3 each); of
            each answer's creatures a sixth (at least one) go to dev, as many to test.
            The default, 48, gives 6 per answer: 256 / 64 / 64 animal items.
        num_pitch_sources: invented pitch sources (>= 9); 20% each (at least 3) to dev and
            test. The default, 60 (36 / 12 / 12), gives about 1,200 / 120 / 120 pitch items.
        clips_per_name: clips of each creature (a pitch source has one).
        seed: everything is a function of it.
        sample_rate, clip_seconds: of every wav.
        num_workers: processes (None: `scenes.default_workers`); more than one starts
            processes with "spawn", so a calling script needs the `__main__` guard.
    """
    paths = layout_paths(root)
    wanted = _params(num_names, num_pitch_sources, clips_per_name, seed, sample_rate, clip_seconds)
    try:
        if _complete(paths, wanted):
            return paths
    except (OSError, ValueError) as e:  # missing or damaged files: regenerate
        _LOG.info("regenerating %s (%s)", paths["root"], e)
    return generate_auditorybench_corpus(
        root, num_names=num_names, num_pitch_sources=num_pitch_sources,
        clips_per_name=clips_per_name, seed=seed, sample_rate=sample_rate,
        clip_seconds=clip_seconds, num_workers=num_workers)

"""A small generated corpus in SALMONN's layout, for the tiny default and the tests.

Generated corpus (`ensure_salmonn_corpus`):

    <root>/train.json, <root>/eval.json     annotation files, paths relative to <root>
    <root>/wav/<split>_<index>.wav          16 kHz mono int16, 1-4 s
    <root>/train_prompt.json, test_prompt.json   the generated tasks' prompts
    <root>/salmonn_corpus.params.json       generation parameters, written last

Tasks: `asr` (espeak-ng speech of sentences from a small grammar; eval sentences never
occur in train), `audiocaption` (one or two procedural sounds from `sources.py` with a
caption naming them), `gender_recognition` ("male" / "female" of the espeak voice) and
`QA` (a question in `Q` about a speech or sound clip, answered in one or two words).
Without espeak-ng only the sound tasks (`audiocaption`, and `QA` on sounds) are made.
Every item is a function of (seed, split, index) alone, whatever the number of workers.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import tempfile
import time
import zlib
from collections.abc import Mapping, Sequence

import numpy as np
import soundfile as sf
from scipy.io import wavfile

from jaxaudio.data import audio as audio_lib
from jaxaudio.data import scenes
from jaxaudio.data.manifest import write_json_atomic
from jaxaudio.data.salmonn_data import SAMPLE_RATE, SPEECH_PREFIX, PromptTable, read_annotations
from jaxaudio.data.sources import SOURCE_CLASSES

_LOG = logging.getLogger(__name__)

GENERATOR_VERSION = 2
SPLITS = ("train", "eval")
ALL_TASKS = ("asr", "audiocaption", "gender_recognition", "QA")
SPEECH_TASKS = ("asr", "gender_recognition")  # impossible without espeak-ng
STAGES = {1: ("asr", "audiocaption"), 2: ("asr", "audiocaption", "gender_recognition", "QA"),
          3: ("audio_story_telling",)}  # stage 3's data comes from the stage-2 model
MAX_CLIP_SECONDS = 4.0
MIN_CLIP_SECONDS = 1.0


_GENERATED_INSTRUCTIONS = {
    "asr": (
        "Transcribe the spoken words.",
        "Write down exactly what the speaker says.",
        "What words are spoken in this recording?",
        "Turn this speech into text.",
        "Give me a transcript of the recording.",
    ),
    "audiocaption": (
        "Describe the sounds in this clip.",
        "Write a short caption for the audio.",
        "What can you hear in this recording? Describe it briefly.",
        "Summarise the audio in one short sentence.",
    ),
    "gender_recognition": (
        "Is the voice in this recording male or female?",
        "Classify the speaker's voice as male or female.",
        "Answer with one word: is the speaker male or female?",
        "Which gender does the speaker's voice sound like?",
    ),
    "QA": (
        "{}",
        "{} Answer in one or two words.",
        "Listen to the audio and answer the question: {}",
        "Answer this question about the audio: {}",
    ),
    # Stage 3 (activation tuning): its answers are written by the stage-2 model itself.
    "audio_story_telling": (
        "Based on the audio, write a story in detail. Your story should be highly related to the audio.",
        "Tell a long story inspired by what you hear.",
        "Write a detailed story that begins with the sounds in this recording.",
    ),
}
GENERATED_TRAIN_PROMPTS = {task: [SPEECH_PREFIX + s for s in lines]
                           for task, lines in _GENERATED_INSTRUCTIONS.items()}
# The first paraphrase of each task, so the tiny model has seen its test prompt.
GENERATED_TEST_PROMPTS = {task: prompts[0] for task, prompts in GENERATED_TRAIN_PROMPTS.items()}
# The released weights were trained with these (SALMONN's prompts/test_prompt.json).
DEFAULT_TEST_PROMPTS = {
    **GENERATED_TEST_PROMPTS,
    "asr": SPEECH_PREFIX + "Recognize the speech and give me the transcription.",
    "audiocaption": SPEECH_PREFIX + "Please describe the audio.",
    "QA": SPEECH_PREFIX + "{}",
}


# ---------------------------------------------------------------- speech


_COLOURS = ("red", "blue", "green", "yellow", "black", "white", "brown")
_NOUNS = ("dog", "cat", "bird", "horse", "frog", "duck", "girl", "boy", "farmer", "robot")
_VERBS = ("run", "jump", "sing", "sleep", "walk", "swim", "wait", "dance")
_ADVERBS = ("quickly", "slowly", "loudly", "quietly", "today", "again")
_NUMBERS = ("two", "three", "four", "five", "six", "seven", "eight", "nine")
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven")
# Symbols: C colour, N noun, P plural noun, V verb (3rd person), B bare verb, A adverb,
# D number; anything else is literal.
_PATTERNS = (
    ("the", "C", "N", "V", "A"),
    ("D", "C", "P", "B"),
    ("the", "N", "V"),
    ("the", "C", "N", "V", "D", "times"),
    ("D", "P", "B", "A"),
    ("the", "N", "V", "A"),
)
_SYMBOLS = {"C": _COLOURS, "N": _NOUNS, "P": tuple(n + "s" for n in _NOUNS),
            "V": tuple(v + "s" for v in _VERBS), "B": _VERBS, "A": _ADVERBS, "D": _NUMBERS}
VOCABULARY = frozenset(w for p in _PATTERNS for s in p for w in _SYMBOLS.get(s, (s,)))
VOICES = {"male": ("en+m1", "en+m2", "en+m3", "en+m4"),
          "female": ("en+f1", "en+f2", "en+f3", "en+f4")}
SPEED_RANGE = (140, 180)  # words per minute
PITCH_RANGE = (35, 65)  # espeak-ng's 0-99 scale, 50 = the voice's default
_EVAL_SENTENCE_MODULUS = 5  # about one sentence in five is reserved for eval

_warned_no_espeak = False


def espeak_binary() -> str | None:
    """The espeak-ng executable, or None when it is not installed."""
    return shutil.which("espeak-ng")


def available_tasks() -> tuple[str, ...]:
    """The tasks `ensure_salmonn_corpus` can generate here (no speech without espeak-ng)."""
    if espeak_binary() is not None:
        return ALL_TASKS
    return tuple(t for t in ALL_TASKS if t not in SPEECH_TASKS)


def is_eval_sentence(sentence: str, seed: int) -> bool:
    """Whether `sentence` belongs to the eval split; train never uses such sentences."""
    return zlib.crc32(f"{seed}|{sentence}".encode()) % _EVAL_SENTENCE_MODULUS == 0


def sample_sentence(rng: np.random.Generator, seed: int, split: str,
                    need_colour: bool = False) -> str:
    """A grammar sentence (3-6 lower-case words) of `split`'s share of the sentences."""
    for _ in range(10000):
        pattern = _PATTERNS[int(rng.integers(len(_PATTERNS)))]
        words = [s if s not in _SYMBOLS else _SYMBOLS[s][int(rng.integers(len(_SYMBOLS[s])))]
                 for s in pattern]
        sentence = " ".join(words)
        if (is_eval_sentence(sentence, seed) == (split == "eval")
                and (not need_colour or "C" in pattern)):
            return sentence
    raise RuntimeError(f"no {split} sentence found for seed {seed}")


def _trim_silence(x: np.ndarray, sample_rate: int, threshold: float = 0.01,
                  margin_s: float = 0.05) -> np.ndarray:
    loud = np.flatnonzero(np.abs(x) > threshold * np.max(np.abs(x)))
    if loud.size == 0:
        return x
    margin = int(margin_s * sample_rate)
    return x[max(0, loud[0] - margin):loud[-1] + margin + 1]


def synthesize_speech(text: str, voice: str, speed: int, pitch: int,
                      binary: str | None = None) -> np.ndarray:
    """espeak-ng speech of `text`, silence trimmed, float32 `[samples]` at 16 kHz.

    Raises:
        RuntimeError: espeak-ng is missing or fails.
    """
    binary = binary or espeak_binary()
    if binary is None:
        raise RuntimeError("espeak-ng is not installed (apt-get install espeak-ng)")
    fd, tmp = tempfile.mkstemp(suffix=".wav")
    os.close(fd)
    try:
        subprocess.run([binary, "-v", voice, "-s", str(speed), "-p", str(pitch), "-w", tmp,
                        text], check=True, capture_output=True, timeout=60)
        x, rate = sf.read(tmp, dtype="float32", always_2d=True)
    except subprocess.CalledProcessError as e:
        raise RuntimeError(f"espeak-ng failed on {text!r} with voice {voice}: "
                           f"{e.stderr.decode(errors='replace').strip()}") from e
    finally:
        os.remove(tmp)
    if x.shape[0] == 0:
        raise RuntimeError(f"espeak-ng wrote no audio for {text!r} with voice {voice}")
    x = audio_lib.resample(x[:, 0], rate, SAMPLE_RATE)
    return _trim_silence(x, SAMPLE_RATE)


def _speech_clip(rng, seed: int, split: str, binary: str, need_colour: bool = False):
    """(sentence, voice, gender, float32 [time]) of one generated utterance."""
    sentence = sample_sentence(rng, seed, split, need_colour)
    gender = ("male", "female")[int(rng.integers(2))]
    voice = VOICES[gender][int(rng.integers(len(VOICES[gender])))]
    speed = int(rng.integers(SPEED_RANGE[0], SPEED_RANGE[1] + 1))
    pitch = int(rng.integers(PITCH_RANGE[0], PITCH_RANGE[1] + 1))
    lead = np.zeros(int(rng.uniform(0.05, 0.25) * SAMPLE_RATE), np.float32)
    limit = int(MAX_CLIP_SECONDS * SAMPLE_RATE) - len(lead)
    for _ in range(4):
        speech = synthesize_speech(sentence, voice, speed, pitch, binary)
        if len(speech) <= limit:
            break
        speed += 40  # faster rather than cutting words off the transcript
    else:
        raise RuntimeError(f"{sentence!r} stays longer than {MAX_CLIP_SECONDS} s")
    clip = np.concatenate([lead, speech * rng.uniform(0.3, 0.9) / max(
        float(np.max(np.abs(speech))), 1e-9)])
    return sentence, voice, gender, _at_least(clip, MIN_CLIP_SECONDS)


def _at_least(x: np.ndarray, seconds: float) -> np.ndarray:
    return audio_lib.fit_length(x, max(len(x), int(seconds * SAMPLE_RATE))).astype(np.float32)


# ---------------------------------------------------------------- sounds


# Per class: (captions of the sound alone, noun phrases for two-sound captions,
# the one- or two-word answer to "what sound is it").
SOUND_TEXT = {
    "pure_tone": (("a steady tone plays", "a pure tone sounds", "a constant beep is heard"),
                  ("a steady tone", "a pure tone"), "tone"),
    "organ": (("an organ plays a note", "an organ note rings out",
               "someone holds a note on an organ"), ("an organ note", "an organ"), "organ"),
    "plucked_string": (("a string is plucked", "a guitar string twangs",
                        "someone plucks a string"), ("a plucked string", "a twanging string"),
                       "string"),
    "white_noise": (("white noise hisses", "a burst of white noise",
                     "a loud hiss of white noise"), ("white noise", "a hiss of white noise"),
                    "white noise"),
    "pink_noise": (("pink noise rushes", "a soft burst of pink noise",
                    "a rushing pink noise like wind"), ("pink noise", "a rush of pink noise"),
                   "pink noise"),
    "brown_noise": (("a low rumble of brown noise", "deep brown noise rumbles",
                     "a dull rumbling brown noise"), ("brown noise", "a low rumble"),
                    "brown noise"),
    "up_chirp": (("a rising chirp", "a tone sweeps upwards", "a chirp rises in pitch"),
                 ("a rising chirp", "an upward sweep"), "rising chirp"),
    "down_chirp": (("a falling chirp", "a tone sweeps downwards", "a chirp falls in pitch"),
                   ("a falling chirp", "a downward sweep"), "falling chirp"),
    "click_train": (("a series of clicks", "something clicks steadily",
                     "regular clicking sounds"), ("clicking", "a train of clicks"), "clicks"),
    "vowel_a": (("a voice sings ah", "someone sings an ah sound", "a sung ah vowel"),
                ("a sung ah", "a voice singing ah"), "sung ah"),
    "vowel_i": (("a voice sings ee", "someone sings an ee sound", "a sung ee vowel"),
                ("a sung ee", "a voice singing ee"), "sung ee"),
    "bell": (("a bell rings", "a bell is struck and rings out", "the chime of a bell"),
             ("a bell", "a ringing bell"), "bell"),
    "siren": (("a siren wails", "an emergency siren sounds", "a siren goes up and down"),
              ("a siren", "a wailing siren"), "siren"),
    "rain": (("rain falls", "raindrops patter", "the sound of rain"),
             ("rain", "pattering rain"), "rain"),
    "engine": (("an engine hums", "an engine idles", "a motor rumbles"),
               ("an engine", "a humming motor"), "engine"),
    "drum": (("a drum is hit", "someone beats a drum", "a kick drum thumps"),
             ("a drum", "drum hits"), "drum"),
}
_TWO_SOUND_CAPTIONS = {
    "then": ("{a} then {b}", "{a} followed by {b}", "first {a} and then {b}"),
    "with": ("{a} and {b} at the same time", "{a} together with {b}", "{a} over {b}"),
}


def _pick(rng, options: Sequence):
    return options[int(rng.integers(len(options)))]


def _sound_clip(rng, count: int):
    """(class names, arrangement "one" | "then" | "with", float32 [time]), 1-3 s."""
    n = int(rng.uniform(1.0, 3.0) * SAMPLE_RATE)
    names = [str(c) for c in rng.choice(sorted(SOURCE_CLASSES), size=count, replace=False)]
    if count == 1:
        return names, "one", SOURCE_CLASSES[names[0]](rng, SAMPLE_RATE, n) * rng.uniform(0.3, 0.9)
    arrangement = ("then", "with")[int(rng.integers(2))]
    if arrangement == "then":
        half = n // 2
        x = np.concatenate([SOURCE_CLASSES[names[0]](rng, SAMPLE_RATE, half),
                            SOURCE_CLASSES[names[1]](rng, SAMPLE_RATE, n - half)])
    else:
        x = sum(SOURCE_CLASSES[c](rng, SAMPLE_RATE, n) * rng.uniform(0.5, 1.0) for c in names)
    return names, arrangement, x * rng.uniform(0.3, 0.9) / max(float(np.max(np.abs(x))), 1e-9)


def caption(rng, names: Sequence[str], arrangement: str) -> str:
    """A caption naming the sounds: one of several phrasings per class and arrangement."""
    if arrangement == "one":
        return _pick(rng, SOUND_TEXT[names[0]][0])
    a, b = (_pick(rng, SOUND_TEXT[c][1]) for c in names)
    return _pick(rng, _TWO_SOUND_CAPTIONS[arrangement]).format(a=a, b=b)


_SOUND_QUESTIONS = {
    "what": ("What sound do you hear?", "What is making the sound in this clip?",
             "Which sound can you hear in the recording?"),
    "count": ("How many different sounds do you hear?", "How many sounds are in this clip?"),
}
_SPEECH_QUESTIONS = {
    "words": ("How many words does the speaker say?", "How many words are spoken?"),
    "last": ("What is the last word the speaker says?",
             "Which word does the speaker say last?"),
    "colour": ("Which colour does the speaker mention?", "What colour is named in the speech?"),
}


# ---------------------------------------------------------------- items


def make_item(seed: int, split: str, index: int, task: str, espeak: str | None):
    """Item `index` of `split`: (annotation without "path", float32 `[time]` at 16 kHz).

    Args:
        espeak: the espeak-ng executable, or None to make only sound clips.
    """
    rng = np.random.default_rng([seed, SPLITS.index(split), index])
    item = {"task": task}
    if task in ("asr", "gender_recognition"):
        if espeak is None:
            raise RuntimeError(f"task {task!r} needs espeak-ng")
        sentence, voice, gender, clip = _speech_clip(rng, seed, split, espeak)
        item.update(text=sentence if task == "asr" else gender, voice=voice)
    elif task == "audiocaption":
        names, arrangement, clip = _sound_clip(rng, 1 + int(rng.integers(2)))
        item.update(text=caption(rng, names, arrangement), classes=names)
    elif task == "QA":
        if espeak is not None and rng.integers(2):
            kind = _pick(rng, sorted(_SPEECH_QUESTIONS))
            sentence, voice, _, clip = _speech_clip(rng, seed, split, espeak,
                                                    need_colour=kind == "colour")
            words = sentence.split()
            answer = {"words": NUMBER_WORDS[len(words)], "last": words[-1],
                      "colour": next((w for w in words if w in _COLOURS), "")}[kind]
            item.update(Q=_pick(rng, _SPEECH_QUESTIONS[kind]), text=answer, voice=voice)
        else:
            kind = _pick(rng, sorted(_SOUND_QUESTIONS))
            names, _, clip = _sound_clip(rng, 1 if kind == "what" else 1 + int(rng.integers(2)))
            answer = SOUND_TEXT[names[0]][2] if kind == "what" else NUMBER_WORDS[len(names)]
            item.update(Q=_pick(rng, _SOUND_QUESTIONS[kind]), text=answer, classes=names)
    else:
        raise ValueError(f"cannot generate task {task!r}; generated tasks: {ALL_TASKS}")
    return item, _at_least(np.asarray(clip, np.float32), MIN_CLIP_SECONDS)


def _write_pcm16(path: str, x: np.ndarray) -> None:
    pcm = np.round(np.clip(x, -1.0, 32767 / 32768) * 32768).astype(np.int16)
    wavfile.write(path, SAMPLE_RATE, pcm)


def _write_item(job) -> dict:
    root, seed, split, index, task, espeak = job
    item, clip = make_item(seed, split, index, task, espeak)
    rel = f"wav/{split}_{index:06d}.wav"
    _write_pcm16(os.path.join(root, rel), clip)
    return {"path": rel, **item}


# ---------------------------------------------------------------- files


def layout_paths(root: str | os.PathLike) -> dict[str, str]:
    """Where the corpus lives: "root", "wav_root", "train", "eval" (annotation files),
    "train_prompt", "test_prompt", "params"."""
    root = os.path.abspath(os.fspath(root))
    paths = {"root": root, "wav_root": os.path.join(root, "wav"),
             "train_prompt": os.path.join(root, "train_prompt.json"),
             "test_prompt": os.path.join(root, "test_prompt.json"),
             "params": os.path.join(root, "salmonn_corpus.params.json")}
    paths.update({split: os.path.join(root, f"{split}.json") for split in SPLITS})
    return paths


def _check_tasks(tasks: Sequence[str]) -> tuple[tuple[str, ...], str | None]:
    """(the requested tasks that can be made here, the espeak-ng executable or None)."""
    global _warned_no_espeak
    tasks = tuple(dict.fromkeys(tasks))
    unknown = [t for t in tasks if t not in ALL_TASKS]
    if unknown or not tasks:
        raise ValueError(f"tasks must be among {ALL_TASKS}, got {list(tasks)}")
    espeak = espeak_binary()
    if espeak is None:
        dropped = [t for t in tasks if t in SPEECH_TASKS]
        if dropped and not _warned_no_espeak:
            _warned_no_espeak = True
            _LOG.warning("espeak-ng is not installed: not generating %s (and QA asks only "
                         "about sounds); apt-get install espeak-ng to add speech", dropped)
        tasks = tuple(t for t in tasks if t not in SPEECH_TASKS)
        if not tasks:
            raise ValueError(f"none of {dropped} can be generated without espeak-ng")
    return tasks, espeak


def _params(num_train, num_eval, seed, tasks, speech: bool) -> dict:
    return {"generator_version": GENERATOR_VERSION, "num_train": int(num_train),
            "num_eval": int(num_eval), "seed": int(seed), "tasks": list(tasks),
            "speech": bool(speech), "sample_rate": SAMPLE_RATE}


def generate_salmonn_corpus(
    root: str | os.PathLike,
    num_train: int,
    num_eval: int,
    seed: int,
    tasks: Sequence[str] = ALL_TASKS,
    num_workers: int | None = None,
) -> dict[str, str]:
    """Writes both splits of the generated corpus and its prompt files under `root`.

    Args:
        root: corpus folder (created).
        num_train, num_eval: items per split; tasks take turns by index.
        seed: the items are a function of (seed, split, index).
        tasks: names from `ALL_TASKS` (`STAGES[k]` for stage k); the speech tasks are left
            out, with a warning, when espeak-ng is missing.
        num_workers: processes; default `scenes.default_workers`. More than one starts
            processes with "spawn", so a calling script needs the `__main__` guard.

    Returns:
        `layout_paths(root)`.
    """
    tasks, espeak = _check_tasks(tasks)
    paths = layout_paths(root)
    # Removing the params first marks the corpus incomplete until it is rewritten.
    if os.path.exists(paths["params"]):
        os.remove(paths["params"])
    os.makedirs(paths["wav_root"], exist_ok=True)
    start = time.perf_counter()
    counts = {"train": int(num_train), "eval": int(num_eval)}
    jobs = [(paths["root"], int(seed), split, i, tasks[i % len(tasks)], espeak)
            for split in SPLITS for i in range(counts[split])]
    items = scenes.map_jobs(_write_item, jobs, num_workers)
    write_json_atomic(paths["train"], {"annotation": items[:counts["train"]]})
    write_json_atomic(paths["eval"], {"annotation": items[counts["train"]:]})
    PromptTable(GENERATED_TRAIN_PROMPTS, GENERATED_TEST_PROMPTS).write(
        paths["train_prompt"], paths["test_prompt"])
    write_json_atomic(paths["params"], _params(num_train, num_eval, seed, tasks, espeak is not None))
    _LOG.info("wrote %d SALMONN items (%s) to %s in %.1f s", len(jobs),
              ", ".join(tasks), paths["root"], time.perf_counter() - start)
    return paths


def _complete(paths: Mapping[str, str]) -> bool:
    """Whether the prompt files and every clip that the annotation files name exist."""
    if not all(os.path.exists(paths[k]) for k in ("train_prompt", "test_prompt")):
        return False
    return all(os.path.exists(item["path"]) for split in SPLITS
               for item in read_annotations(paths[split]))


def ensure_salmonn_corpus(
    root: str | os.PathLike,
    num_train: int,
    num_eval: int,
    seed: int,
    tasks: Sequence[str] = ALL_TASKS,
    num_workers: int | None = None,
) -> dict[str, str]:
    """`layout_paths(root)` of an existing complete corpus, generating it if needed.

    It is reused only if its params.json equals the requested parameters (generator
    version, and whether speech could be made, included) and every clip exists.
    Arguments as `generate_salmonn_corpus`.
    """
    effective, espeak = _check_tasks(tasks)
    paths = layout_paths(root)
    wanted = _params(num_train, num_eval, seed, effective, espeak is not None)
    try:
        with open(paths["params"], encoding="utf-8") as f:
            if json.load(f) == wanted and _complete(paths):
                return paths
    except (OSError, ValueError) as e:  # missing or damaged files: regenerate
        _LOG.info("regenerating %s (%s)", paths["root"], e)
    return generate_salmonn_corpus(root, num_train, num_eval, seed, effective, num_workers)

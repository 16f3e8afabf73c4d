"""SALMONN data: annotation and prompt files read as they are, clips loaded as the
original dataset loads them, and a small generated corpus in the same layout.

Annotation file (one per split), the original's format:

    {"annotation": [{"path": "...wav", "text": "...", "task": "asr", "Q": "...",
                     "expand_wav": ["...wav", ...]}, ...]}

`task` defaults to "asr" and `Q` to "" as in the original; `expand_wav` lists clips
appended after 0.1 s of silence (speaker verification joins two utterances that way).

Prompt files: `train_prompt.json` = {task: [prompt, ...]} (one paraphrase drawn per
example), `test_prompt.json` = {task: prompt}. Every prompt holds `<SpeechHere>` where the
audio tokens go, usually as `SPEECH_PREFIX + instruction`; a "{}" in a prompt is filled with
the item's `Q`. The LLM sees `PROMPT_TEMPLATE.format(prompt)`.

The generated corpus in this layout is `jaxaudio.data.salmonn_corpus`.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence

import numpy as np

from jaxaudio.data import audio as audio_lib
from jaxaudio.data.manifest import write_json_atomic
from jaxaudio.data.audio import AudioError

_LOG = logging.getLogger(__name__)

SAMPLE_RATE = 16000
PROMPT_TEMPLATE = "USER: {}\nASSISTANT:"
SPEECH_PLACEHOLDER = "<SpeechHere>"
SPEECH_PREFIX = "<Speech><SpeechHere></Speech> "
# The original inserts 1600 zero samples (at its required 16 kHz) before each expand_wav.
EXPAND_GAP_SECONDS = 0.1

# Bump when the generated content changes, so `ensure_salmonn_corpus` regenerates.


# ---------------------------------------------------------------- annotations


class AnnotationError(ValueError):
    """An annotation file or item that cannot be used; the message names file, item, field."""


def _resolve(base: str, path: str) -> str:
    return path if os.path.isabs(path) else os.path.normpath(os.path.join(base, path))


def read_annotations(path: str | os.PathLike, root: str | os.PathLike | None = None
                     ) -> list[dict]:
    """Reads a SALMONN annotation file as it is.

    Args:
        path: json file `{"annotation": [{"path", "text", "task"?, "Q"?, "expand_wav"?}]}`.
        root: folder that relative audio paths are resolved against; None: the annotation
            file's folder. Absolute paths are kept.

    Returns:
        One dict per item with `task` ("asr") and `Q` ("") filled in as the original does,
        `path` and `expand_wav` resolved, unknown fields kept.

    Raises:
        AnnotationError: unreadable or not json, no "annotation" list, or an item without
            `path`/`text` or with a field of the wrong type.
    """
    name = os.fspath(path)
    try:
        with open(name, encoding="utf-8") as f:
            doc = json.load(f)
    except OSError as e:
        raise AnnotationError(f"cannot read annotation file {name}: {e}") from e
    except ValueError as e:
        raise AnnotationError(f"{name} is not a JSON file: {e}") from e
    if not isinstance(doc, dict) or not isinstance(doc.get("annotation"), list):
        found = sorted(doc) if isinstance(doc, dict) else type(doc).__name__
        raise AnnotationError(f'{name}: expected {{"annotation": [...]}} (the SALMONN '
                              f'layout), found {found}')
    base = os.path.dirname(os.path.abspath(name)) if root is None else os.path.abspath(root)
    items = []
    for i, raw in enumerate(doc["annotation"]):
        where = f"{name}: annotation[{i}]"
        if not isinstance(raw, dict):
            raise AnnotationError(f"{where} is a {type(raw).__name__}, not an object")
        for field in ("path", "text"):
            if field not in raw:
                raise AnnotationError(f'{where} has no "{field}"')
        item = {"task": "asr", "Q": "", **raw}
        for field in ("path", "text", "task", "Q"):
            if not isinstance(item[field], str):
                raise AnnotationError(f'{where} "{field}" must be a string, got '
                                      f'{type(item[field]).__name__}')
        if not item["path"]:
            raise AnnotationError(f'{where} "path" is empty')
        expand = item.get("expand_wav")
        if expand is not None:
            if not isinstance(expand, list) or not all(isinstance(p, str) and p for p in expand):
                raise AnnotationError(f'{where} "expand_wav" must be a list of paths')
            item["expand_wav"] = [_resolve(base, p) for p in expand]
        item["path"] = _resolve(base, item["path"])
        items.append(item)
    return items


def load_clip(item: Mapping, sample_rate: int = SAMPLE_RATE, min_seconds: float = 1.0,
              max_seconds: float | None = 30.0, index: int | None = None) -> np.ndarray:
    """The waveform of one annotation item, as the original `__getitem__` builds it.

    First channel of each file; every `expand_wav` clip appended after
    `EXPAND_GAP_SECONDS` of zeros; zero-padded at the end to `min_seconds`; cut to
    `max_seconds` (None keeps everything, for callers that chunk long audio into 30 s
    windows). Files at another rate are resampled (the original requires 16 kHz).

    Args:
        index: the item's position in its annotation file, named in errors if given.

    Returns:
        float32 `[samples]`.

    Raises:
        AudioError: a file is missing, unreadable or empty.
    """
    try:
        audio = audio_lib.load_audio(item["path"], sample_rate)[0]
        gap = np.zeros(int(round(EXPAND_GAP_SECONDS * sample_rate)), np.float32)
        for extra in item.get("expand_wav") or ():
            audio = np.concatenate([audio, gap, audio_lib.load_audio(extra, sample_rate)[0]])
    except AudioError as e:
        if index is None:
            raise
        raise AudioError(f"annotation[{index}]: {e}") from e
    audio = audio_lib.fit_length(audio, max(len(audio), int(round(min_seconds * sample_rate))))
    if max_seconds is not None:
        audio = audio[:int(round(max_seconds * sample_rate))]
    return np.ascontiguousarray(audio, dtype=np.float32)


# ---------------------------------------------------------------- prompts


class PromptError(ValueError):
    """A prompt file or table that cannot be used; the message names the task."""


class UnknownTaskError(KeyError):
    """No prompt for a task; the message names the task, the table's file and known tasks."""

    def __str__(self) -> str:  # KeyError would print the message in quotes
        return str(self.args[0])


def split_prompt(prompt: str) -> tuple[str, str]:
    """(text before, text after) the one `<SpeechHere>` of a prompt.

    The two halves are tokenised separately, so the audio tokens sit between them.
    """
    count = prompt.count(SPEECH_PLACEHOLDER)
    if count != 1:
        raise ValueError(f"a prompt needs exactly one {SPEECH_PLACEHOLDER}, found {count} "
                         f"in {prompt!r}")
    before, after = prompt.split(SPEECH_PLACEHOLDER)
    return before, after


def _fill(prompt: str, q: str) -> str:
    # The original: p.format(q) if '{}' in p; replace() gives the same for its prompts
    # and does not trip over other braces.
    return PROMPT_TEMPLATE.format(prompt.replace("{}", q) if "{}" in prompt else prompt)


class PromptTable:
    """Train paraphrases and fixed test prompts per task, in the original's file format."""

    def __init__(self, train: Mapping[str, Sequence[str]] | None = None,
                 test: Mapping[str, str] | None = None, train_source: str = "<dict>",
                 test_source: str = "<dict>"):
        """
        Args:
            train: {task: [prompt, ...]}; test: {task: prompt}. Every prompt must hold
                exactly one `<SpeechHere>`.
            train_source, test_source: where the tables came from, for error messages.

        Raises:
            PromptError: a malformed entry or a prompt without `<SpeechHere>`.
        """
        self.train_source, self.test_source = train_source, test_source
        self._train: dict[str, tuple[str, ...]] = {}
        for task, prompts in dict(train or {}).items():
            if isinstance(prompts, str) or not isinstance(prompts, Sequence) or not prompts:
                raise PromptError(f"{train_source}: task {task!r} needs a non-empty list of "
                                  f"prompts, got {type(prompts).__name__}")
            self._train[task] = tuple(self._checked(p, task, train_source) for p in prompts)
        self._test = {task: self._checked(p, task, test_source)
                      for task, p in dict(test or {}).items()}

    @staticmethod
    def _checked(prompt, task: str, source: str) -> str:
        if not isinstance(prompt, str):
            raise PromptError(f"{source}: a prompt of task {task!r} is a "
                              f"{type(prompt).__name__}, not a string")
        if prompt.count(SPEECH_PLACEHOLDER) != 1:
            raise PromptError(f"{source}: a prompt of task {task!r} needs exactly one "
                              f"{SPEECH_PLACEHOLDER}: {prompt!r}")
        return prompt

    @classmethod
    def from_files(cls, train_path: str | os.PathLike | None = None,
                   test_path: str | os.PathLike | None = None) -> PromptTable:
        """Reads `train_prompt.json` and/or `test_prompt.json` as the original writes them."""
        tables = []
        for path in (train_path, test_path):
            if path is None:
                tables.append(None)
                continue
            try:
                with open(path, encoding="utf-8") as f:
                    doc = json.load(f)
            except (OSError, ValueError) as e:
                raise PromptError(f"cannot read prompt file {os.fspath(path)}: {e}") from e
            if not isinstance(doc, dict):
                raise PromptError(f"{os.fspath(path)}: expected {{task: prompt(s)}}, got "
                                  f"{type(doc).__name__}")
            tables.append(doc)
        return cls(tables[0], tables[1],
                   os.fspath(train_path) if train_path is not None else "<none>",
                   os.fspath(test_path) if test_path is not None else "<none>")

    @property
    def train_tasks(self) -> tuple[str, ...]:
        return tuple(self._train)

    @property
    def test_tasks(self) -> tuple[str, ...]:
        return tuple(self._test)

    def paraphrases(self, task: str) -> tuple[str, ...]:
        """The training prompts of `task`, as written (no template, `{}` unfilled)."""
        return self._lookup(self._train, task, "train", self.train_source)

    def _lookup(self, table: Mapping, task: str, kind: str, source: str):
        if task not in table:
            raise UnknownTaskError(f"no {kind} prompt for task {task!r} in {source}; known "
                                   f"tasks: {sorted(table)}")
        return table[task]

    def train(self, task: str, rng: np.random.Generator, q: str = "") -> str:
        """A random paraphrase for `task`, `{}` filled with `q`, inside `PROMPT_TEMPLATE`."""
        prompts = self._lookup(self._train, task, "train", self.train_source)
        return _fill(prompts[int(rng.integers(len(prompts)))], q)

    def test(self, task: str, q: str = "") -> str:
        """The fixed prompt for `task`, `{}` filled with `q`, inside `PROMPT_TEMPLATE`."""
        return _fill(self._lookup(self._test, task, "test", self.test_source), q)

    def write(self, train_path: str | os.PathLike, test_path: str | os.PathLike) -> None:
        """Writes both tables in the original's format (atomically)."""
        write_json_atomic(os.fspath(train_path), {t: list(p) for t, p in self._train.items()})
        write_json_atomic(os.fspath(test_path), dict(self._test))

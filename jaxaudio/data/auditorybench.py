"""AuditoryBench (AudioBERT's benchmark): its CSV files, the cloze encoding of the AudioBERT
dataloaders, and the span detector's IO tags.

The CSV variants read by `read_auditorybench_csv` (a row becomes an `AuditoryItem`):

    animal  animal, description, sentence                      (HEAD, wiki)
            ... + audio_path                                   (first commit: a Python list
                                                                literal of clips, or one path)
            animal, description | span, sentence, A, B, C, D, Answer   (multiple choice;
                                                                one train file says "span")
    pitch   sentence, answer, span1, span2                     (HEAD; wiki in another order)
            id_1, id_2, audio_filename_1, audio_filename_2, sentence, answer, span1, span2,
            avg_pitch_1, avg_pitch_2, difference_percentage, answer_pitch   (first commit)
            ... id_1_audio_path, id_2_audio_path               (the pitch trainer's columns)

Columns not named above (top_k_audio_path of the retrieval CSVs, the pitch values, ids)
are kept as strings in `AuditoryItem.extra`.

What `ClozeEncoder.encode` does is the released dataloaders' `QA_dataset.__getitem__`
(model/AudioBERT/{animal_sound,sound_pitch}/dataloader.py): the sentence is lowercased
("[mask]" back to "[MASK]"), the [MASK] is repeated once per word piece of the answer,
"[CLS]" + text + "[SEP]" is tokenized without special tokens, the labels are the same
string with the answer in place of the [MASK] (every position: [CLS], [SEP] and the 0 of
padding included, nothing is -100), and each span's position is the first token lying
wholly inside the span's first occurrence in that string (`find_span_position`). A span
not in the string falls back to position 0 for the first span and the last real token
([SEP]) for the second; a span found whose characters no token lies inside (it starts or
ends inside a word) gives position 0 in both slots, as the original's `None -> 0`.
For pitch, training reads one row per sentence whose two clips are the top-1 retrievals of
the two spans (the retrieval CSV's two rows per sentence are joined back by id_1/id_2):
here one item with spans [span1, span2] and one clip per span.

`detector_example` and `spans_from_tags` are the span detector's `encode_data`
(model/audio_span_detector/trainer.py) and `detect_target_word`
(model/clap_retrieval/utils.py).
"""

from __future__ import annotations

import ast
import csv
import dataclasses
import logging
import os
from collections.abc import Iterable, Mapping, Sequence

import numpy as np

_LOG = logging.getLogger(__name__)

TASKS = ("animal", "pitch")
PITCH_ANSWERS = ("higher", "lower")
MC_LETTERS = ("A", "B", "C", "D")
MASK = "[MASK]"
MAX_ANSWER_PIECES = 10  # the animal collate's max_target_len


class AuditoryBenchError(ValueError):
    """A benchmark file or item that cannot be used; the message names file, row, column."""


@dataclasses.dataclass
class AuditoryItem:
    """One cloze item.

    task: "animal" | "pitch". sentence: as in the file, with "[MASK]". answer: the animal
    (animal) or "higher" / "lower" (pitch). spans: the gold auditory spans (animal:
    [description], pitch: [span1, span2]; "" where the file has none). audio: one clip path
    per span, or [] when the file has none. options: {"A": .., "D": ..} of the multiple-choice
    files, else None; mc_answer: their letter. row: the 1-based line of the row in the file.
    source: the file. extra: every other column, as the string in the file.
    """

    task: str
    sentence: str
    answer: str
    spans: list[str]
    audio: list[str] = dataclasses.field(default_factory=list)
    options: dict[str, str] | None = None
    mc_answer: str | None = None
    row: int = 0
    source: str = ""
    extra: dict[str, str] = dataclasses.field(default_factory=dict)

    @property
    def where(self) -> str:
        return f"{self.source}:{self.row}" if self.source else f"row {self.row}"


# ---------------------------------------------------------------- CSV


def detect_task(columns: Iterable[str]) -> str | None:
    """"animal" (an "animal" column), "pitch" (span1, span2, answer) or None."""
    cols = set(columns)
    if "animal" in cols:
        return "animal"
    if {"span1", "span2"} <= cols or ("answer" in cols and "span1" in cols):
        return "pitch"
    return None


def _audio_list(value: str) -> list[str]:
    """An audio_path cell: a Python list literal of paths (the first commit) or one path."""
    value = value.strip()
    if not value:
        return []
    if value.startswith("["):
        paths = ast.literal_eval(value)
        if not isinstance(paths, (list, tuple)) or not all(isinstance(p, str) for p in paths):
            raise ValueError("expected a list of path strings")
        return [p for p in paths if p.strip()]
    return [value]


def _resolve(path: str, root: str) -> str:
    return os.path.normpath(path if os.path.isabs(path) else os.path.join(root, path))


def read_auditorybench_csv(path: str | os.PathLike, task: str | None = None, *,
                           audio_root: str | os.PathLike | None = None) -> list[AuditoryItem]:
    """Reads an AuditoryBench CSV in any of the released layouts (module docstring).

    Args:
        path: the CSV file.
        task: "animal" | "pitch", or None to tell it from the columns.
        audio_root: folder that relative audio paths are relative to (default: the CSV's
            folder). For animal rows the audio is the first path of `audio_path` (what the
            retrieval step reads); for pitch rows `audio_filename_1/2`, else
            `id_1_audio_path`/`id_2_audio_path`.

    Returns:
        one `AuditoryItem` per row, in file order.

    Raises:
        AuditoryBenchError: unreadable file, unknown task, a missing column, an empty
            sentence / answer, a sentence without [MASK], a pitch answer other than
            higher/lower, a multiple-choice key not among A-D, an unreadable audio cell;
            the message names the file, the row (1-based line) and the column.
    """
    path = os.fspath(path)
    if task is not None and task not in TASKS:
        raise AuditoryBenchError(f"{path}: task must be one of {TASKS} or None, got {task!r}")
    root = os.fspath(audio_root) if audio_root is not None else os.path.dirname(os.path.abspath(path))
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            reader = csv.reader(f)
            header = next(reader, None)
            if header is None:
                raise AuditoryBenchError(f"{path}: empty file (no header row)")
            header = [h.strip() for h in header]
            rows = []
            line = reader.line_num + 1
            for values in reader:
                rows.append((line, values))
                line = reader.line_num + 1
    except OSError as e:
        raise AuditoryBenchError(f"cannot read {path}: {e}") from e
    except csv.Error as e:
        raise AuditoryBenchError(f"{path}: not a valid CSV ({e})") from e

    found = detect_task(header)
    if task is None:
        if found is None:
            raise AuditoryBenchError(
                f"{path}: cannot tell the task from the columns {header} (animal needs 'animal', "
                "pitch needs 'span1' and 'span2'); pass task='animal' or 'pitch'")
        task = found
    cols = set(header)

    def need(name: str, alternatives: Sequence[str] = ()) -> str:
        for c in (name, *alternatives):
            if c in cols:
                return c
        alt = "".join(f" (or {a!r})" for a in alternatives)
        raise AuditoryBenchError(f"{path}:1: missing column {name!r}{alt} for the {task} task; "
                                 f"columns: {header}")

    if task == "animal":
        answer_col, span_cols = need("animal"), [need("description", ("span",))]
        audio_cols = ["audio_path"] if "audio_path" in cols else []
    else:
        answer_col, span_cols = need("answer"), [need("span1"), need("span2")]
        audio_cols = next(([a, b] for a, b in (("audio_filename_1", "audio_filename_2"),
                                               ("id_1_audio_path", "id_2_audio_path"))
                           if a in cols and b in cols), [])
    sentence_col = need("sentence")
    mc = [c for c in (*MC_LETTERS, "Answer") if c in cols]
    if mc:
        for c in (*MC_LETTERS, "Answer"):
            if c not in cols:
                raise AuditoryBenchError(f"{path}:1: missing column {c!r} (multiple-choice "
                                         f"columns: {list(MC_LETTERS)} and 'Answer'); columns: {header}")
    known = {answer_col, sentence_col, *span_cols, *audio_cols, *mc}

    items = []
    for line, values in rows:
        if not any(v.strip() for v in values):
            continue  # blank line
        where = f"{path}:{line}"
        if len(values) > len(header):
            raise AuditoryBenchError(f"{where}: {len(values)} fields, the header has {len(header)}")
        rec = dict(zip(header, values + [""] * (len(header) - len(values))))
        sentence = rec[sentence_col]
        if not sentence.strip():
            raise AuditoryBenchError(f"{where}: column {sentence_col!r}: empty sentence")
        if "[mask]" not in sentence.lower():
            raise AuditoryBenchError(f"{where}: column {sentence_col!r}: the sentence has no "
                                     f"[MASK]: {sentence!r}")
        answer = rec[answer_col].strip()
        if not answer:
            raise AuditoryBenchError(f"{where}: column {answer_col!r}: empty answer")
        if task == "pitch" and answer.lower() not in PITCH_ANSWERS:
            raise AuditoryBenchError(f"{where}: column {answer_col!r}: a pitch answer is one of "
                                     f"{PITCH_ANSWERS}, got {answer!r}")
        spans = [rec[c].strip() for c in span_cols]
        audio: list[str] = []
        try:
            if task == "animal" and audio_cols:
                audio = _audio_list(rec[audio_cols[0]])[:1]
            elif audio_cols:
                pair = [rec[c].strip() for c in audio_cols]
                if all(pair):
                    audio = pair
                elif any(pair):
                    empty = audio_cols[pair.index("")]
                    raise AuditoryBenchError(f"{where}: column {empty!r}: empty, but the other "
                                             "span has a clip")
        except (ValueError, SyntaxError) as e:
            if isinstance(e, AuditoryBenchError):
                raise
            raise AuditoryBenchError(f"{where}: column {audio_cols[0]!r}: cannot read the audio "
                                     f"paths ({e}): {rec[audio_cols[0]]!r}") from e
        audio = [_resolve(p, root) for p in audio]
        options = mc_answer = None
        if mc:
            options = {k: rec[k].strip() for k in MC_LETTERS}
            mc_answer = rec["Answer"].strip()
            if mc_answer not in MC_LETTERS:
                raise AuditoryBenchError(f"{where}: column 'Answer': expected one of "
                                         f"{list(MC_LETTERS)}, got {mc_answer!r}")
        extra = {k: v for k, v in rec.items() if k not in known}
        items.append(AuditoryItem(task=task, sentence=sentence, answer=answer, spans=spans,
                                  audio=audio, options=options, mc_answer=mc_answer, row=line,
                                  source=path, extra=extra))
    return items


# ---------------------------------------------------------------- cloze encoding


def find_span_position(span: str, offsets: Sequence[tuple[int, int]], query: str,
                       slot: int) -> int | None:
    """The original's `find_span_position`: the first token whose character offsets lie
    inside the first occurrence of `span` in `query`; None when the span occurs but no token
    lies inside it; when it does not occur, 0 for slot 0 and the last token for slot 1."""
    start = query.find(span)
    if start < 0:
        return 0 if slot == 0 else len(offsets) - 1
    end = start + len(span)
    for i, (a, b) in enumerate(offsets):
        if a >= start and b <= end:
            return i
    return None


class ClozeEncoder:
    """Items -> the AudioBERT inputs, as the released dataloaders build them (module docstring).

    `tokenizer` is a fast transformers BERT tokenizer (character offsets are needed), e.g.
    `AutoTokenizer.from_pretrained(folder)`. `fallbacks` / `spans_seen` count, over every
    `encode` call, the spans whose position is a fallback and all spans; `misaligned` the
    items whose filled-in sentence has another token count than the masked one (a [MASK]
    glued to letters: "[MASK]s make a trill." with "bird" gives "birds"; 1 row of the
    released animal dev and of test). Those keep the original's labels (the filled
    sentence's ids, padded with 0 or cut to the masked length), so they are misaligned as
    in the original; `strict_labels=True` makes them an error instead.
    """

    def __init__(self, tokenizer, max_len: int = 128, *, strict_labels: bool = False):
        if not getattr(tokenizer, "is_fast", False):
            raise TypeError("ClozeEncoder needs a fast (tokenizers-backed) tokenizer for the "
                            f"character offsets, got {type(tokenizer).__name__}")
        if max_len < 3:
            raise ValueError(f"max_len must be at least 3, got {max_len}")
        self.tokenizer = tokenizer
        self.max_len = int(max_len)
        self.strict_labels = bool(strict_labels)
        self.mask_id = tokenizer.mask_token_id
        self.fallbacks = 0
        self.spans_seen = 0
        self.misaligned = 0

    def answer_ids(self, answer: str) -> list[int]:
        return list(self.tokenizer.encode(answer, add_special_tokens=False))

    def encode(self, item: AuditoryItem) -> dict[str, np.ndarray]:
        """One item -> {input_ids, attention_mask, labels [max_len] int32, answer_mask
        [max_len] bool (the [MASK] positions), span_positions [S] int32, spans_found [S]
        bool, answer_ids [MAX_ANSWER_PIECES] int32 (the answer's word pieces, 0-padded: the
        original's `targets`), labels_aligned bool []} with S = len(item.spans). Padding
        is id 0 in input_ids and labels; attention_mask marks the real tokens.

        Raises:
            AuditoryBenchError: no [MASK], an answer without word pieces or with more than
                MAX_ANSWER_PIECES, a sentence longer than max_len tokens with [CLS] and
                [SEP]; with `strict_labels`, a filled-in sentence that does not tokenize to
                as many tokens as the masked one.
        """
        tok = self.tokenizer
        text = item.sentence.lower().replace("[mask]", MASK)
        if MASK not in text:
            raise AuditoryBenchError(f"{item.where}: the sentence has no [MASK]: {item.sentence!r}")
        target = self.answer_ids(item.answer)
        if not target or len(target) > MAX_ANSWER_PIECES:
            raise AuditoryBenchError(f"{item.where}: the answer {item.answer!r} has "
                                     f"{len(target)} word pieces (1 to {MAX_ANSWER_PIECES})")
        masked = text.replace(MASK, " ".join([tok.mask_token] * len(target))) if len(target) > 1 else text
        query = tok.cls_token + masked + tok.sep_token
        enc = tok(query, add_special_tokens=False, return_offsets_mapping=True)
        input_ids, offsets = list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]
        n = len(input_ids)
        if n > self.max_len:
            raise AuditoryBenchError(f"{item.where}: the sentence is {n} tokens with [CLS] and "
                                     f"[SEP], more than max_len={self.max_len}: {item.sentence!r}")
        labels = list(tok.encode(tok.cls_token + text.replace(MASK, item.answer) + tok.sep_token,
                                 add_special_tokens=False))
        aligned = len(labels) == n
        if not aligned:
            if self.strict_labels:
                raise AuditoryBenchError(
                    f"{item.where}: with the answer {item.answer!r} filled in the sentence is "
                    f"{len(labels)} tokens, with its [MASK]s {n}; is the [MASK] glued to a "
                    f"word? {item.sentence!r}")
            self.misaligned += 1
            labels = labels[:n] + [0] * max(0, n - len(labels))
        positions, found = [], []
        for slot, span in enumerate(item.spans):
            span = span.lower()
            pos = find_span_position(span, offsets, query, slot) if span else None
            ok = bool(span) and query.find(span) >= 0 and pos is not None
            positions.append(0 if pos is None else pos)
            found.append(ok)
        self.spans_seen += len(found)
        self.fallbacks += found.count(False)
        pad = self.max_len - n
        ids = np.asarray(input_ids + [0] * pad, np.int32)
        return {
            "input_ids": ids,
            "attention_mask": np.asarray([1] * n + [0] * pad, np.int32),
            "labels": np.asarray(labels + [0] * pad, np.int32),
            "answer_mask": (ids == self.mask_id) & (np.arange(self.max_len) < n),
            "span_positions": np.asarray(positions, np.int32),
            "spans_found": np.asarray(found, bool),
            "answer_ids": np.asarray(target + [0] * (MAX_ANSWER_PIECES - len(target)), np.int32),
            "labels_aligned": np.asarray(aligned),
        }

    def encode_all(self, items: Sequence[AuditoryItem]) -> dict[str, np.ndarray]:
        """`encode` of every item, stacked on a leading axis; says once (a warning with the
        count) how many spans took the original's fallback position."""
        if not items:
            raise ValueError("encode_all needs at least one item")
        encoded = [self.encode(it) for it in items]
        if len({len(e["span_positions"]) for e in encoded}) > 1:
            raise AuditoryBenchError("encode_all: items with different numbers of spans "
                                     "(animal and pitch items mixed?)")
        out = {k: np.stack([e[k] for e in encoded]) for k in encoded[0]}
        counts = count_fallbacks(out)
        if counts["fallbacks"]:
            sources = sorted({it.source for it in items if it.source})
            first = next(it for it, e in zip(items, encoded) if not e["spans_found"].all())
            _LOG.warning(
                "%d of %d spans (%s) were not found in their sentences%s (first: %s); they take "
                "the original's fallback positions (first span: 0 = [CLS], second: the last "
                "token, [SEP]; a span starting inside a word: 0)", counts["fallbacks"],
                counts["spans"], ", ".join(f"slot {i}: {c}" for i, c in enumerate(counts["by_slot"])),
                f" in {', '.join(sources)}" if sources else "", first.where)
        bad = [it.where for it, e in zip(items, encoded) if not e["labels_aligned"]]
        if bad:
            _LOG.warning("%d of %d items have a filled-in sentence of another length than the "
                         "masked one ([MASK] glued to a word: %s); their labels are the "
                         "original's, misaligned", len(bad), len(items), ", ".join(bad[:5]))
        return out

    def count_fallbacks(self, items: Sequence[AuditoryItem]) -> dict:
        """`count_fallbacks` of these items' encodings (the items are encoded)."""
        return count_fallbacks([self.encode(it) for it in items])


def count_fallbacks(encoded: Mapping[str, np.ndarray] | Sequence[Mapping[str, np.ndarray]]) -> dict:
    """How many spans took a fallback position, from `encode` / `encode_all` outputs:
    {"items", "spans", "fallbacks", "by_slot": [per span slot], "items_with_fallback"}."""
    if isinstance(encoded, Mapping):
        found = np.asarray(encoded["spans_found"], bool)
        found = found[None] if found.ndim == 1 else found
    else:
        found = np.stack([np.asarray(e["spans_found"], bool) for e in encoded]) if encoded else (
            np.zeros((0, 0), bool))
    missing = ~found
    return {"items": int(found.shape[0]), "spans": int(found.size),
            "fallbacks": int(missing.sum()), "by_slot": [int(c) for c in missing.sum(0)],
            "items_with_fallback": int(missing.any(-1).sum()) if found.size else 0}


def retrieval_queries(task: str, detected: Sequence[str]) -> list[str]:
    """The CLAP text queries of one sentence from its detected spans, as the retrieval
    preprocessing (model/clap_retrieval/processing.py) makes them: "<span> sound"; pitch
    asks once per span slot (its internal CSV has two rows per sentence): the second
    query uses the second span, else the first; no span: " sound"."""
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    first = f"{detected[0]} sound" if detected else " sound"
    if task == "animal":
        return [first]
    return [first, f"{detected[1]} sound" if len(detected) > 1 else first]


# ---------------------------------------------------------------- span detector


def detector_example(tokenizer, sentence: str, spans: Sequence[str | None],
                     max_len: int = 128) -> dict[str, np.ndarray]:
    """The detector's training example (the original `encode_data`): the sentence as it
    is, padded and truncated to `max_len` with [CLS]/[SEP]; label 1 on the first match of
    each gold span's word-piece ids, 0 everywhere else ([CLS], [SEP], padding included:
    all `max_len` positions count). Empty / None spans are skipped.

    Returns {input_ids, attention_mask, labels}, int32 `[max_len]` each (fixed keys and
    shapes, whatever the number of spans, so animal and pitch examples batch together);
    `detector_spans_found` says which spans were tagged.
    """
    ex, _ = _detector_example(tokenizer, sentence, spans, max_len)
    return ex


def detector_spans_found(tokenizer, sentence: str, spans: Sequence[str | None],
                         max_len: int = 128) -> list[bool]:
    """Per span, whether `detector_example` tags it (False: empty, or its pieces are not in
    the (truncated) sentence; the original skips such spans silently)."""
    return _detector_example(tokenizer, sentence, spans, max_len)[1]


def _detector_example(tokenizer, sentence, spans, max_len):
    enc = tokenizer(sentence, padding="max_length", truncation=True, max_length=max_len)
    ids = list(enc["input_ids"])
    labels = [0] * len(ids)
    found = []
    for span in spans:
        if span is None or not str(span).strip():
            found.append(False)
            continue
        piece_ids = tokenizer.convert_tokens_to_ids(tokenizer.tokenize(str(span)))
        k = len(piece_ids)
        hit = False
        for i in range(len(ids) - k + 1):
            if ids[i:i + k] == piece_ids:
                labels[i:i + k] = [1] * k
                hit = True
                break
        found.append(hit and k > 0)
    return {"input_ids": np.asarray(ids, np.int32),
            "attention_mask": np.asarray(enc["attention_mask"], np.int32),
            "labels": np.asarray(labels, np.int32)}, found


def spans_from_tags(tokenizer, input_ids: Sequence[int], tags: Sequence[int]) -> list[str]:
    """Detected spans from per-token tags (the original `detect_target_word`): runs of
    tag-1 tokens, "##" pieces glued to the word before them, words joined by spaces,
    " - " written "-". Every position counts, padding included, as in the original."""
    tokens = tokenizer.convert_ids_to_tokens([int(i) for i in input_ids])
    out, words, word = [], [], ""

    def flush():
        nonlocal words, word
        if word:
            words.append(word)
        if words:
            out.append(" ".join(words).strip().replace(" - ", "-"))
        words, word = [], ""

    for token, tag in zip(tokens, tags):
        if int(tag) == 1:
            if token.startswith("##"):
                word += token[2:]
            else:
                if word:
                    words.append(word)
                word = token
        else:
            flush()
    flush()
    return out

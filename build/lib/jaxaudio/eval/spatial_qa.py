"""BAT's SpatialSoundQA metrics, computed from the model's answer text.

The answer grammar is the one of `jaxaudio.data.spatial_qa` (see its docstring). Per letter:

    A, C  label F1, micro over items, from the parsed label set. The paper's mAP needs a
          score per class; BAT gets one by embedding the answer text with an OpenAI model,
          which cannot be reproduced offline, so mAP from text is not reported here.
    B, D  direction accuracy: the octant (left/right x front/behind x above/below, chance
          1/8) must match exactly; DER: the share of answers whose distance is off by more
          than 0.5 m (one BAT bin) or missing.
    E     accuracy of the yes/no types (MIXUP_DIRECTION -> "E/dir_acc", MIXUP_DISTANCE_BOTH
          -> "E/dist_acc", their mean "E/avg" as in the paper), and of the non-binary ones
          with the same rules as B/D ("E/nb_dir_acc": octant, "E/nb_dist_acc": within 0.5 m)
          and, for MIXUP_NONBINARY_SOURCE, "E/nb_src_acc": the parsed label set must equal
          X's exactly (an accuracy, not F1: the question asks for one sound).

Unparseable answers count as wrong; nothing here raises on bad text.
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence

import numpy as np

from jaxaudio.data import spatial_qa as sqa

_WORD_AXIS = {"left": 0, "right": 0, "front": 1, "behind": 1, "back": 1, "above": 2,
              "below": 2}
_SYNONYM = {"back": "behind"}
_DIRECTION_RE = re.compile(r"\b(" + "|".join(_WORD_AXIS) + r")\b")
_DISTANCE_RE = re.compile(r"(\d+(?:\.\d+)?)\s*(?:m|meters?|metres?)\b")
_YES_NO_RE = re.compile(r"\b(yes|no)\b")
DISTANCE_TOLERANCE_M = 0.5


def _direction(text: str) -> tuple | None:
    """The octant named in `text`; an axis named twice or never is None."""
    found = [set(), set(), set()]
    for word in _DIRECTION_RE.findall(text):
        found[_WORD_AXIS[word]].add(_SYNONYM.get(word, word))
    axes = tuple(next(iter(f)) if len(f) == 1 else None for f in found)
    return None if axes == (None, None, None) else axes


def _distance(text: str) -> float | None:
    match = _DISTANCE_RE.search(text)
    return float(match.group(1)) if match else None


def parse_answer(question_type: str, text) -> dict:
    """Reads an answer in the grammar of `data.spatial_qa` back to its ground-truth form.

    Matching is case-insensitive and lenient about spacing and extra words; "back" is read
    as "behind". Labels are split on ";" only (AudioSet labels contain commas).

    Returns:
        the keys of `data.spatial_qa.targets` for the type ("labels", "direction",
        "distance", "yes"), each None where the text does not give it. An unknown
        question_type gives {}.
    """
    text = text.lower() if isinstance(text, str) else ""
    if question_type in sqa.LABEL_TYPES:
        labels = frozenset(filter(None, (sqa.normalize_label(p) for p in text.split(";"))))
        return {"labels": labels or None}
    if question_type in (sqa.DOA, sqa.MIXUP_SINGLE_DOA):
        return {"direction": _direction(text), "distance": _distance(text)}
    if question_type in sqa.BINARY_TYPES:
        match = _YES_NO_RE.search(text)
        return {"yes": None if match is None else match.group(1) == "yes"}
    if question_type == sqa.MIXUP_NONBINARY_DIRECTION:
        return {"direction": _direction(text)}
    if question_type == sqa.MIXUP_NONBINARY_DISTANCE:
        return {"distance": _distance(text)}
    return {}


def ground_truth(item: Mapping) -> dict | None:
    """`data.spatial_qa.targets` of a generated item; for an item without the ground-truth
    fields (e.g. an official one) the parsed reference answer; None if neither works."""
    try:
        return sqa.targets(item)
    except (KeyError, ValueError, TypeError):
        truth = parse_answer(item.get("question_type"), item.get("answer"))
        return truth if truth and all(v is not None for v in truth.values()) else None


def _predictions(items: Sequence[Mapping], predictions) -> list:
    if isinstance(predictions, Mapping):
        return [predictions.get(item.get("question_id")) for item in items]
    predictions = list(predictions)
    if len(predictions) != len(items):
        raise ValueError(f"{len(predictions)} predictions for {len(items)} items")
    return predictions


def _close(pred, true) -> bool:
    return pred is not None and abs(pred - true) <= DISTANCE_TOLERANCE_M + 1e-9


def score(items: Sequence[Mapping], predictions) -> dict[str, float]:
    """Metrics of predicted answer texts against the items' ground truth.

    Args:
        items: QA items (`data.spatial_qa` ones, or any with parseable answers).
        predictions: answer texts aligned with `items`, or question_id -> text (a missing
            one is wrong).

    Returns:
        fractions in [0, 1]: "A/f1", "A/precision", "A/recall" (and C), "B/dir_acc",
        "B/der" (and D), "E/dir_acc", "E/dist_acc", "E/avg", "E/nb_dir_acc",
        "E/nb_dist_acc", "E/nb_src_acc", only for the types present; per letter "<L>/n"
        items and "<L>/unparsed" (share of answers that gave nothing); "skipped": items of
        unknown type or without a usable ground truth.
    """
    counts = defaultdict(Counter)  # letter -> tp, fp, fn, n, unparsed
    hits = defaultdict(list)  # metric -> [bool]
    skipped = 0
    for item, text in zip(items, _predictions(items, predictions)):
        qtype = item.get("question_type")
        truth = ground_truth(item) if qtype in sqa.TYPE_LETTER else None
        if truth is None:
            skipped += 1
            continue
        letter = sqa.TYPE_LETTER[qtype]
        pred = parse_answer(qtype, text)
        counts[letter]["n"] += 1
        counts[letter]["unparsed"] += all(v is None for v in pred.values())
        if qtype == sqa.MIXUP_NONBINARY_SOURCE:
            hits["E/nb_src_acc"].append(pred["labels"] == truth["labels"])
        elif "labels" in truth:
            got = pred["labels"] or frozenset()
            counts[letter]["tp"] += len(got & truth["labels"])
            counts[letter]["fp"] += len(got - truth["labels"])
            counts[letter]["fn"] += len(truth["labels"] - got)
        elif qtype in (sqa.DOA, sqa.MIXUP_SINGLE_DOA):
            hits[f"{letter}/dir_acc"].append(pred["direction"] == truth["direction"])
            hits[f"{letter}/der"].append(not _close(pred["distance"], truth["distance"]))
        elif qtype == sqa.MIXUP_DIRECTION:
            hits["E/dir_acc"].append(pred["yes"] == truth["yes"])
        elif qtype == sqa.MIXUP_DISTANCE_BOTH:
            hits["E/dist_acc"].append(pred["yes"] == truth["yes"])
        elif qtype == sqa.MIXUP_NONBINARY_DIRECTION:
            hits["E/nb_dir_acc"].append(pred["direction"] == truth["direction"])
        else:
            hits["E/nb_dist_acc"].append(_close(pred["distance"], truth["distance"]))
    metrics = {key: float(np.mean(v)) for key, v in hits.items()}
    for letter, c in counts.items():
        metrics[f"{letter}/n"] = c["n"]
        metrics[f"{letter}/unparsed"] = c["unparsed"] / c["n"]
        if letter in ("A", "C"):
            metrics[f"{letter}/precision"] = c["tp"] / max(1, c["tp"] + c["fp"])
            metrics[f"{letter}/recall"] = c["tp"] / max(1, c["tp"] + c["fn"])
            metrics[f"{letter}/f1"] = 2 * c["tp"] / max(1, 2 * c["tp"] + c["fp"] + c["fn"])
    _add_e_average(metrics)
    metrics["skipped"] = skipped
    return metrics


def _add_e_average(metrics: dict) -> None:
    if "E/dir_acc" in metrics and "E/dist_acc" in metrics:
        metrics["E/avg"] = (metrics["E/dir_acc"] + metrics["E/dist_acc"]) / 2


def _distance_chance(truths: list[float]) -> tuple[float, float]:
    """(uniform, majority) accuracy within 0.5 m: uniform over the 0.5 m grid from 0.5 m to
    the largest true distance, majority = always the most frequent true distance."""
    true = np.asarray(truths)
    grid = np.arange(1, int(round(2 * true.max())) + 1) / 2
    uniform = np.mean((np.abs(grid[None, :] - true[:, None]) <= DISTANCE_TOLERANCE_M).mean(1))
    mode = Counter(truths).most_common(1)[0][0]
    return float(uniform), float(np.mean(np.abs(true - mode) <= DISTANCE_TOLERANCE_M))


def _majority(values: list) -> float:
    return Counter(values).most_common(1)[0][1] / len(values)


def chance_metrics(items: Sequence[Mapping]) -> dict[str, dict[str, float]]:
    """Baselines from the eval items' ground truth, with `score`'s metric names.

    Returns:
        {"uniform": ..., "majority": ...}. Uniform guessing: a random label set of the true
        size drawn from the V labels seen in A and C (expected micro-F1 taken as
        sum(k^2 / V) / sum(k), the ratio of expectations), one random label of those for
        MIXUP_NONBINARY_SOURCE (1 / V; V from its own items if there are no A or C items),
        a random octant (1/8), a random distance on the 0.5 m grid up to the largest true
        one, a coin flip. Majority: the most frequent single label, octant, distance or
        yes/no of the type.
    """
    truths = defaultdict(list)
    for item in items:
        qtype = item.get("question_type")
        truth = ground_truth(item) if qtype in sqa.TYPE_LETTER else None
        if truth is not None:
            truths[qtype].append(truth)
    uniform, majority = {}, {}
    vocabulary = set()
    for qtype in (sqa.CLASSIFICATION, sqa.MIXUP_SINGLE_CLASSIFICATION):
        vocabulary.update(*(t["labels"] for t in truths.get(qtype, ())))
    for qtype, ts in truths.items():
        letter = sqa.TYPE_LETTER[qtype]
        if qtype == sqa.MIXUP_NONBINARY_SOURCE:
            seen = vocabulary or set().union(*(t["labels"] for t in ts))
            uniform["E/nb_src_acc"] = 1 / len(seen)
            majority["E/nb_src_acc"] = _majority([t["labels"] for t in ts])
            continue
        if "labels" in ts[0]:
            sizes = np.array([len(t["labels"]) for t in ts])
            uniform[f"{letter}/f1"] = float(np.sum(sizes**2 / len(vocabulary)) / sizes.sum())
            # Always answering the most frequent label: one hit per item holding it.
            top = Counter(label for t in ts for label in t["labels"]).most_common(1)[0][1]
            majority[f"{letter}/f1"] = float(2 * top / (len(ts) + sizes.sum()))
            continue
        if qtype in sqa.BINARY_TYPES:
            key = "E/dir_acc" if qtype == sqa.MIXUP_DIRECTION else "E/dist_acc"
            uniform[key], majority[key] = 0.5, _majority([t["yes"] for t in ts])
            continue
        single = qtype in (sqa.DOA, sqa.MIXUP_SINGLE_DOA)
        if "direction" in ts[0]:
            key = f"{letter}/dir_acc" if single else "E/nb_dir_acc"
            uniform[key], majority[key] = 1 / 8, _majority([t["direction"] for t in ts])
        if "distance" in ts[0]:
            acc_u, acc_m = _distance_chance([t["distance"] for t in ts])
            if single:
                uniform[f"{letter}/der"], majority[f"{letter}/der"] = 1 - acc_u, 1 - acc_m
            else:
                uniform["E/nb_dist_acc"], majority["E/nb_dist_acc"] = acc_u, acc_m
    _add_e_average(uniform)
    _add_e_average(majority)
    return {"uniform": uniform, "majority": majority}


# (header, metric keys joined by " | ") of the paper's table, plus the non-binary E types.
TABLE_COLUMNS = (
    ("F1 A | C", ("A/f1", "C/f1")),
    ("DoA acc B | D", ("B/dir_acc", "D/dir_acc")),
    ("DER B | D", ("B/der", "D/der")),
    ("E-dir", ("E/dir_acc",)),
    ("E-dist", ("E/dist_acc",)),
    ("E-avg", ("E/avg",)),
    ("E-nb dir | dist | src", ("E/nb_dir_acc", "E/nb_dist_acc", "E/nb_src_acc")),
)


def format_table(metrics: Mapping[str, float], chance: Mapping, model_name: str = "model"
                 ) -> str:
    """The paper-style table in percent: one row for the model, one per chance baseline.

    Args:
        metrics: `score`'s result.
        chance: `chance_metrics`'s result, or one flat baseline dict.
    """
    baselines = chance if all(isinstance(v, Mapping) for v in chance.values()) else {
        "": chance}
    rows = [(model_name, metrics)] + [(f"chance ({name})" if name else "chance", m)
                                      for name, m in baselines.items()]

    def cell(m, keys):
        return " | ".join("-" if m.get(k) is None else f"{100 * m[k]:.2f}" for k in keys)

    table = [["", *(header for header, _ in TABLE_COLUMNS)]]
    table += [[name, *(cell(m, keys) for _, keys in TABLE_COLUMNS)] for name, m in rows]
    widths = [max(len(r[i]) for r in table) for i in range(len(table[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in table)

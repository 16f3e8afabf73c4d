"""AudioBERT's metrics (HJ-Ok/AudioBERT): the span detector's F1, span-level P/R/F1, and the
accuracy of the two AuditoryBench cloze tasks.

- `detector_weighted_f1`: what the detector's `evaluate` reports,
  sklearn `f1_score(labels, preds, average="weighted")` on the `[N, L]` arrays of 0/1 tags
  (L = 128 positions, padding included). sklearn reads an `[N, L > 1]` 0/1 array as
  multilabel-indicator: every *position* is a label. Per position: F1 of the positive class
  `2 tp / (2 tp + fp + fn)` (0 where that is 0 / 0: sklearn's default `zero_division="warn"`
  sets it to 0 and warns); the score is their average weighted by each position's number of
  true 1s, so positions without a true 1 do not count. If no position has a true 1 at all,
  sklearn falls back to the unweighted mean, which is then 0. With `L == 1` sklearn sees a
  binary vector instead and weights the F1 of class 0 and of class 1 by their supports; that
  is reproduced too. It is a token-position score, not a span score: see `span_prf`.
- `span_prf`: spans as strings, exact match (after an optional `normalize`), matched as
  multisets within each sentence, micro-averaged over the corpus; a ratio with nothing to
  count (no predicted or no gold span anywhere) is 0.
- `animal_accuracy`: an item is right when the argmax over the whole vocabulary equals the
  answer word piece at *every* answer position ([MASK]); an item without answer positions is
  wrong (the original compares an empty prediction with the answer's word pieces).
- `pitch_accuracy`: argmax between the logits of "lower" and "higher" only at the [MASK];
  a tie goes to "lower" (the original's `argmax` over `[lower, higher]`).
- `majority_baseline`: the accuracy of always answering the most frequent answer.

Everything is numpy; a wrong shape, dtype or value raises a one-line `ValueError` naming the
argument.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Hashable, Sequence
from typing import Any

import numpy as np


def _binary_tags(x, name: str) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim != 2 or x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"{name} must be a non-empty [N, L] array of 0/1 tags, got shape {x.shape}")
    if x.dtype != bool and not (np.issubdtype(x.dtype, np.integer) or np.issubdtype(x.dtype, np.floating)):
        raise ValueError(f"{name} must hold 0/1 tags, got dtype {x.dtype}")
    if not np.all((x == 0) | (x == 1)):
        bad = np.unique(x[(x != 0) & (x != 1)])[:5]
        raise ValueError(f"{name} must hold only 0 and 1, found {bad.tolist()}")
    return x.astype(bool)


def _weighted_f1(tp: np.ndarray, fp: np.ndarray, fn: np.ndarray) -> float:
    """sklearn's weighted F1 from per-label counts (float64, its order of operations)."""
    true_sum = (tp + fn).astype(np.float64)
    pred_sum = (tp + fp).astype(np.float64)
    denom = true_sum + pred_sum
    f1 = np.where(denom == 0, 0.0, 2.0 * tp / np.where(denom == 0, 1.0, denom))
    if true_sum.sum() == 0:  # all weights zero: sklearn averages unweighted
        return float(np.average(f1))
    return float(np.average(f1, weights=true_sum))


def detector_weighted_f1(labels, preds) -> float:
    """sklearn `f1_score(labels, preds, average="weighted")` for `[N, L]` 0/1 tags.

    Args:
        labels: `[N, L]` gold tags (0/1, bool or integral floats).
        preds: `[N, L]` predicted tags (the argmax per token).

    Returns:
        The weighted F1 in [0, 1] (see the module docstring for what sklearn computes).
    """
    y = _binary_tags(labels, "labels")
    p = _binary_tags(preds, "preds")
    if p.shape != y.shape:
        raise ValueError(f"preds has shape {p.shape} but labels has shape {y.shape}")
    if y.shape[1] == 1:
        # A column vector is a binary target for sklearn: every class present in either
        # array is a label, weighted by its true count.
        y, p = y[:, 0], p[:, 0]
        present = [c for c in (False, True) if np.any(y == c) or np.any(p == c)]
        tp = np.array([np.sum((y == c) & (p == c)) for c in present])
        fp = np.array([np.sum((y != c) & (p == c)) for c in present])
        fn = np.array([np.sum((y == c) & (p != c)) for c in present])
        return _weighted_f1(tp, fp, fn)
    tp = np.sum(y & p, axis=0)
    fp = np.sum(~y & p, axis=0)
    fn = np.sum(y & ~p, axis=0)
    return _weighted_f1(tp, fp, fn)


def _span_lists(x, name: str) -> list[list[str]]:
    if isinstance(x, (str, bytes)) or not isinstance(x, Sequence):
        raise ValueError(f"{name} must be a list (one entry per sentence) of lists of span strings, "
                         f"got {type(x).__name__}")
    out = []
    for i, spans in enumerate(x):
        if isinstance(spans, str) or not isinstance(spans, (Sequence, np.ndarray)):
            raise ValueError(f"{name}[{i}] must be a list of span strings, got {type(spans).__name__}")
        for s in spans:
            if not isinstance(s, str):
                raise ValueError(f"{name}[{i}] holds a {type(s).__name__}, not a span string")
        out.append(list(spans))
    return out


def span_prf(gold: Sequence[Sequence[str]], pred: Sequence[Sequence[str]], *,
             normalize: Callable[[str], str] | None = None) -> dict[str, float]:
    """Span-level exact-match precision, recall and F1, micro-averaged over sentences.

    Within a sentence, spans match as multisets: a gold span found twice and predicted once
    counts one match. `normalize` (e.g. `str.lower`) is applied to every span first.

    Args:
        gold: per sentence, its gold span strings.
        pred: per sentence, the predicted spans (`auditorybench.spans_from_tags`).

    Returns:
        `{"precision", "recall", "f1"}`; a ratio with a zero denominator is 0.
    """
    gold_spans, pred_spans = _span_lists(gold, "gold"), _span_lists(pred, "pred")
    if len(gold_spans) != len(pred_spans):
        raise ValueError(f"pred has {len(pred_spans)} sentences but gold has {len(gold_spans)}")
    norm = normalize or (lambda s: s)
    matched = n_gold = n_pred = 0
    for g, p in zip(gold_spans, pred_spans):
        g_count, p_count = Counter(map(norm, g)), Counter(map(norm, p))
        matched += sum((g_count & p_count).values())
        n_gold += len(g)
        n_pred += len(p)
    precision = matched / n_pred if n_pred else 0.0
    recall = matched / n_gold if n_gold else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1}


def _predicted_ids(logits_or_ids, name: str) -> np.ndarray:
    x = np.asarray(logits_or_ids)
    if x.ndim == 3:
        if x.shape[-1] == 0:
            raise ValueError(f"{name} as logits must be [N, L, vocab] with vocab > 0, got shape {x.shape}")
        return np.argmax(x, axis=-1)  # first maximum on ties, as torch
    if x.ndim == 2:
        if x.size and not np.issubdtype(x.dtype, np.integer):
            raise ValueError(f"{name} as predicted ids must hold integers, got dtype {x.dtype}")
        return x
    raise ValueError(f"{name} must be logits [N, L, vocab] or predicted ids [N, L], got shape {x.shape}")


def animal_accuracy(logits, labels, answer_mask) -> float:
    """Fraction of items whose every answer word piece is predicted (argmax over the vocabulary).

    Args:
        logits: `[N, L, vocab]` MLM logits, or the predicted ids `[N, L]`.
        labels: `[N, L]` ids of the filled-in sentence (`ClozeEncoder`'s `labels`).
        answer_mask: `[N, L]` bool, the answer positions (the [MASK]s).
    """
    pred = _predicted_ids(logits, "logits")
    labels = np.asarray(labels)
    if labels.shape != pred.shape[:2] or labels.ndim != 2:
        raise ValueError(f"labels must have shape {pred.shape[:2]} ([N, L] like logits), got {labels.shape}")
    mask = np.asarray(answer_mask)
    if mask.shape != labels.shape:
        raise ValueError(f"answer_mask must have shape {labels.shape} ([N, L]), got {mask.shape}")
    if mask.dtype != bool:
        if mask.size and not np.all((mask == 0) | (mask == 1)):
            raise ValueError("answer_mask must be bool or 0/1")
        mask = mask.astype(bool)
    if len(labels) == 0:
        raise ValueError("labels has no items (N = 0)")
    right = np.all((pred == labels) | ~mask, axis=1) & np.any(mask, axis=1)
    return float(np.mean(right))


def _answer_ids(answers, n: int, higher_id: int, lower_id: int) -> np.ndarray:
    arr = np.asarray(answers)
    if arr.shape != (n,):
        raise ValueError(f"answers must have shape ({n},) (one per item), got {arr.shape}")
    if arr.dtype.kind in "USO":
        words = {"higher": higher_id, "lower": lower_id}
        bad = sorted({str(a) for a in arr if str(a).strip().lower() not in words})
        if bad:
            raise ValueError(f"answers must be 'higher' or 'lower' (or their token ids), found {bad[:5]}")
        return np.array([words[str(a).strip().lower()] for a in arr], np.int64)
    if not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"answers must be token ids or the words 'higher'/'lower', got dtype {arr.dtype}")
    bad = sorted(set(arr.tolist()) - {higher_id, lower_id})
    if bad:
        raise ValueError(f"answers holds ids {bad[:5]} that are neither higher_id={higher_id} "
                         f"nor lower_id={lower_id}")
    return arr.astype(np.int64)


def pitch_accuracy(logits, mask_positions, higher_id: int, lower_id: int, answers) -> float:
    """Fraction of items where the larger of the "higher"/"lower" logits at the [MASK] is the answer.

    Args:
        logits: `[N, L, vocab]` MLM logits.
        mask_positions: `[N]` ints, the [MASK]'s token index in each item.
        higher_id, lower_id: the vocabulary ids of "higher" and "lower".
        answers: `[N]` answer token ids, or the words "higher"/"lower".
    """
    x = np.asarray(logits)
    if x.ndim != 3 or x.shape[0] == 0:
        raise ValueError(f"logits must be a non-empty [N, L, vocab] array, got shape {x.shape}")
    n, length, vocab = x.shape
    for name, i in (("higher_id", higher_id), ("lower_id", lower_id)):
        if not isinstance(i, (int, np.integer)) or not 0 <= i < vocab:
            raise ValueError(f"{name} must be a token id in [0, {vocab}), got {i!r}")
    if higher_id == lower_id:
        raise ValueError(f"higher_id and lower_id are the same id ({higher_id})")
    pos = np.asarray(mask_positions)
    if pos.shape != (n,):
        raise ValueError(f"mask_positions must have shape ({n},) (one per item), got {pos.shape}")
    if not np.issubdtype(pos.dtype, np.integer):
        raise ValueError(f"mask_positions must hold integers, got dtype {pos.dtype}")
    if pos.min() < 0 or pos.max() >= length:
        raise ValueError(f"mask_positions must lie in [0, {length}), got values in [{pos.min()}, {pos.max()}]")
    gold = _answer_ids(answers, n, int(higher_id), int(lower_id))
    at_mask = x[np.arange(n), pos]  # [N, vocab]
    pair = at_mask[:, [lower_id, higher_id]]  # the original's order: a tie picks "lower"
    pred = np.where(np.argmax(pair, axis=-1) == 0, lower_id, higher_id)
    return float(np.mean(pred == gold))


def _hashable(a: Any, i: int, name: str) -> Hashable:
    if isinstance(a, np.ndarray):
        return tuple(a.tolist())
    if isinstance(a, list):
        return tuple(a)
    try:
        hash(a)
    except TypeError:
        raise ValueError(f"{name}[{i}] is a {type(a).__name__}, which cannot be compared as an answer") from None
    return a


def majority_baseline(answers: Sequence, train_answers: Sequence | None = None) -> dict[str, Any]:
    """Accuracy of always answering the most frequent answer.

    Args:
        answers: the answers scored (strings, ids, or sequences of word-piece ids).
        train_answers: where the majority answer is taken from (e.g. the train split);
            None: from `answers` itself. Ties: the answer seen first.

    Returns:
        `{"answer": the majority answer, "accuracy": its share of answers}`.
    """
    if isinstance(answers, (str, bytes)) or len(answers) == 0:
        raise ValueError("answers must be a non-empty sequence of answers")
    scored = [_hashable(a, i, "answers") for i, a in enumerate(answers)]
    if train_answers is None:
        source = scored
    else:
        if isinstance(train_answers, (str, bytes)) or len(train_answers) == 0:
            raise ValueError("train_answers must be a non-empty sequence of answers (or None)")
        source = [_hashable(a, i, "train_answers") for i, a in enumerate(train_answers)]
    majority = Counter(source).most_common(1)[0][0]
    return {"answer": majority, "accuracy": sum(a == majority for a in scored) / len(scored)}

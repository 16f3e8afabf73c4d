"""Audio-text retrieval metrics of CLAP (LAION's `get_metrics` / `evaluate_clotho_audiocaps`).

Similarity is the dot product of L2-normalised embeddings (cosine; the logit scale of
`get_metrics` does not change a ranking). A query's rank is the 0-based position of its
correct item in the candidates sorted by decreasing similarity; equal similarities keep
index order (a stable sort; torch's `argsort` leaves ties in no defined order).

- text -> audio: every caption is a query over the `n` clips; R@k = fraction of captions
  whose clip ranks < k, mAP@10 = mean of `1 / (rank + 1)` if rank < 10 else 0. With several
  captions per clip (Clotho: five) every caption counts once, as LAION's "do 5 times and
  average".
- audio -> text: every clip that has a caption is a query over all `m` captions. R@k uses
  the best rank among the clip's captions; mAP@10 = sum over the clip's captions ranked
  < 10, in rank order, of `i / (rank + 1)` (i = 1, 2, ...), divided by the clip's number of
  captions, i.e. average precision cut at 10. With one caption per clip both reduce to the
  text -> audio formulas. (LAION's docstring and X. Mei's reference code sort the ranks
  before numbering them; LAION's code numbers them in caption order, which can exceed 1.)
- `chance_<name>`: the exact expectation for random embeddings (a uniformly random
  ranking): text -> audio R@k = min(k, n) / n, mAP@10 = sum_{r < min(10, n)} 1 / (r + 1) / n;
  audio -> text with c captions among m: R@k = 1 - C(m - c, k) / C(m, k),
  mAP@10 = sum_{p=1}^{min(10, m)} (1 + (p - 1)(c - 1) / (m - 1)) / p / m, averaged over clips.
"""

from __future__ import annotations

import numpy as np

KS = (1, 5, 10)
MAP_CUTOFF = 10
_CHUNK = 1024  # rows of the similarity matrix ranked at a time


def _embeddings(x, name: str) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"{name} must be a non-empty [count, dim] array, got shape {x.shape}")
    if not np.all(np.isfinite(x)):
        raise ValueError(f"{name} contains NaN or Inf")
    norm = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.maximum(norm, 1e-12)


def _indices(x, name: str, length: int, bound: int, bound_name: str) -> np.ndarray:
    x = np.asarray(x)
    if x.shape != (length,):
        raise ValueError(f"{name} must have shape ({length},), got {x.shape}")
    if length and not np.issubdtype(x.dtype, np.integer):
        raise ValueError(f"{name} must hold integers, got dtype {x.dtype}")
    if length and (x.min() < 0 or x.max() >= bound):
        raise ValueError(f"{name} must lie in [0, {bound}) ({bound_name}), got values in "
                         f"[{x.min()}, {x.max()}]")
    return x.astype(np.int64)


def _same_dim(a: np.ndarray, b: np.ndarray, a_name: str, b_name: str) -> None:
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"{b_name} has dim {b.shape[1]} but {a_name} has dim {a.shape[1]}")


def _ranks(sim: np.ndarray, target: np.ndarray) -> np.ndarray:
    """0-based rank of `target[i]` in row `i` of `sim` `[q, c]`, ties in index order."""
    rows = np.arange(len(sim))
    correct = sim[rows, target][:, None]
    cols = np.arange(sim.shape[1])[None, :]
    ahead = (sim > correct) | ((sim == correct) & (cols < target[:, None]))
    return ahead.sum(axis=1)


def _rank_queries(queries: np.ndarray, keys: np.ndarray, target: np.ndarray) -> np.ndarray:
    out = np.empty(len(queries), dtype=np.int64)
    for s in range(0, len(queries), _CHUNK):
        out[s:s + _CHUNK] = _ranks(queries[s:s + _CHUNK] @ keys.T, target[s:s + _CHUNK])
    return out


def _summary(prefix: str, best_rank: np.ndarray, ap10: np.ndarray) -> dict[str, float]:
    out = {f"{prefix}_R@{k}": float(np.mean(best_rank < k)) for k in KS}
    out[f"{prefix}_mAP@{MAP_CUTOFF}"] = float(np.mean(ap10))
    return out


def _chance_a2t(counts: np.ndarray, m: int) -> dict[str, float]:
    """Expected audio -> text metrics of a random ranking of `m` captions, averaged over
    clips with `counts` captions each."""
    out = {}
    for k in KS:
        # P(none of the c captions in the top k) = prod_{i<k} (m - c - i) / (m - i).
        i = np.arange(min(k, m))
        miss = np.prod(np.clip((m - counts[:, None] - i) / (m - i), 0.0, None), axis=1)
        out[f"chance_a2t_R@{k}"] = float(np.mean(1.0 - miss))
    p = np.arange(1, min(MAP_CUTOFF, m) + 1, dtype=np.float64)
    share = (counts[:, None] - 1) / (m - 1) if m > 1 else np.zeros((len(counts), 1))
    ap = np.sum((1.0 + (p - 1) * share) / p, axis=1) / m
    out[f"chance_a2t_mAP@{MAP_CUTOFF}"] = float(np.mean(ap))
    return out


def retrieval_metrics(audio_embeds, text_embeds, text_to_audio) -> dict[str, float]:
    """Text -> audio and audio -> text R@1/5/10 and mAP@10, with their chance values.

    Args:
        audio_embeds: `[n, d]` clip embeddings (normalised here).
        text_embeds: `[m, d]` caption embeddings (normalised here).
        text_to_audio: `[m]` ints, the clip each caption describes. Clips without a caption
            are still candidates for text -> audio; they are no audio -> text query.

    Returns:
        `t2a_R@1`, `t2a_R@5`, `t2a_R@10`, `t2a_mAP@10`, the same four with `a2t_`, and each
        again prefixed `chance_` (see the module docstring).

    Raises:
        ValueError: an argument has the wrong shape, dtype or range (the message names it).
    """
    audio = _embeddings(audio_embeds, "audio_embeds")
    text = _embeddings(text_embeds, "text_embeds")
    _same_dim(audio, text, "audio_embeds", "text_embeds")
    n, m = len(audio), len(text)
    t2a = _indices(text_to_audio, "text_to_audio", m, n, "the number of audio_embeds")

    t2a_rank = _rank_queries(text, audio, t2a)
    metrics = _summary("t2a", t2a_rank, np.where(t2a_rank < MAP_CUTOFF, 1.0 / (t2a_rank + 1), 0.0))

    # Audio -> text: the rank of every caption within its own clip's row.
    captioned = np.unique(t2a)
    row_of = np.full(n, -1)
    row_of[captioned] = np.arange(len(captioned))
    rank = np.empty(m, dtype=np.int64)
    order = np.argsort(t2a, kind="stable")
    for s in range(0, m, _CHUNK):
        idx = order[s:s + _CHUNK]
        sim = audio[t2a[idx]] @ text.T  # [chunk, m]: each caption's clip against all captions
        rank[idx] = _ranks(sim, idx)
    best = np.full(len(captioned), np.iinfo(np.int64).max)
    np.minimum.at(best, row_of[t2a], rank)
    # Average precision at 10: the j-th caption (in rank order) found at rank r adds j / (r + 1).
    counts = np.bincount(row_of[t2a], minlength=len(captioned))
    ap = np.zeros(len(captioned))
    by_rank = np.lexsort((rank, row_of[t2a]))  # grouped by clip, ascending rank within
    clip = row_of[t2a][by_rank]
    first = np.searchsorted(clip, clip, side="left")
    position = np.arange(m) - first + 1  # 1-based position among the clip's captions
    r = rank[by_rank]
    np.add.at(ap, clip, np.where(r < MAP_CUTOFF, position / (r + 1.0), 0.0))
    metrics.update(_summary("a2t", best, ap / counts))

    for k in KS:
        metrics[f"chance_t2a_R@{k}"] = min(k, n) / n
    metrics[f"chance_t2a_mAP@{MAP_CUTOFF}"] = float(
        np.sum(1.0 / np.arange(1, min(MAP_CUTOFF, n) + 1)) / n)
    metrics.update(_chance_a2t(counts.astype(np.float64), m))
    return metrics


def zero_shot_accuracy(audio_embeds, class_text_embeds, labels) -> float:
    """Fraction of clips whose most similar class prompt (cosine; ties: the lower class
    index) is their label.

    Args:
        audio_embeds: `[n, d]`.
        class_text_embeds: `[c, d]`, one prompt per class (e.g. `clap_corpus.class_prompt`).
        labels: `[n]` ints in `[0, c)`.
    """
    audio = _embeddings(audio_embeds, "audio_embeds")
    classes = _embeddings(class_text_embeds, "class_text_embeds")
    _same_dim(audio, classes, "audio_embeds", "class_text_embeds")
    labels = _indices(labels, "labels", len(audio), len(classes),
                      "the number of class_text_embeds")
    return float(np.mean(np.argmax(audio @ classes.T, axis=-1) == labels))


def chance_zero_shot(num_classes: int) -> float:
    """Expected zero-shot accuracy of random embeddings: 1 / num_classes."""
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    return 1.0 / num_classes

"""Tests of the CLAP retrieval metrics (LAION's R@k / mAP@10) and zero-shot accuracy."""

import numpy as np
import pytest

from jaxaudio.eval.retrieval import (chance_zero_shot, retrieval_metrics,
                                     zero_shot_accuracy)

NAMES = [f"{d}_{m}" for d in ("t2a", "a2t") for m in ("R@1", "R@5", "R@10", "mAP@10")]


def _reference(audio, text, t2a):
    """Straight loops over sorted similarity rows, as LAION's `evaluate_clotho_audiocaps`
    (audio -> text ranks sorted before numbering, as its docstring and Mei's code say)."""
    a = audio / np.linalg.norm(audio, axis=1, keepdims=True)
    t = text / np.linalg.norm(text, axis=1, keepdims=True)
    sim = a @ t.T
    out = {}
    ranks = np.array([list(np.argsort(-sim[:, j], kind="stable")).index(t2a[j])
                      for j in range(len(t))])
    for k in (1, 5, 10):
        out[f"t2a_R@{k}"] = np.mean(ranks < k)
    out["t2a_mAP@10"] = np.mean(np.where(ranks < 10, 1 / (ranks + 1), 0.0))
    best, ap = [], []
    for i in np.unique(t2a):
        order = list(np.argsort(-sim[i], kind="stable"))
        r = np.sort([order.index(j) for j in np.flatnonzero(t2a == i)])
        best.append(r[0])
        kept = r[r < 10]
        ap.append(np.sum(np.arange(1, len(kept) + 1) / (kept + 1)) / len(r))
    best = np.array(best)
    for k in (1, 5, 10):
        out[f"a2t_R@{k}"] = np.mean(best < k)
    out["a2t_mAP@10"] = np.mean(ap)
    return out


def test_hand_computed_one_caption_each():
    audio = np.eye(3)
    # Caption 0 is nearest clip 0 (its own); caption 1 points at clip 0 first, then its
    # own clip 1; caption 2 is nearest clip 1, then clip 2 (its own), then clip 0.
    text = np.array([[1.0, 0.0, 0.0], [0.9, 0.5, 0.0], [0.1, 0.9, 0.5]])
    m = retrieval_metrics(audio, text, np.array([0, 1, 2]))
    # t2a ranks: 0, 1, 1.
    assert m["t2a_R@1"] == pytest.approx(1 / 3)
    assert m["t2a_R@5"] == m["t2a_R@10"] == 1.0
    assert m["t2a_mAP@10"] == pytest.approx((1 + 1 / 2 + 1 / 2) / 3)
    # a2t: clip 0's row (1, 0.9/|t1|, 0.1/|t2|) ranks caption 0 first; clip 1's row ranks
    # caption 2 (0.9/|t2|=0.87) above caption 1 (0.5/|t1|=0.49): rank 1; clip 2's row
    # ranks caption 2 (0.48) first.
    assert m["a2t_R@1"] == pytest.approx(2 / 3)
    assert m["a2t_mAP@10"] == pytest.approx((1 + 1 / 2 + 1) / 3)
    assert m["chance_t2a_R@1"] == pytest.approx(1 / 3)
    assert m["chance_t2a_R@5"] == m["chance_t2a_R@10"] == 1.0
    assert m["chance_t2a_mAP@10"] == pytest.approx((1 + 1 / 2 + 1 / 3) / 3)
    assert m["chance_a2t_mAP@10"] == pytest.approx((1 + 1 / 2 + 1 / 3) / 3)
    assert set(m) == set(NAMES) | {f"chance_{k}" for k in NAMES}


def test_perfect_embeddings():
    rng = np.random.default_rng(0)
    audio = rng.standard_normal((40, 16))
    m = retrieval_metrics(audio, audio * 3.0, np.arange(40))  # scale does not matter
    for k in NAMES:
        assert m[k] == pytest.approx(1.0), k
    assert m["chance_t2a_R@5"] == pytest.approx(5 / 40)
    assert m["chance_a2t_R@10"] == pytest.approx(10 / 40)
    assert m["chance_a2t_mAP@10"] == pytest.approx(np.sum(1 / np.arange(1, 11)) / 40)


def test_known_permutation():
    rng = np.random.default_rng(1)
    audio = rng.standard_normal((30, 32))
    perm = rng.permutation(30)
    m = retrieval_metrics(audio, audio[perm], perm)
    assert all(m[k] == pytest.approx(1.0) for k in NAMES)
    # The same captions assigned to a shifted clip: no caption finds its clip first.
    m = retrieval_metrics(audio, audio[perm], np.roll(perm, 1))
    assert m["t2a_R@1"] == 0.0 and m["a2t_R@1"] == 0.0


def test_several_captions_per_clip_by_hand():
    audio = np.eye(2)
    # Clip 0 has captions 0, 1, 2; clip 1 has caption 3.
    text = np.array([[1.0, 0.0], [0.0, 1.0], [0.8, 0.6], [0.6, 0.8]])
    t2a = np.array([0, 0, 0, 1])
    m = retrieval_metrics(audio, text, t2a)
    # t2a ranks: caption 0 -> 0, caption 1 -> 1 (it is nearest clip 1), 2 -> 0, 3 -> 0.
    assert m["t2a_R@1"] == pytest.approx(3 / 4)
    assert m["t2a_mAP@10"] == pytest.approx((1 + 0.5 + 1 + 1) / 4)
    # Clip 0's row: captions 0 (1.0), 2 (0.8), 3 (0.6), 1 (0.0) -> its ranks 0, 1, 3:
    # AP = (1/1 + 2/2 + 3/4) / 3. Clip 1's row: 1 (1.0), 3 (0.8), 2, 0 -> rank 1: AP 1/2.
    assert m["a2t_R@1"] == pytest.approx(1 / 2)
    assert m["a2t_R@5"] == 1.0
    assert m["a2t_mAP@10"] == pytest.approx(((1 + 1 + 0.75) / 3 + 0.5) / 2)
    # Chance for clip 0 (3 of 4 captions): R@1 = 3/4; clip 1 (1 of 4): 1/4.
    assert m["chance_a2t_R@1"] == pytest.approx((3 / 4 + 1 / 4) / 2)
    assert m["chance_t2a_R@1"] == pytest.approx(1 / 2)


def test_matches_reference_with_uneven_captions_and_uncaptioned_clips():
    rng = np.random.default_rng(2)
    audio = rng.standard_normal((25, 8))
    t2a = np.concatenate([np.repeat(np.arange(20), rng.integers(1, 6, 20)), [3, 3]])
    text = audio[t2a] + 1.2 * rng.standard_normal((len(t2a), 8))
    got = retrieval_metrics(audio, text, t2a)
    want = _reference(audio, text, t2a)
    for k in NAMES:
        assert got[k] == pytest.approx(want[k]), k
    assert 0.0 < got["a2t_R@1"] < 1.0 and 0.0 < got["t2a_mAP@10"] < 1.0


def test_ties_keep_index_order():
    audio = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    m = retrieval_metrics(audio, np.array([[1.0, 0.0], [1.0, 0.0]]), np.array([0, 1]))
    assert m["t2a_R@1"] == 0.5  # caption 1's clip ties with clip 0, which comes first


@pytest.mark.parametrize("captions", [1, 5])
def test_chance_values_match_simulation(captions):
    rng = np.random.default_rng(3)
    n, d, trials = 30, 16, 120
    t2a = np.repeat(np.arange(n), captions)
    sums = {}
    for _ in range(trials):
        m = retrieval_metrics(rng.standard_normal((n, d)),
                              rng.standard_normal((n * captions, d)), t2a)
        for k, v in m.items():
            sums[k] = sums.get(k, 0.0) + v / trials
    for k in NAMES:
        # Standard error of a mean of fractions over n (or n * captions) queries x trials.
        assert abs(sums[k] - m[f"chance_{k}"]) < 0.02 + 0.1 * m[f"chance_{k}"], (
            k, sums[k], m[f"chance_{k}"])
    if captions == 1:
        for k in (1, 5, 10):
            assert m[f"chance_a2t_R@{k}"] == pytest.approx(k / n)


def test_shape_errors():
    a, t = np.ones((4, 3)), np.ones((5, 3))
    idx = np.array([0, 1, 2, 3, 3])
    with pytest.raises(ValueError, match="audio_embeds must be a non-empty"):
        retrieval_metrics(np.ones(3), t, idx)
    with pytest.raises(ValueError, match="text_embeds must be a non-empty"):
        retrieval_metrics(a, np.ones((0, 3)), np.array([], int))
    with pytest.raises(ValueError, match="text_embeds has dim 2 but audio_embeds has dim 3"):
        retrieval_metrics(a, np.ones((5, 2)), idx)
    with pytest.raises(ValueError, match=r"text_to_audio must have shape \(5,\)"):
        retrieval_metrics(a, t, idx[:4])
    with pytest.raises(ValueError, match="text_to_audio must lie in"):
        retrieval_metrics(a, t, np.array([0, 1, 2, 3, 4]))
    with pytest.raises(ValueError, match="text_to_audio must hold integers"):
        retrieval_metrics(a, t, idx.astype(float))
    with pytest.raises(ValueError, match="audio_embeds contains NaN"):
        retrieval_metrics(np.full((4, 3), np.nan), t, idx)
    with pytest.raises(ValueError, match="labels must lie in"):
        zero_shot_accuracy(a, np.ones((2, 3)), np.array([0, 1, 2, 0]))
    with pytest.raises(ValueError, match="class_text_embeds has dim"):
        zero_shot_accuracy(a, np.ones((2, 4)), np.zeros(4, int))
    with pytest.raises(ValueError, match=r"labels must have shape \(4,\)"):
        zero_shot_accuracy(a, np.ones((2, 3)), np.zeros(3, int))


def test_zero_shot_accuracy():
    classes = np.eye(3) * 5.0  # norms do not matter
    audio = np.array([[1.0, 0.1, 0.0], [0.0, 0.2, 1.0], [0.3, 1.0, 0.0], [1.0, 0.0, 0.9]])
    assert zero_shot_accuracy(audio, classes, np.array([0, 2, 1, 2])) == pytest.approx(3 / 4)
    assert chance_zero_shot(4) == 0.25
    rng = np.random.default_rng(4)
    labels = rng.integers(0, 8, 4000)
    acc = zero_shot_accuracy(rng.standard_normal((4000, 16)), rng.standard_normal((8, 16)), labels)
    assert abs(acc - chance_zero_shot(8)) < 0.03

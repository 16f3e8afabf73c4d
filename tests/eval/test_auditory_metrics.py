"""AudioBERT's metrics: the detector's weighted F1 against sklearn (which the original calls),
span P/R/F1 and the cloze accuracies against hand-computed cases."""
import warnings

import numpy as np
import pytest
from sklearn.metrics import f1_score

from jaxaudio.eval.auditory import (animal_accuracy, detector_weighted_f1, majority_baseline, pitch_accuracy,
                                    span_prf)


def _sklearn(labels, preds):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # UndefinedMetricWarning: the 0 we reproduce
        return f1_score(np.asarray(labels), np.asarray(preds), average="weighted")


@pytest.mark.parametrize("shape,density,flip", [((16, 128), 0.05, 0.02), ((7, 9), 0.3, 0.2), ((40, 3), 0.5, 0.5),
                                                ((3, 128), 0.01, 0.0), ((25, 1), 0.4, 0.3), ((5, 2), 0.5, 0.9)])
def test_weighted_f1_matches_sklearn_on_random_tags(shape, density, flip):
    rng = np.random.default_rng(sum(shape))
    for _ in range(5):
        labels = (rng.random(shape) < density).astype(np.int64)
        preds = np.where(rng.random(shape) < flip, 1 - labels, labels)
        assert detector_weighted_f1(labels, preds) == pytest.approx(_sklearn(labels, preds), abs=1e-12)


def test_weighted_f1_edge_cases_match_sklearn():
    zeros = np.zeros((4, 6), np.int64)
    some = zeros.copy()
    some[1, 2] = 1
    no_positive_column = np.array([[1, 0, 0], [1, 1, 0], [0, 1, 0]])
    pred_in_empty_column = np.array([[1, 0, 1], [0, 1, 1], [0, 1, 0]])
    cases = [
        (zeros, zeros),  # nothing anywhere: 0 (ill-defined -> 0, unweighted fallback)
        (zeros, some),  # no true positive anywhere, one false alarm
        (some, zeros),  # a positive missed
        (some, some),  # perfect
        (no_positive_column, no_positive_column),
        (no_positive_column, pred_in_empty_column),  # a prediction in a column with no support
        (np.ones((3, 4)), np.ones((3, 4))),
        (np.zeros((6, 1), np.int64), np.zeros((6, 1), np.int64)),  # a column vector: binary for sklearn
        (np.array([[0], [1], [1]]), np.array([[1], [1], [0]])),
    ]
    for labels, preds in cases:
        assert detector_weighted_f1(labels, preds) == pytest.approx(_sklearn(labels, preds), abs=1e-12), (labels, preds)
    assert detector_weighted_f1(zeros, zeros) == 0.0
    assert detector_weighted_f1(some, some) == 1.0
    # bool and integral floats read like ints
    assert detector_weighted_f1(some.astype(bool), some.astype(np.float32)) == 1.0


def test_weighted_f1_hand_computed():
    # column 0: tp 2 fn 0 fp 1 -> F1 4/5, support 2; column 1: tp 0 fn 1 -> 0, support 1;
    # column 2: no support -> weight 0. Weighted: (2 * 0.8 + 1 * 0) / 3.
    labels = np.array([[1, 0, 0], [1, 1, 0], [0, 0, 0]])
    preds = np.array([[1, 0, 1], [1, 0, 0], [1, 0, 0]])
    assert detector_weighted_f1(labels, preds) == pytest.approx(1.6 / 3)


@pytest.mark.parametrize("labels,preds,match", [
    (np.zeros(5), np.zeros(5), r"labels must be a non-empty \[N, L\]"),
    (np.zeros((2, 3)), np.zeros((3, 2)), r"preds has shape \(3, 2\) but labels has shape \(2, 3\)"),
    (np.full((2, 3), 2), np.zeros((2, 3)), r"labels must hold only 0 and 1, found \[2\]"),
    (np.zeros((2, 3)), np.full((2, 3), -100), r"preds must hold only 0 and 1"),
    (np.zeros((0, 3)), np.zeros((0, 3)), r"labels must be a non-empty"),
])
def test_weighted_f1_errors_name_the_argument(labels, preds, match):
    with pytest.raises(ValueError, match=match):
        detector_weighted_f1(labels, preds)


def test_span_prf_multiset_micro():
    gold = [["meow"], ["a violin", "a tuba"], ["bark", "bark"], []]
    pred = [["meow"], ["a tuba", "a drum"], ["bark"], ["hiss"]]
    # matches 1 + 1 + 1 = 3; predicted 1 + 2 + 1 + 1 = 5; gold 1 + 2 + 2 = 5
    out = span_prf(gold, pred)
    assert out == pytest.approx({"precision": 0.6, "recall": 0.6, "f1": 0.6})
    # a duplicate prediction matches one gold span only
    assert span_prf([["x"]], [["x", "x"]]) == pytest.approx({"precision": 0.5, "recall": 1.0, "f1": 2 / 3})
    # exact match unless a normaliser is given
    assert span_prf([["Meow"]], [["meow"]])["f1"] == 0.0
    assert span_prf([["Meow"]], [["meow"]], normalize=str.lower)["f1"] == 1.0
    # nothing predicted or nothing gold: zero denominators give 0
    assert span_prf([["a"], []], [[], []]) == {"precision": 0.0, "recall": 0.0, "f1": 0.0}
    assert span_prf([[]], [[]]) == {"precision": 0.0, "recall": 0.0, "f1": 0.0}


def test_span_prf_errors():
    with pytest.raises(ValueError, match="pred has 1 sentences but gold has 2"):
        span_prf([["a"], ["b"]], [["a"]])
    with pytest.raises(ValueError, match=r"gold\[0\] must be a list of span strings"):
        span_prf(["a"], [["a"]])
    with pytest.raises(ValueError, match=r"pred\[0\] holds a int"):
        span_prf([["a"]], [[1]])


def _one_hot_logits(ids, vocab=12):
    ids = np.asarray(ids)
    logits = np.random.default_rng(0).normal(size=ids.shape + (vocab,)) * 0.1
    np.put_along_axis(logits, ids[..., None], 5.0, axis=-1)
    return logits


def test_animal_accuracy_needs_every_answer_piece():
    labels = np.array([[1, 5, 6, 2, 0], [1, 7, 2, 0, 0], [1, 8, 9, 2, 0], [1, 3, 2, 0, 0]])
    mask = np.array([[0, 1, 1, 0, 0], [0, 1, 0, 0, 0], [0, 1, 1, 0, 0], [0, 0, 0, 0, 0]], bool)
    pred = labels.copy()
    pred[:, 0] = 4  # non-answer positions do not count
    pred[2, 2] = 3  # item 2: one of two answer pieces wrong
    # item 3 has no answer position: wrong, as the original (an empty prediction never matches)
    assert animal_accuracy(pred, labels, mask) == 0.5
    assert animal_accuracy(_one_hot_logits(pred), labels, mask.astype(np.int32)) == 0.5
    # argmax over the full vocabulary: a tie takes the first id, as torch/numpy
    logits = _one_hot_logits(labels)
    assert animal_accuracy(logits, labels, mask) == 0.75
    logits[1, 1, 0] = logits[1, 1, 7]  # id 0 ties with the answer 7 and comes first
    assert animal_accuracy(logits, labels, mask) == 0.5


def test_animal_accuracy_errors():
    labels = np.zeros((2, 5), np.int64)
    with pytest.raises(ValueError, match=r"labels must have shape \(2, 4\)"):
        animal_accuracy(np.zeros((2, 4, 3)), labels, np.zeros((2, 5), bool))
    with pytest.raises(ValueError, match=r"answer_mask must have shape \(2, 5\)"):
        animal_accuracy(labels, labels, np.zeros((2, 4), bool))
    with pytest.raises(ValueError, match=r"logits must be logits \[N, L, vocab\] or predicted ids"):
        animal_accuracy(np.zeros(5), labels, np.zeros((2, 5), bool))
    with pytest.raises(ValueError, match="logits as predicted ids must hold integers"):
        animal_accuracy(np.zeros((2, 5)), labels, np.zeros((2, 5), bool))


def test_pitch_accuracy_compares_the_two_words_only():
    higher, lower, vocab = 7, 4, 10
    logits = np.zeros((4, 3, vocab))
    positions = np.array([1, 2, 0, 1])
    logits[0, 1, higher] = 1.0  # higher
    logits[1, 2, lower] = 1.0  # lower
    logits[2, 0, [higher, 9]] = [0.5, 9.0]  # id 9 wins the full argmax, but only the pair counts: higher
    logits[2, 1, lower] = 5.0  # another position: ignored
    # item 3: a tie -> "lower" (the original's argmax over [lower, higher])
    answers = np.array([higher, lower, higher, lower])
    assert pitch_accuracy(logits, positions, higher, lower, answers) == 1.0
    assert pitch_accuracy(logits, positions, higher, lower, ["higher", "Lower", "higher", "higher"]) == 0.75


def test_pitch_accuracy_errors():
    logits = np.zeros((2, 3, 10))
    with pytest.raises(ValueError, match=r"mask_positions must have shape \(2,\)"):
        pitch_accuracy(logits, np.array([0]), 7, 4, [7, 4])
    with pytest.raises(ValueError, match=r"mask_positions must lie in \[0, 3\)"):
        pitch_accuracy(logits, np.array([0, 3]), 7, 4, [7, 4])
    with pytest.raises(ValueError, match=r"answers holds ids \[5\]"):
        pitch_accuracy(logits, np.array([0, 1]), 7, 4, [7, 5])
    with pytest.raises(ValueError, match="answers must be 'higher' or 'lower'"):
        pitch_accuracy(logits, np.array([0, 1]), 7, 4, ["higher", "louder"])
    with pytest.raises(ValueError, match=r"higher_id must be a token id in \[0, 10\)"):
        pitch_accuracy(logits, np.array([0, 1]), 17, 4, [7, 4])
    with pytest.raises(ValueError, match=r"logits must be a non-empty \[N, L, vocab\]"):
        pitch_accuracy(np.zeros((2, 10)), np.array([0, 1]), 7, 4, [7, 4])


def test_majority_baseline():
    assert majority_baseline(["higher", "lower", "higher"]) == {"answer": "higher", "accuracy": pytest.approx(2 / 3)}
    # the majority comes from the train answers when given
    out = majority_baseline(["cat", "dog", "dog"], train_answers=["cat", "cat", "dog"])
    assert out == {"answer": "cat", "accuracy": pytest.approx(1 / 3)}
    # word-piece id sequences; ties: the first seen
    assert majority_baseline([np.array([3, 4]), [5], [3, 4], [5]])["answer"] == (3, 4)
    with pytest.raises(ValueError, match="answers must be a non-empty sequence"):
        majority_baseline([])

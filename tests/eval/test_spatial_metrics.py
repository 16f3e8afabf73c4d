"""Spatial-AST metrics: AP against sklearn, great-circle cases, DER, chance MAE."""

import warnings

import numpy as np
import pytest
from sklearn.metrics import average_precision_score

from jaxaudio.eval.spatial import (average_precision, chance_direction_mae, chance_spatial_metrics,
                                   direction_metrics,
                                   distance_accuracy, distance_error_rate,
                                   great_circle_error_deg, mean_average_precision,
                                   spatial_ast_metrics)


def _sklearn_ap(scores, targets):
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')  # sklearn warns on the no-positive column
        return np.array([average_precision_score(targets[:, k], scores[:, k])
                         for k in range(targets.shape[1])])


def test_average_precision_matches_sklearn_with_ties_and_empty_class():
    rng = np.random.default_rng(0)
    scores = rng.standard_normal((300, 12))
    scores[:, :4] = np.round(scores[:, :4])  # many ties
    targets = (rng.random((300, 12)) < 0.15).astype(np.float32)
    targets[:, 5] = 0.0  # no positive
    targets[:, 6] = 1.0  # all positive
    ap = average_precision(scores, targets)
    ref = _sklearn_ap(scores, targets)
    keep = np.arange(12) != 5
    np.testing.assert_allclose(ap[keep], ref[keep], atol=1e-12)
    assert np.isnan(ap[5])  # sklearn gives 0.0 with a warning
    m_ap, skipped = mean_average_precision(scores, targets)
    assert skipped == 1
    assert m_ap == pytest.approx(ref[keep].mean())


def test_average_precision_perfect_and_inverted():
    targets = np.array([[1], [1], [0], [0]])
    assert average_precision(np.array([[4.], [3.], [2.], [1.]]), targets)[0] == 1.0
    # positives ranked last: precision 1/3 then 2/4.
    assert average_precision(np.array([[1.], [2.], [3.], [4.]]), targets)[0] == pytest.approx(
        (1 / 3 + 2 / 4) / 2)


@pytest.mark.parametrize('az1,el1,az2,el2,expected', [
    (0, 90, 0, 90, 0.0),  # same point
    (0, 90, 180, 90, 180.0),  # opposite azimuths on the horizon
    (90, 90, 270, 90, 180.0),
    (0, 90, 90, 90, 90.0),
    (350, 90, 10, 90, 20.0),  # across the 0/360 seam
    (0, 90, 0, 120, 30.0),  # elevation bins: 90 -> 0 deg, 120 -> +30 deg
    (0, 0, 123, 0, 0.0),  # both at the -90 deg pole, azimuth irrelevant
    (45, 0, 200, 179, 179.0),  # -90 deg to +89 deg
])
def test_great_circle_cases(az1, el1, az2, el2, expected):
    err = great_circle_error_deg(np.array([az1]), np.array([el1]), np.array([az2]),
                                 np.array([el2]))
    assert err[0] == pytest.approx(expected, abs=1e-6)


def test_inputs_not_mutated():
    az_true = np.array([0, 200, 359, 181])
    el_true = np.array([90, 0, 179, 45])
    az_pred = np.array([270, 190, 1, 90])
    el_pred = np.array([80, 10, 170, 90])
    copies = [a.copy() for a in (az_true, el_true, az_pred, el_pred)]
    great_circle_error_deg(az_true, el_true, az_pred, el_pred)
    direction_metrics(az_true, el_true, az_pred, el_pred)
    for a, c in zip((az_true, el_true, az_pred, el_pred), copies):
        np.testing.assert_array_equal(a, c)


def test_direction_metrics_threshold_is_strict():
    az_true = np.array([0, 0, 0, 0])
    az_pred = np.array([0, 20, 21, 180])
    el = np.full(4, 90)
    out = direction_metrics(az_true, el, az_pred, el)
    assert out['mae_deg'] == pytest.approx((0 + 20 + 21 + 180) / 4)
    assert out['er20'] == pytest.approx(0.5)  # 20 is not an error, 21 and 180 are


def test_distance_accuracy_and_der():
    true = np.array([0, 4, 10, 20, 7])
    pred = np.array([1, 6, 10, 18, 6])  # within one bin: 0->1, 10, 7->6
    assert distance_accuracy(pred, true) == pytest.approx(3 / 5)
    assert distance_error_rate(pred, true) == pytest.approx(2 / 5)
    assert distance_accuracy(pred, true, tolerance_bins=2) == 1.0


def test_chance_mae():
    assert chance_direction_mae(np.full(50, 90)) == pytest.approx(90.0, abs=1e-9)
    # Monte Carlo check of the exact expectation for a mix of elevations.
    rng = np.random.default_rng(0)
    el_true = rng.integers(0, 180, 20000)
    sampled = great_circle_error_deg(rng.integers(0, 360, 20000), el_true,
                                     rng.integers(0, 360, 20000), rng.integers(0, 180, 20000))
    assert chance_direction_mae(el_true) == pytest.approx(sampled.mean(), abs=1.0)


def test_chance_spatial_metrics_against_guessing():
    """The chance row equals what guessing scores through `spatial_ast_metrics`: uniform
    random logits (sampled, so within noise) and the best constant distance (exact)."""
    rng = np.random.default_rng(1)
    n = 4000
    cls_t = (rng.random((n, 4)) < np.array([0.1, 0.2, 0.4, 0.0])).astype(np.float32)
    dist_t = np.minimum(rng.poisson(3, n), 20)
    az_t, el_t = rng.integers(0, 360, n), np.clip(rng.normal(90, 20, n).astype(int), 0, 179)
    chance = chance_spatial_metrics(cls_t, dist_t, el_t)
    guess = spatial_ast_metrics(rng.random((n, 4)), rng.random((n, 21)), rng.random((n, 360)),
                                rng.random((n, 180)), cls_t, dist_t, az_t, el_t)
    assert chance["chance_mAP"] == pytest.approx(guess["mAP"], abs=0.02)
    assert chance["chance_distance_accuracy"] == pytest.approx(guess["distance_accuracy"], abs=0.02)
    assert chance["chance_mae_deg"] == pytest.approx(guess["mae_deg"], abs=2.0)
    assert chance["chance_er20"] == pytest.approx(guess["er20"], abs=0.02)
    constant = [distance_accuracy(np.full(n, b), dist_t) for b in range(21)]
    assert chance["prior_distance_accuracy"] == pytest.approx(max(constant))
    assert chance["prior_DER"] == pytest.approx(1 - max(constant))
    assert chance["prior_distance_accuracy"] > 2 * chance["chance_distance_accuracy"]


def test_spatial_ast_metrics_from_logits():
    rng = np.random.default_rng(0)
    n = 64
    cls_targets = (rng.random((n, 5)) < 0.3).astype(np.float32)
    cls_targets[0] = 1.0  # every class has a positive
    dist_t, az_t, el_t = rng.integers(0, 21, n), rng.integers(0, 360, n), rng.integers(0, 180, n)

    def one_hot(labels, classes):
        return np.eye(classes)[labels] * 5.0

    out = spatial_ast_metrics(cls_targets * 3.0 + rng.random((n, 5)), one_hot(dist_t, 21),
                              one_hot(az_t, 360), one_hot(el_t, 180),
                              cls_targets, dist_t, az_t, el_t)
    assert out == {'mAP': 1.0, 'map_skipped_classes': 0, 'distance_accuracy': 1.0,
                   'DER': 0.0, 'mae_deg': pytest.approx(0.0, abs=1e-5), 'er20': 0.0}

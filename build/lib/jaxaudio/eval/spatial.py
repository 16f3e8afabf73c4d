"""Spatial-AST encoder metrics: mAP, distance accuracy / DER, DoA MAE and ER20.

Matches `engine_finetune.evaluate` and `utils/stat.py` of the original. Label
conventions are the original's integer bins:
  distance  bin d = 0.5 m * d, 21 bins (0 .. 10 m);
  azimuth   degrees 0 .. 359 (0 = right, 90 = front);
  elevation bin b = b - 90 degrees, 180 bins (90 = horizontal).
"""

import numpy as np


def average_precision(scores: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Per-class average precision, as sklearn `average_precision_score` per column.

    AP = sum over positives of the precision at that positive's score, divided by the
    number of positives; tied scores form one threshold, as in sklearn.

    Args:
        scores: `[n, classes]` any monotone score (logits or probabilities).
        targets: `[n, classes]` binary labels (values > 0.5 count as positive).

    Returns:
        `[classes]` float64. A class with no positive gets nan: its AP is undefined.
        (sklearn returns 0 with a warning there, and the original's `calculate_stats`
        stops with an error from `roc_auc_score`.)
    """
    scores = np.asarray(scores, dtype=np.float64)
    positive = np.asarray(targets) > 0.5
    if scores.shape != positive.shape or scores.ndim != 2:
        raise ValueError(f'scores {scores.shape} and targets {positive.shape} must be '
                         'the same [n, classes]')
    ap = np.full(scores.shape[1], np.nan)
    for k in range(scores.shape[1]):
        n_pos = positive[:, k].sum()
        if n_pos == 0:
            continue
        order = np.argsort(-scores[:, k], kind='stable')
        s, y = scores[order, k], positive[order, k]
        # Index of the last sample of each run of equal scores: the threshold end.
        run_end = np.r_[np.nonzero(np.diff(s))[0], len(s) - 1]
        hits = np.cumsum(y)[run_end]
        precision = hits / (run_end + 1)
        new_hits = np.diff(hits, prepend=0)
        ap[k] = np.sum(new_hits * precision) / n_pos
    return ap


def mean_average_precision(scores: np.ndarray, targets: np.ndarray) -> tuple[float, int]:
    """mAP over the classes that have at least one positive.

    Returns:
        (mAP, number of classes skipped because they have no positive). The original
        averages over all classes and cannot skip any.
    """
    ap = average_precision(scores, targets)
    skipped = int(np.isnan(ap).sum())
    return (float(np.nanmean(ap)) if skipped < ap.size else float('nan')), skipped


def distance_accuracy(pred_bins: np.ndarray, true_bins: np.ndarray,
                      tolerance_bins: int = 1) -> float:
    """Fraction of samples with |pred - true| <= tolerance_bins (1 bin = 0.5 m)."""
    diff = np.abs(np.asarray(pred_bins, np.float64) - np.asarray(true_bins, np.float64))
    return float(np.mean(diff <= tolerance_bins))


def distance_error_rate(pred_bins: np.ndarray, true_bins: np.ndarray,
                        tolerance_bins: int = 1) -> float:
    """DER = 1 - distance_accuracy."""
    return 1.0 - distance_accuracy(pred_bins, true_bins, tolerance_bins)


def great_circle_error_deg(az_true: np.ndarray, el_true: np.ndarray,
                           az_pred: np.ndarray, el_pred: np.ndarray) -> np.ndarray:
    """Angle in degrees between true and predicted directions, elementwise.

    Args:
        az_true, el_true, az_pred, el_pred: azimuth degrees (0 .. 359) and elevation
            bins (0 .. 179), broadcastable shapes such as `[n]`. They are not modified
            (the original shifts azimuths above 180 by -360 in place, which changes the
            caller's label arrays).

    Returns:
        float64 errors in [0, 180].
    """
    def radians(az, el):
        az = np.asarray(az, dtype=np.float64)
        # The original maps (180, 360) to (-180, 0); cos(az1 - az2) does not change.
        az = np.where(az > 180, az - 360, az)
        return np.deg2rad(az), np.deg2rad(np.asarray(el, dtype=np.float64) - 90)

    az1, el1 = radians(az_true, el_true)
    az2, el2 = radians(az_pred, el_pred)
    cos_angle = np.sin(el1) * np.sin(el2) + np.cos(el1) * np.cos(el2) * np.cos(np.abs(az1 - az2))
    # Rounding can put cos_angle just outside [-1, 1], where arccos gives nan.
    return np.rad2deg(np.arccos(np.clip(cos_angle, -1.0, 1.0)))


def direction_metrics(az_true: np.ndarray, el_true: np.ndarray,
                      az_pred: np.ndarray, el_pred: np.ndarray,
                      threshold_deg: float = 20.0) -> dict[str, float]:
    """DoA metrics: mean great-circle error and the fraction with error > threshold.

    Returns:
        {'mae_deg': mean error in degrees, 'er20': fraction with error strictly above
        `threshold_deg` (20 in the original)}.
    """
    err = great_circle_error_deg(az_true, el_true, az_pred, el_pred)
    return {'mae_deg': float(np.mean(err)), 'er20': float(np.mean(err > threshold_deg))}


def chance_direction_mae(el_true: np.ndarray) -> float:
    """Expected MAE of predictions drawn uniformly over the label bins.

    Azimuth uniform over the 360 degrees and elevation uniform over the 180 bins, i.e.
    what argmax of random logits gives (not uniform on the sphere). The expectation is
    exact, not sampled. Azimuth does not enter: the error depends on the azimuth
    difference only, which is uniform whatever the true azimuth. A horizontal source
    (bin 90) gives exactly 90 degrees, by the symmetry az -> az + 180.

    Args:
        el_true: `[n]` true elevation bins.

    Returns:
        the mean over samples of the expected error, in degrees.
    """
    bins, counts = np.unique(np.asarray(el_true).ravel(), return_counts=True)
    az_pred = np.arange(360)[:, None]
    el_pred = np.arange(180)[None, :]
    # One [360, 180] grid per distinct true elevation keeps memory small.
    expected = [great_circle_error_deg(0, b, az_pred, el_pred).mean() for b in bins]
    return float(np.sum(np.asarray(expected) * counts) / counts.sum())


def spatial_ast_metrics(cls_logits: np.ndarray, dist_logits: np.ndarray,
                        az_logits: np.ndarray, el_logits: np.ndarray,
                        cls_targets: np.ndarray, dist_targets: np.ndarray,
                        az_targets: np.ndarray, el_targets: np.ndarray) -> dict[str, float | int]:
    """All encoder metrics from the four heads' outputs.

    Args:
        cls_logits: `[n, classes]`; dist_logits `[n, 21]`; az_logits `[n, 360]`;
            el_logits `[n, 180]`.
        cls_targets: `[n, classes]` multi-hot; dist/az/el_targets: `[n]` integer bins.

    Returns:
        {'mAP', 'map_skipped_classes', 'distance_accuracy', 'DER', 'mae_deg', 'er20'};
        predictions are argmax of the logits.
    """
    m_ap, skipped = mean_average_precision(cls_logits, cls_targets)
    dist_pred = np.argmax(dist_logits, axis=-1)
    acc = distance_accuracy(dist_pred, dist_targets)
    direction = direction_metrics(az_targets, el_targets,
                                  np.argmax(az_logits, axis=-1), np.argmax(el_logits, axis=-1))
    return {'mAP': m_ap, 'map_skipped_classes': skipped, 'distance_accuracy': acc,
            'DER': 1.0 - acc, **direction}


def chance_spatial_metrics(cls_targets: np.ndarray, dist_targets: np.ndarray, el_targets: np.ndarray,
                           num_distance_bins: int = 21, threshold_deg: float = 20.0) -> dict[str, float]:
    """The metrics of a model that guesses: the chance row printed beside the model's.

    Uniform random bins for distance and direction (what argmax of random logits gives),
    exact expectations; for mAP the expected AP of random scores, i.e. each class's
    positive rate, averaged over classes with a positive. Distance also gets the best
    input-blind answer, `prior_distance_accuracy` / `prior_DER`: one bin for every clip,
    the one that scores best on these targets (a model that learned only the distance
    prior reaches it; in small rooms it is far above uniform chance).
    """
    positives = (np.asarray(cls_targets) > 0.5).mean(axis=0)
    dist = np.asarray(dist_targets).ravel()
    bins = np.arange(num_distance_bins)
    within = (np.abs(bins[None, :] - dist[:, None]) <= 1).mean(axis=1)
    el_bins, counts = np.unique(np.asarray(el_targets).ravel(), return_counts=True)
    grid = [great_circle_error_deg(0, b, np.arange(360)[:, None], np.arange(180)[None, :]) for b in el_bins]
    er = np.asarray([np.mean(g > threshold_deg) for g in grid])
    acc = float(within.mean())
    prior = float(max((np.abs(bins[:, None] - dist[None, :]) <= 1).mean(axis=1)))
    return {"chance_mAP": float(positives[positives > 0].mean()) if np.any(positives > 0) else float("nan"),
            "chance_distance_accuracy": acc, "chance_DER": 1.0 - acc,
            "prior_distance_accuracy": prior, "prior_DER": 1.0 - prior,
            "chance_mae_deg": chance_direction_mae(el_targets),
            "chance_er20": float(np.sum(er * counts) / counts.sum())}

"""Top-k metrics and decisions at thresholds: P/R/F1@k, calibrated per-label thresholds, F1."""

from __future__ import annotations

import numpy as np

from mumic.errors import MumicError
from mumic.metrics._core import _THRESHOLD_EPS, _best_f1_threshold, _check, _check_k, _nanmean, _per_label, _top_k_mask

# --------------------------------------------------------------------------- top-k


def _top_k(t: np.ndarray, s: np.ndarray, k: int) -> tuple[float, float, float]:
    """(precision@k, recall@k, F1@k) with the averaging documented on the public functions."""
    k_eff = min(k, t.shape[1])
    hits = (_top_k_mask(s, k_eff) & t).sum(axis=1)
    pos = t.sum(axis=1)
    has = pos > 0
    precision = float(hits.mean() / k_eff)
    if not has.any():
        return precision, float("nan"), float("nan")
    recall = float((hits[has] / pos[has]).mean())
    f1 = float((2.0 * hits[has] / (k_eff + pos[has])).mean())
    return precision, recall, f1


def precision_at_k(y_true: np.ndarray, y_score: np.ndarray, k: int) -> float:
    """Mean over all images of hits/k among each image's top-k labels.

    ``k`` larger than C is clamped to C. Ties at the k-th score keep the lower label index.
    """
    t, s = _check(y_true, y_score)
    return _top_k(t, s, _check_k(k))[0]


def recall_at_k(y_true: np.ndarray, y_score: np.ndarray, k: int) -> float:
    """Mean over images with >= 1 positive of hits/#positives among the top-k labels.

    ``nan`` when no image has a positive.
    """
    t, s = _check(y_true, y_score)
    return _top_k(t, s, _check_k(k))[1]


def f1_at_k(y_true: np.ndarray, y_score: np.ndarray, k: int) -> float:
    """Per-image mean of F1@k over images with >= 1 positive (the images of recall@k).

    Per image F1 = 2*hits / (k + #positives), the harmonic mean of its precision@k and
    recall@k (0 when it has no hit). ``nan`` when no image has a positive.
    """
    t, s = _check(y_true, y_score)
    return _top_k(t, s, _check_k(k))[2]


# --------------------------------------------------------------------------- thresholds


def fit_thresholds(
    y_true: np.ndarray,
    y_score: np.ndarray,
    min_positives: int = 10,
    default: float = 0.5,
) -> np.ndarray:
    """Per-label decision thresholds that maximise F1 on (validation) data.

    For each label with at least ``min_positives`` positives, the threshold is the
    midpoint between the lowest score of the best-F1 cut ("predict positive when
    ``score >= threshold``"; on equal F1 the higher cut) and the next lower score, so
    it does not sit exactly on a validation score. Labels with fewer positives
    (including none) fall back to one global threshold that maximises micro-F1 over all
    cells, chosen the same way: too few positives make a per-label optimum noise (on
    EmojiTags validation, with 3-9 positives per label, per-label optima from 3 or more
    positives cut test micro-F1 from 0.58 to 0.21: a rare label's best F1 is often a
    threshold so low that it is predicted for nearly every image).
    ``default`` is used only when ``y_true`` has no positive at all. Thresholds are
    clipped to ``[1e-6, 1 - 1e-6]``, so ``y_score`` must be probabilities in [0, 1].
    """
    t, s = _check(y_true, y_score)
    if s.min() < 0.0 or s.max() > 1.0:
        raise MumicError(
            "metrics: fit_thresholds needs probabilities in [0, 1], got scores in "
            f"[{s.min():.4g}, {s.max():.4g}] (apply the sigmoid first)"
        )
    if isinstance(min_positives, bool) or not isinstance(min_positives, (int, np.integer)) \
            or min_positives < 1:
        raise MumicError(f"metrics: min_positives must be an integer >= 1, got {min_positives!r}")
    if not 0.0 < float(default) < 1.0:
        raise MumicError(f"metrics: default threshold must lie in (0, 1), got {default!r}")
    c = t.shape[1]
    if not t.any():
        return np.full(c, float(default))
    global_thr = _best_f1_threshold(t.ravel(), s.ravel())
    thr = _per_label(t, s, _best_f1_threshold)
    thr = np.where(global_fallback(t, min_positives), global_thr, thr)
    return np.clip(thr, _THRESHOLD_EPS, 1.0 - _THRESHOLD_EPS)


def global_fallback(y_true: np.ndarray, min_positives: int = 10) -> np.ndarray:
    """[C] bool: the labels whose fitted threshold is the global one (fewer than
    ``min_positives`` positives; see fit_thresholds)."""
    return np.asarray(y_true).sum(axis=0) < min_positives


def _f1(tp: np.ndarray, n_pred: np.ndarray, n_pos: np.ndarray) -> np.ndarray:
    denom = n_pred + n_pos
    return np.where(denom > 0, 2.0 * tp / np.maximum(denom, 1), np.nan)


def _check_thresholds(thresholds: np.ndarray | float, n_labels: int) -> np.ndarray:
    try:
        thr = np.asarray(thresholds, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise MumicError(f"metrics: thresholds must be numbers: {exc}") from exc
    if thr.ndim == 0:
        thr = np.full(n_labels, float(thr))
    if thr.shape != (n_labels,):
        raise MumicError(
            f"metrics: thresholds has shape {thr.shape}, expected ({n_labels},) or a scalar"
        )
    if np.isnan(thr).any():
        raise MumicError("metrics: thresholds contain NaN")
    return thr


def _f1_thr(t: np.ndarray, s: np.ndarray, thr: np.ndarray) -> dict[str, float]:
    pred = s >= thr[None, :]
    hit = pred & t
    micro = _f1(np.array(hit.sum()), np.array(pred.sum()), np.array(t.sum()))
    pos_l = t.sum(axis=0)
    per_label = _f1(hit.sum(axis=0), pred.sum(axis=0), pos_l)
    pos_i = t.sum(axis=1)
    per_image = _f1(hit.sum(axis=1), pred.sum(axis=1), pos_i)
    return {
        "micro_f1": float(micro),
        "macro_f1": _nanmean(per_label[pos_l > 0]),
        "sample_f1": _nanmean(per_image[pos_i > 0]),
    }


def f1_at_thresholds(
    y_true: np.ndarray, y_score: np.ndarray, thresholds: np.ndarray | float
) -> dict[str, float]:
    """F1 of the decisions ``y_score >= thresholds`` (thresholds: scalar or ``[C]``).

    Returns ``micro_f1`` (over all cells), ``macro_f1`` (mean per-label F1 over labels
    with >= 1 positive) and ``sample_f1`` (mean per-image F1 over images with >= 1
    positive). Each is ``nan`` when it has nothing to average.
    """
    t, s = _check(y_true, y_score)
    return _f1_thr(t, s, _check_thresholds(thresholds, t.shape[1]))



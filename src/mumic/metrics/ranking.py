"""Ranking metrics: GAP@k, per-label AP, macro/micro/majority mAP, ZSL and GZSL mAP."""

from __future__ import annotations

import numpy as np

from mumic.errors import MumicError
from mumic.metrics._core import _check, _check_k, _label_index, _nanmean, _per_label, _precision_sum, _top_k_mask

# --------------------------------------------------------------------------- ranking
# Public functions validate their input once and call these unchecked helpers, which
# evaluate_scores shares so that one report validates and sorts as little as possible.


def _gap(t: np.ndarray, s: np.ndarray, k: int | None) -> float:
    total = int(t.sum())
    if total == 0:
        return float("nan")
    if k is None or k >= t.shape[1]:
        return _precision_sum(t.ravel(), s.ravel()) / total
    keep = _top_k_mask(s, k)
    return _precision_sum(t[keep], s[keep]) / total


def _ap_per_label(t: np.ndarray, s: np.ndarray) -> np.ndarray:
    sums = _per_label(t, s, _precision_sum)
    pos = t.sum(axis=0)
    return np.where(pos > 0, sums / np.maximum(pos, 1), np.nan)


def _macro(t: np.ndarray, s: np.ndarray) -> float:
    return _nanmean(_ap_per_label(t, s))


def gap(y_true: np.ndarray, y_score: np.ndarray, k: int | None = None) -> float:
    """YouTube-8M global average precision GAP@k.

    Keep each image's ``k`` highest-scoring (label, score) pairs (``k=None`` or
    ``k >= C``: all labels; ties at the k-th score keep the lower label index), pool
    them over all images, sort by score descending and return
    ``sum_i precision@i * rel_i / P`` where ``P`` is the total number of positives in
    ``y_true`` (not only the retrieved ones), so positives that fall outside every
    top k count as misses. Tied scores in the pooled list are one block (see the module
    docstring). ``nan`` when ``y_true`` has no positive (AP is undefined).
    """
    t, s = _check(y_true, y_score)
    return _gap(t, s, None if k is None else _check_k(k))


def average_precision_per_label(y_true: np.ndarray, y_score: np.ndarray) -> np.ndarray:
    """Average precision of every label column, as ``sklearn.metrics.average_precision_score``.

    Returns a float array ``[C]``; ``nan`` for labels without any positive.
    """
    t, s = _check(y_true, y_score)
    return _ap_per_label(t, s)


def macro_map(y_true: np.ndarray, y_score: np.ndarray) -> float:
    """Macro mAP: mean per-label AP over the labels with >= 1 positive (others skipped).

    ``nan`` when no label has a positive.
    """
    t, s = _check(y_true, y_score)
    return _macro(t, s)


def micro_map(y_true: np.ndarray, y_score: np.ndarray) -> float:
    """Micro mAP: AP over all (image, label) cells flattened into one ranking.

    Equals ``average_precision_score(..., average="micro")`` and ``gap(k=None)``.
    ``nan`` when there is no positive.
    """
    t, s = _check(y_true, y_score)
    return _gap(t, s, None)


def majority_labels(train_counts: np.ndarray, n: int) -> np.ndarray:
    """Indices of the ``n`` labels with the most training positives.

    Ordered by descending count; equal counts are broken by label index (lower first),
    so the set is deterministic. With ``n >= C`` every label is returned.
    """
    counts = np.asarray(train_counts)
    if counts.ndim != 1 or counts.size == 0:
        raise MumicError(
            "metrics: train_counts must be a non-empty 1-D array [labels], "
            f"got shape {counts.shape}"
        )
    if counts.dtype == np.bool_ or not np.issubdtype(counts.dtype, np.number) \
            or np.isnan(counts.astype(np.float64)).any():
        raise MumicError("metrics: train_counts must be numeric counts without NaN")
    if (counts < 0).any():
        raise MumicError("metrics: train_counts must be >= 0")
    n = _check_k(n, "n")
    order = np.lexsort((np.arange(counts.size), -counts.astype(np.float64)))
    return order[:n]


def _check_counts(train_counts: np.ndarray, n_labels: int) -> np.ndarray:
    counts = np.asarray(train_counts)
    if counts.shape != (n_labels,):
        raise MumicError(
            f"metrics: train_counts has shape {counts.shape}, expected ({n_labels},) "
            "(one count per label column)"
        )
    return counts


def majority_map(
    y_true: np.ndarray, y_score: np.ndarray, train_counts: np.ndarray, n: int = 32
) -> float:
    """Macro mAP restricted to the ``n`` labels with most training positives.

    The set comes from :func:`majority_labels`; among those, labels with no positive in
    ``y_true`` are skipped as in :func:`macro_map`. With ``C <= n`` this is ``macro_map``.
    """
    t, s = _check(y_true, y_score)
    idx = majority_labels(_check_counts(train_counts, t.shape[1]), n)
    return _macro(t[:, idx], s[:, idx])


def zsl_map(y_true: np.ndarray, y_score: np.ndarray, unseen: np.ndarray) -> float:
    """Zero-shot mAP: macro mAP over the unseen label columns only.

    ``unseen`` is a boolean mask ``[C]`` or an array of label indices.
    """
    t, s = _check(y_true, y_score)
    idx = _label_index(unseen, t.shape[1], "unseen")
    if idx.size == 0:
        raise MumicError("metrics: zsl_map needs at least one unseen label")
    return _macro(t[:, idx], s[:, idx])


def gzsl_map(y_true: np.ndarray, y_score: np.ndarray, unseen: np.ndarray) -> float:
    """Generalised zero-shot mAP: macro mAP over all labels, seen and unseen jointly.

    This is the all-label :func:`macro_map` of one scoring run in which the unseen
    labels were scored next to the seen ones; ``unseen`` is only validated.
    """
    t, s = _check(y_true, y_score)
    _label_index(unseen, t.shape[1], "unseen")
    return _macro(t, s)



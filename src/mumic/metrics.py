"""Multi-label ranking and classification metrics: GAP@k, mAP and friends.

Every function takes NumPy arrays in scikit-learn argument order:

* ``y_true``: ``[N images, C labels]`` of {0, 1} (bool, int or float),
* ``y_score``: ``[N, C]`` finite floats (probabilities, or any monotone score for the
  ranking metrics),

and returns a plain Python ``float`` (or a NumPy array / dict where stated). Bad input
raises :class:`mumic.errors.MumicError` with a message that names the problem.

Conventions shared by every function here (they are part of the metric definitions):

* **Ties in a ranking** are treated as in ``sklearn.metrics.average_precision_score``:
  items with equal scores are retrieved together, as one block, and every positive in a
  block gets the precision measured at the end of that block. The result therefore does
  not depend on the order of tied items, on the order of the images, or on the sort
  algorithm. For a tie-free ranking this is exactly ``sum_i precision@i * rel_i``.
* **Ties inside one image's top k** (which labels are kept when several share the k-th
  highest score) are broken by label index: the lower column index is kept first.
* A metric that has nothing to average over (no positive at all, no label with a
  positive) is ``nan`` rather than 0: a 0 would read as "the model is useless" when the
  truth is "this data set cannot measure it", and ``nan`` cannot be silently averaged
  into a report.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from mumic.errors import MumicError

__all__ = [
    "average_precision_per_label",
    "evaluate_scores",
    "f1_at_k",
    "f1_at_thresholds",
    "fit_thresholds",
    "gap",
    "gzsl_map",
    "macro_map",
    "majority_labels",
    "majority_map",
    "micro_map",
    "precision_at_k",
    "recall_at_k",
    "zsl_map",
]

# Fitted thresholds are kept strictly inside (0, 1): a score of exactly 0 never
# passes one and a score of exactly 1 always does.
_THRESHOLD_EPS = 1e-6


# --------------------------------------------------------------------------- input


def _check(y_true: object, y_score: object) -> tuple[np.ndarray, np.ndarray]:
    """Validate and convert a (y_true, y_score) pair; returns (bool [N,C], float [N,C])."""
    try:
        t = np.asarray(y_true)
        s = np.asarray(y_score)
    except Exception as exc:  # ragged lists and the like
        raise MumicError(f"metrics: could not convert inputs to arrays: {exc}") from exc
    if t.ndim != 2:
        raise MumicError(
            f"metrics: y_true must be 2-D [images, labels], got shape {t.shape}"
        )
    if s.shape != t.shape:
        raise MumicError(
            f"metrics: y_score shape {s.shape} does not match y_true shape {t.shape}"
        )
    if t.size == 0:
        raise MumicError(f"metrics: empty input (shape {t.shape}); need >= 1 image and label")
    if not (np.issubdtype(s.dtype, np.floating) or np.issubdtype(s.dtype, np.integer)
            or s.dtype == np.bool_):
        raise MumicError(f"metrics: y_score must be numeric, got dtype {s.dtype}")
    if s.dtype not in (np.float32, np.float64):  # ints, bools, float16: widen
        s = s.astype(np.float64)
    if np.isnan(s).any():
        n_bad = int(np.isnan(s).sum())
        raise MumicError(f"metrics: y_score contains {n_bad} NaN value(s)")
    if not np.isfinite(s).all():
        raise MumicError("metrics: y_score contains infinite value(s)")
    if t.dtype != np.bool_:
        if not (np.issubdtype(t.dtype, np.number)):
            raise MumicError(f"metrics: y_true must be numeric or bool, got dtype {t.dtype}")
        if np.issubdtype(t.dtype, np.floating) and np.isnan(t).any():
            raise MumicError("metrics: y_true contains NaN value(s); use 0/1 labels")
        bad = (t != 0) & (t != 1)
        if bad.any():
            example = t[bad].flat[0]
            raise MumicError(
                f"metrics: y_true must contain only 0 and 1, found {example!r} "
                f"({int(bad.sum())} bad cell(s))"
            )
        t = t == 1
    return t, s


def _check_k(k: object, name: str = "k") -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
        raise MumicError(f"metrics: {name} must be a positive integer, got {k!r}")
    if k < 1:
        raise MumicError(f"metrics: {name} must be >= 1, got {k}")
    return int(k)


def _label_index(sel: object, n_labels: int, name: str) -> np.ndarray:
    """Turn a boolean mask [C] or an index array into sorted unique label indices."""
    a = np.asarray(sel)
    if a.dtype == np.bool_:
        if a.shape != (n_labels,):
            raise MumicError(
                f"metrics: boolean {name} mask must have shape ({n_labels},), got {a.shape}"
            )
        return np.flatnonzero(a)
    if a.ndim != 1 or (a.size and not np.issubdtype(a.dtype, np.integer)):
        raise MumicError(
            f"metrics: {name} must be a boolean mask of shape ({n_labels},) or a 1-D "
            f"integer index array, got dtype {a.dtype} shape {a.shape}"
        )
    a = a.astype(np.int64)
    if a.size and (a.min() < 0 or a.max() >= n_labels):
        raise MumicError(
            f"metrics: {name} indices must lie in [0, {n_labels}), got range "
            f"[{a.min()}, {a.max()}]"
        )
    return np.unique(a)


# --------------------------------------------------------------------------- core


def _positive_blocks(
    t: np.ndarray, s: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Ranking statistics of one score vector ``s`` with relevance ``t`` (1-D).

    Returns (all scores ascending, v, n_eq, n_pos_ge, n_all_ge) where ``v`` are the
    distinct scores of the positives (ascending), ``n_eq`` the positives scoring
    exactly ``v``, ``n_pos_ge`` the positives scoring ``>= v`` and ``n_all_ge`` all
    items scoring ``>= v``. A tie block at ``v`` is retrieved as a whole, so precision
    at its end is ``n_pos_ge / n_all_ge``. Uses value sorts only (much faster than
    argsort on millions of items).
    """
    all_asc = np.sort(s)
    pos_asc = np.sort(s[t])
    n_pos = pos_asc.size
    start = np.flatnonzero(np.r_[True, pos_asc[1:] != pos_asc[:-1]]) if n_pos else \
        np.zeros(0, dtype=np.int64)
    v = pos_asc[start]
    n_eq = np.diff(np.r_[start, n_pos])
    n_pos_ge = n_pos - start
    n_all_ge = all_asc.size - np.searchsorted(all_asc, v, side="left")
    return all_asc, v, n_eq, n_pos_ge, n_all_ge


def _precision_sum(t: np.ndarray, s: np.ndarray) -> float:
    """Sum over positives of the precision at the end of their tie block (1-D inputs).

    Divided by the number of positives this is sklearn's average precision; for a
    tie-free ranking it is ``sum_i precision@i * rel_i``.
    """
    _, _, n_eq, n_pos_ge, n_all_ge = _positive_blocks(t, s)
    return float(np.sum(n_eq * (n_pos_ge / n_all_ge)))


def _best_f1_threshold(t: np.ndarray, s: np.ndarray) -> float:
    """F1-maximising threshold for one score vector (1-D); nan without a positive.

    Candidate rules are "predict ``score >= v``" for each distinct score ``v``; the
    best always sits on a positive's score (extending a cut over negatives only lowers
    F1). On equal F1 the highest ``v`` wins. The threshold is the midpoint between
    ``v`` and the next lower distinct score (0 when nothing lies below).
    """
    all_asc, v, _, n_pos_ge, n_all_ge = _positive_blocks(t, s)
    if v.size == 0:
        return float("nan")
    f1 = 2.0 * n_pos_ge / (n_all_ge + n_pos_ge[0])
    best = f1.size - 1 - int(np.argmax(f1[::-1]))  # last max in ascending v
    hi = v[best]
    below = int(np.searchsorted(all_asc, hi, side="left")) - 1
    lo = all_asc[below] if below >= 0 else 0.0
    return (float(hi) + float(lo)) / 2.0  # in float64: strictly between float32 neighbours


def _per_label(t: np.ndarray, s: np.ndarray, fn) -> np.ndarray:
    """Apply ``fn(t_col, s_col) -> float`` to every label column; returns ``[C]``."""
    t_cols = np.ascontiguousarray(t.T)
    s_cols = np.ascontiguousarray(s.T)
    return np.array([fn(t_cols[j], s_cols[j]) for j in range(t.shape[1])], dtype=np.float64)


def _top_k_mask(s: np.ndarray, k: int) -> np.ndarray:
    """Boolean [N, C] mask of each row's k highest scores; ties go to the lower label index."""
    c = s.shape[1]
    if k >= c:
        return np.ones(s.shape, dtype=bool)
    # k-th largest value per row (a partition is O(C) per row, no full sort).
    kth = np.partition(s, c - k, axis=1)[:, c - k][:, None]
    keep = s > kth
    need = k - keep.sum(axis=1)
    tied = s == kth
    # Rows where more labels tie at the k-th score than fit: keep the lowest indices.
    # (Only those rows pay for the cumulative count.)
    crowded = np.flatnonzero(tied.sum(axis=1) > need)
    if crowded.size:
        sub = tied[crowded]
        tied[crowded] = sub & (np.cumsum(sub, axis=1, dtype=np.int32) <= need[crowded, None])
    return keep | tied


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


def _nanmean(values: np.ndarray) -> float:
    values = values[~np.isnan(values)]
    return float(values.mean()) if values.size else float("nan")


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
    rare = t.sum(axis=0) < min_positives
    thr = np.where(rare, global_thr, thr)
    return np.clip(thr, _THRESHOLD_EPS, 1.0 - _THRESHOLD_EPS)


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


# --------------------------------------------------------------------------- all at once


def evaluate_scores(
    y_true: np.ndarray,
    y_score: np.ndarray,
    *,
    train_counts: np.ndarray | None = None,
    majority_n: int = 32,
    unseen: np.ndarray | None = None,
    thresholds: np.ndarray | None = None,
    ks: Sequence[int] = (1, 3, 5, 10),
) -> dict[str, float]:
    """Every metric of this module in one call, under stable keys.

    Always: ``gap10`` (GAP@10), ``gap`` (all labels), ``map_macro``, ``map_micro``,
    and ``p@k``, ``r@k``, ``f1@k`` for each k in ``ks``. With ``train_counts`` ([C]):
    ``map_majority`` and ``majority_n`` (the number of labels actually used, at most
    the number of labels). With ``thresholds`` ([C]): ``f1_micro_thr``,
    ``f1_macro_thr``, ``f1_sample_thr``.

    With ``unseen`` (mask or indices): ``zsl_map`` (unseen labels only; nan if none)
    and ``gzsl_map`` (all labels); every other metric is then computed on the SEEN
    label columns only (train_counts and thresholds are sliced to them), so the
    seen-label figures are comparable with a run that never had the unseen labels.
    """
    t, s = _check(y_true, y_score)
    c = t.shape[1]
    ks = [_check_k(k, "each of ks") for k in ks]
    counts = None if train_counts is None else _check_counts(train_counts, c)
    thr = None if thresholds is None else _check_thresholds(thresholds, c)
    n_major = _check_k(majority_n, "majority_n")
    out: dict[str, float] = {}
    cols = np.arange(c)
    if unseen is not None:
        un = _label_index(unseen, c, "unseen")
        out["zsl_map"] = _macro(t[:, un], s[:, un]) if un.size else float("nan")
        out["gzsl_map"] = _macro(t, s)
        cols = np.setdiff1d(cols, un)
        if cols.size == 0:
            raise MumicError("metrics: every label is unseen; no seen label left to evaluate")
        t, s = t[:, cols], s[:, cols]
    out["gap10"] = _gap(t, s, 10)
    out["gap"] = _gap(t, s, None)
    ap = _ap_per_label(t, s)
    out["map_macro"] = _nanmean(ap)
    if counts is not None:
        idx = majority_labels(counts[cols], n_major)
        out["map_majority"] = _nanmean(ap[idx])
        out["majority_n"] = float(idx.size)
    out["map_micro"] = out["gap"]  # identical definitions (see micro_map)
    for k in ks:
        out[f"p@{k}"], out[f"r@{k}"], out[f"f1@{k}"] = _top_k(t, s, k)
    if thr is not None:
        f = _f1_thr(t, s, thr[cols])
        out["f1_micro_thr"] = f["micro_f1"]
        out["f1_macro_thr"] = f["macro_f1"]
        out["f1_sample_thr"] = f["sample_f1"]
    return out

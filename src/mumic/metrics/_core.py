"""Input checks and the ranking primitives the metrics share (ties as in scikit-learn)."""

from __future__ import annotations

import numpy as np

from mumic.errors import MumicError

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


def _nanmean(values: np.ndarray) -> float:
    values = values[~np.isnan(values)]
    return float(values.mean()) if values.size else float("nan")

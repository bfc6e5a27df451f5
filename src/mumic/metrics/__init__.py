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
from mumic.metrics._core import _check, _check_k, _label_index, _nanmean
from mumic.metrics.ranking import (
    _ap_per_label,
    _check_counts,
    _gap,
    _macro,
    average_precision_per_label,
    gap,
    gzsl_map,
    macro_map,
    majority_labels,
    majority_map,
    micro_map,
    zsl_map,
)
from mumic.metrics.thresholds import (
    _check_thresholds,
    _f1_thr,
    _top_k,
    f1_at_k,
    f1_at_thresholds,
    fit_thresholds,
    global_fallback,
    precision_at_k,
    recall_at_k,
)

__all__ = [
    "average_precision_per_label",
    "evaluate_scores",
    "f1_at_k",
    "f1_at_thresholds",
    "fit_thresholds",
    "global_fallback",
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
) -> dict[str, float | int]:
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
    out: dict[str, float | int] = {}
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
        out["majority_n"] = int(idx.size)
    out["map_micro"] = out["gap"]  # identical definitions (see micro_map)
    for k in ks:
        out[f"p@{k}"], out[f"r@{k}"], out[f"f1@{k}"] = _top_k(t, s, k)
    if thr is not None:
        f = _f1_thr(t, s, thr[cols])
        out["f1_micro_thr"] = f["micro_f1"]
        out["f1_macro_thr"] = f["macro_f1"]
        out["f1_sample_thr"] = f["sample_f1"]
    return out


"""Tests of mumic.metrics against hand-worked cases, brute-force loops and scikit-learn."""

from __future__ import annotations

import math
from itertools import groupby

import numpy as np
import pytest
from sklearn.metrics import average_precision_score

from mumic.errors import MumicError
from mumic.metrics import (
    average_precision_per_label,
    evaluate_scores,
    f1_at_k,
    f1_at_thresholds,
    fit_thresholds,
    gap,
    gzsl_map,
    macro_map,
    majority_labels,
    majority_map,
    micro_map,
    precision_at_k,
    recall_at_k,
    zsl_map,
)

# --------------------------------------------------------------------------- references


def _top_k_labels(scores_row, k):
    """Brute force: labels of one image by (score desc, label index asc), first k."""
    ranked = sorted(range(len(scores_row)), key=lambda j: (-scores_row[j], j))
    return ranked[:k]


def _tied_ap_sum(pairs):
    """Brute force: sum over positives of precision at the end of their tie block.

    pairs: list of (score, rel). Equal scores form one block, retrieved together.
    """
    pairs = sorted(pairs, key=lambda p: -p[0])
    retrieved = hits = 0
    total = 0.0
    for _, block in groupby(pairs, key=lambda p: p[0]):
        block = list(block)
        retrieved += len(block)
        pos_in_block = sum(rel for _, rel in block)
        hits += pos_in_block
        total += pos_in_block * hits / retrieved
    return total


def ref_gap(y, s, k=None):
    n, c = y.shape
    kk = c if k is None else min(k, c)
    pairs = []
    for i in range(n):
        for j in _top_k_labels(list(s[i]), kk):
            pairs.append((float(s[i, j]), int(y[i, j])))
    positives = int(y.sum())
    return _tied_ap_sum(pairs) / positives if positives else math.nan


def ref_gap_untied(y, s, k):
    """The textbook formula sum_i P@i * rel_i / P (valid when no two scores tie)."""
    n, c = y.shape
    pairs = []
    for i in range(n):
        for j in _top_k_labels(list(s[i]), min(k, c)):
            pairs.append((float(s[i, j]), int(y[i, j])))
    pairs.sort(key=lambda p: -p[0])
    hits, acc = 0, 0.0
    for rank, (_, rel) in enumerate(pairs, start=1):
        if rel:
            hits += 1
            acc += hits / rank
    return acc / y.sum()


def _random(seed, n=40, c=7, ties=False, p=0.3):
    rng = np.random.default_rng(seed)
    y = (rng.random((n, c)) < p).astype(int)
    s = rng.random((n, c))
    if ties:
        s = np.round(s * 4) / 4  # only 5 distinct values: many ties
    return y, s


# --------------------------------------------------------------------------- GAP


def test_gap_hand_worked_two_images_three_labels():
    y = np.array([[1, 0, 1], [0, 1, 0]])
    s = np.array([[0.9, 0.8, 0.1], [0.7, 0.6, 0.2]])
    # 3 positives in total.
    # k=None: pooled 0.9(+) 0.8 0.7 0.6(+) 0.2 0.1(+)
    #   precisions at positives 1/1, 2/4, 3/6 -> (1 + 0.5 + 0.5) / 3 = 2/3
    assert gap(y, s) == pytest.approx(2 / 3)
    # k=1: image 0 keeps 0.9(+), image 1 keeps 0.7(-): pooled 0.9(+) 0.7
    #   1/1 -> 1 / 3 (the two positives never retrieved still count in the denominator)
    assert gap(y, s, k=1) == pytest.approx(1 / 3)
    # k=2: pooled 0.9(+) 0.8 0.7 0.6(+): (1 + 2/4) / 3 = 0.5
    assert gap(y, s, k=2) == pytest.approx(0.5)
    # k >= C is the same as all labels
    assert gap(y, s, k=3) == pytest.approx(2 / 3)
    assert gap(y, s, k=8) == pytest.approx(2 / 3)


def test_gap_hand_worked_ties():
    y = np.array([[1, 0], [0, 1]])
    s = np.array([[0.5, 0.5], [0.5, 0.2]])
    # k=1: each image keeps label 0 (tie in image 0 -> lower label index):
    #   pooled {0.5(+), 0.5(-)} is one block of 2 with 1 positive: 1 * 1/2; / 2 positives
    assert gap(y, s, k=1) == pytest.approx(0.25)
    # all labels: block {0.5 x3, 1 positive} -> 1 * 1/3; then 0.2(+) -> 1 * 2/4
    #   (1/3 + 1/2) / 2 = 5/12
    assert gap(y, s) == pytest.approx(5 / 12)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("ties", [False, True])
def test_gap_matches_brute_force(seed, ties):
    y, s = _random(seed, ties=ties)
    c = y.shape[1]
    for k in (1, 3, c, c + 5, None):
        assert gap(y, s, k=k) == pytest.approx(ref_gap(y, s, k), abs=1e-12), k
    if not ties:
        for k in (1, 3, c):
            assert gap(y, s, k=k) == pytest.approx(ref_gap_untied(y, s, k), abs=1e-12)


def test_gap_all_labels_equals_micro_ap():
    y, s = _random(5, ties=True)
    expected = average_precision_score(y.ravel(), s.ravel())
    assert gap(y, s) == pytest.approx(expected)
    assert micro_map(y, s) == pytest.approx(expected)


def test_gap_independent_of_image_order_even_with_ties():
    y, s = _random(7, n=60, ties=True)
    perm = np.random.default_rng(0).permutation(len(y))
    for k in (1, 3, None):
        assert gap(y[perm], s[perm], k=k) == pytest.approx(gap(y, s, k=k), abs=1e-15)


def test_gap_top_k_tie_keeps_lower_label_index():
    # All three scores tie; k=1 keeps label 0. Positive at label 0 -> perfect, at 2 -> 0.
    s = np.array([[0.4, 0.4, 0.4]])
    assert gap(np.array([[1, 0, 0]]), s, k=1) == 1.0
    assert gap(np.array([[0, 0, 1]]), s, k=1) == 0.0


def test_gap_no_positive_is_nan_and_bad_k():
    y = np.zeros((3, 4), dtype=int)
    assert math.isnan(gap(y, np.random.default_rng(0).random((3, 4))))
    with pytest.raises(MumicError, match="k must be"):
        gap(np.eye(3), np.eye(3), k=0)


def test_gap_perfect_and_offset_sensitivity():
    y, s = _random(11, n=50, c=6)
    assert gap(y, y + 0.0) == 1.0
    # A per-label score offset keeps every column's ranking (so per-label AP) but
    # reorders the pooled list, so GAP moves: why the two are reported together.
    offset = np.arange(y.shape[1]) * 10.0
    assert macro_map(y, s + offset) == pytest.approx(macro_map(y, s))
    assert gap(y, s + offset) != pytest.approx(gap(y, s))


# --------------------------------------------------------------------------- mAP


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("ties", [False, True])
def test_per_label_ap_matches_sklearn(seed, ties):
    y, s = _random(seed, n=80, c=9, ties=ties)
    y[:, 4] = 0  # a label with no positive
    ap = average_precision_per_label(y, s)
    assert ap.shape == (9,)
    assert math.isnan(ap[4])
    for j in range(9):
        if j != 4:
            assert ap[j] == pytest.approx(average_precision_score(y[:, j], s[:, j]), abs=1e-12)
    keep = [j for j in range(9) if j != 4]
    expected_macro = np.mean([average_precision_score(y[:, j], s[:, j]) for j in keep])
    assert macro_map(y, s) == pytest.approx(expected_macro, abs=1e-12)
    assert macro_map(y, s) == pytest.approx(
        average_precision_score(y[:, keep], s[:, keep], average="macro"), abs=1e-12
    )
    assert micro_map(y, s) == pytest.approx(
        average_precision_score(y, s, average="micro"), abs=1e-12
    )


def test_per_label_ap_non_contiguous_and_float32_input():
    y, s = _random(3, n=50, c=11, ties=True)
    full = average_precision_per_label(y, s)
    np.testing.assert_allclose(
        average_precision_per_label(np.asfortranarray(y), np.asfortranarray(s)), full
    )
    # scores that tie in float64 still tie in float32: identical APs
    np.testing.assert_allclose(average_precision_per_label(y, s.astype(np.float32)), full)
    # a strided column view gives the APs of those columns
    np.testing.assert_allclose(average_precision_per_label(y[:, ::3], s[:, ::3]), full[::3])


def test_macro_map_hand_worked_and_no_positive():
    y = np.array([[1, 0, 0], [0, 1, 0], [1, 0, 0]])
    s = np.array([[0.9, 0.2, 0.1], [0.8, 0.7, 0.3], [0.1, 0.6, 0.5]])
    # label 0: scores 0.9(+) 0.8 0.1(+) -> (1/1 + 2/3) / 2 = 5/6
    # label 1: 0.7(+) 0.6 0.2 -> 1
    # label 2: no positive -> skipped
    assert macro_map(y, s) == pytest.approx((5 / 6 + 1) / 2)
    assert math.isnan(macro_map(np.zeros((2, 2)), np.ones((2, 2))))


def test_majority_labels_selection_and_ties():
    counts = np.array([5, 10, 5, 0, 10, 7])
    # 10 (labels 1, 4: lower index first), then 7 (5), then 5 (0, 2), then 0 (3)
    np.testing.assert_array_equal(majority_labels(counts, 3), [1, 4, 5])
    np.testing.assert_array_equal(majority_labels(counts, 4), [1, 4, 5, 0])
    np.testing.assert_array_equal(majority_labels(counts, 100), [1, 4, 5, 0, 2, 3])
    with pytest.raises(MumicError, match="train_counts"):
        majority_labels(np.array([[1, 2]]), 1)
    with pytest.raises(MumicError, match=">= 0"):
        majority_labels(np.array([1, -2]), 1)


def test_majority_map():
    y, s = _random(4, n=60, c=6)
    counts = np.array([3, 50, 8, 50, 1, 9])
    idx = [1, 3, 5]
    assert majority_map(y, s, counts, n=3) == pytest.approx(macro_map(y[:, idx], s[:, idx]))
    # C <= n: all labels
    assert majority_map(y, s, counts, n=6) == pytest.approx(macro_map(y, s))
    assert majority_map(y, s, counts) == pytest.approx(macro_map(y, s))
    with pytest.raises(MumicError, match="train_counts has shape"):
        majority_map(y, s, counts[:5])


# --------------------------------------------------------------------------- top-k


def _ref_topk(y, s, k):
    n, c = y.shape
    kk = min(k, c)
    precisions, recalls, f1s = [], [], []
    for i in range(n):
        top = _top_k_labels(list(s[i]), kk)
        hits = sum(int(y[i, j]) for j in top)
        npos = int(y[i].sum())
        p = hits / kk
        precisions.append(p)
        if npos:
            r = hits / npos
            recalls.append(r)
            f1s.append(0.0 if hits == 0 else 2 * p * r / (p + r))
    return np.mean(precisions), np.mean(recalls), np.mean(f1s)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("ties", [False, True])
def test_precision_recall_f1_at_k_match_brute_force(seed, ties):
    y, s = _random(seed, n=50, c=8, ties=ties)
    y[0] = 0  # an image without positives: counts for precision, not recall/F1
    for k in (1, 3, 8, 12):
        p, r, f = _ref_topk(y, s, k)
        assert precision_at_k(y, s, k) == pytest.approx(p, abs=1e-12)
        assert recall_at_k(y, s, k) == pytest.approx(r, abs=1e-12)
        assert f1_at_k(y, s, k) == pytest.approx(f, abs=1e-12)


def test_topk_hand_worked():
    y = np.array([[1, 0, 1], [0, 1, 0]])
    s = np.array([[0.9, 0.8, 0.1], [0.7, 0.6, 0.2]])
    # k=1: hits 1, 0 -> P = (1 + 0)/2 = 0.5; R = (1/2 + 0/1)/2 = 0.25
    #   F1 image 0 = 2*1/(1+2) = 2/3, image 1 = 0 -> 1/3
    assert precision_at_k(y, s, 1) == pytest.approx(0.5)
    assert recall_at_k(y, s, 1) == pytest.approx(0.25)
    assert f1_at_k(y, s, 1) == pytest.approx(1 / 3)
    # k=2: hits 1, 1 -> P = 0.5, R = (1/2 + 1)/2 = 0.75, F1 = (2/4 + 2/3)/2 = 7/12
    assert precision_at_k(y, s, 2) == pytest.approx(0.5)
    assert recall_at_k(y, s, 2) == pytest.approx(0.75)
    assert f1_at_k(y, s, 2) == pytest.approx(7 / 12)
    assert math.isnan(recall_at_k(np.zeros((2, 3)), s, 1))


# --------------------------------------------------------------------------- thresholds


def _f1_binary(y, pred):
    tp = np.sum(y & pred)
    return 2 * tp / (y.sum() + pred.sum())


def test_fit_thresholds_hand_worked():
    col0_s = np.array([0.9, 0.8, 0.7, 0.6, 0.3, 0.2])
    col0_y = np.array([1, 1, 0, 1, 0, 0])
    # cuts (predict >= s): F1 = 2tp / (#pred + 3)
    #   0.9: 2/4  0.8: 4/5  0.7: 4/6  0.6: 6/7 (best)  0.3: 6/8  0.2: 6/9
    # threshold = midpoint of 0.6 and the next lower score 0.3 = 0.45
    col1_s = np.array([0.95, 0.9, 0.85, 0.8, 0.75, 0.7])
    col1_y = np.array([1, 1, 1, 1, 1, 1])
    # every image positive: best is "predict all" -> midpoint of 0.7 and 0 = 0.35
    y = np.stack([col0_y, col1_y], axis=1)
    s = np.stack([col0_s, col1_s], axis=1)
    thr = fit_thresholds(y, s, min_positives=3)
    assert thr == pytest.approx([0.45, 0.35])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fit_thresholds_maximise_f1(seed):
    rng = np.random.default_rng(seed)
    n, c = 120, 6
    y = (rng.random((n, c)) < 0.3).astype(int)
    s = np.clip(0.35 * y + 0.65 * rng.random((n, c)), 0, 1)
    s = np.round(s, 2)  # ties
    thr = fit_thresholds(y, s, min_positives=3)
    yb = y.astype(bool)
    for j in range(c):
        best = max(_f1_binary(yb[:, j], s[:, j] >= cand) for cand in np.unique(s[:, j]))
        got = _f1_binary(yb[:, j], s[:, j] >= thr[j])
        assert got == pytest.approx(best), j
        # the threshold sits strictly between validation scores
        assert not np.any(np.isclose(s[:, j], thr[j]))
        assert 0 < thr[j] < 1


def test_fit_thresholds_fallbacks():
    rng = np.random.default_rng(0)
    n = 100
    y = np.zeros((n, 4), dtype=int)
    y[:40, 0] = 1
    y[:30, 1] = 1
    y[0, 2] = 1  # rare label: 1 positive
    # label 3: no positive
    s = np.clip(0.4 * y + 0.6 * rng.random((n, 4)), 0, 1)
    thr = fit_thresholds(y, s, min_positives=3)
    # the fallback is the micro-F1-optimal global threshold, the same rule on all cells
    glob = fit_thresholds(y.reshape(-1, 1), s.reshape(-1, 1), min_positives=1)[0]
    assert thr[2] == pytest.approx(glob)
    assert thr[3] == pytest.approx(glob)
    flat_best = max(
        _f1_binary(y.ravel().astype(bool), s.ravel() >= cand) for cand in np.unique(s)
    )
    assert _f1_binary(y.ravel().astype(bool), s.ravel() >= glob) == pytest.approx(flat_best)
    # frequent labels get their own threshold
    own = fit_thresholds(y[:, :1], s[:, :1])[0]
    assert thr[0] == pytest.approx(own)
    # nothing positive anywhere: the default
    assert fit_thresholds(np.zeros((5, 3)), rng.random((5, 3)), default=0.3) == pytest.approx(
        [0.3, 0.3, 0.3]
    )


def test_fit_thresholds_float32_neighbours_stay_separated():
    hi = np.float32(0.5)
    lo = np.nextafter(hi, np.float32(0))  # adjacent float32 values
    y = np.array([[1], [1], [1], [0]])
    s = np.array([[0.9], [0.8], [hi], [lo]], dtype=np.float32)
    thr = fit_thresholds(y, s)[0]
    assert lo < thr < hi
    assert f1_at_thresholds(y, s, [thr])["micro_f1"] == 1.0


def test_fit_thresholds_rejects_logits():
    with pytest.raises(MumicError, match="probabilities"):
        fit_thresholds(np.eye(3), np.eye(3) * 5 - 1)


def test_f1_at_thresholds_hand_worked():
    y = np.array([[1, 0, 1], [0, 1, 0], [0, 0, 0]])
    s = np.array([[0.9, 0.6, 0.2], [0.4, 0.7, 0.1], [0.8, 0.1, 0.1]])
    thr = np.array([0.5, 0.5, 0.5])
    # predictions: [1,1,0], [0,1,0], [1,0,0]
    # micro: tp = 2 (cell 0,0 and 1,1), pred = 4, pos = 3 -> 4/7
    # per label: l0 tp1 pred2 pos1 -> 2/3; l1 tp1 pred2 pos1 -> 2/3; l2 tp0 pred0 pos1 -> 0
    #   macro = (2/3 + 2/3 + 0)/3 = 4/9
    # per image (with positives): img0 tp1 pred2 pos2 -> 1/2; img1 tp1 pred1 pos1 -> 1
    #   sample = 3/4
    f = f1_at_thresholds(y, s, thr)
    assert f["micro_f1"] == pytest.approx(4 / 7)
    assert f["macro_f1"] == pytest.approx(4 / 9)
    assert f["sample_f1"] == pytest.approx(3 / 4)
    assert f1_at_thresholds(y, s, 0.5) == f
    with pytest.raises(MumicError, match="thresholds has shape"):
        f1_at_thresholds(y, s, np.array([0.5, 0.5]))


# --------------------------------------------------------------------------- zero-shot


def test_zsl_and_gzsl_constructed():
    y = np.array([[1, 0, 1, 0], [0, 1, 0, 1], [1, 0, 0, 1], [0, 1, 1, 0]])
    s = np.array(
        [
            [0.9, 0.1, 0.8, 0.3],
            [0.2, 0.8, 0.4, 0.6],
            [0.7, 0.3, 0.5, 0.2],
            [0.1, 0.9, 0.3, 0.9],
        ]
    )
    # labels 0, 1 (seen) rank perfectly: AP 1 each.
    # label 2 (unseen): 0.8(+) 0.5 0.4 0.3(+) -> (1 + 2/4)/2 = 3/4
    # label 3 (unseen): 0.9 0.6(+) 0.3 0.2(+) -> (1/2 + 2/4)/2 = 1/2
    unseen_mask = np.array([False, False, True, True])
    assert zsl_map(y, s, unseen_mask) == pytest.approx((3 / 4 + 1 / 2) / 2)
    assert zsl_map(y, s, np.array([2, 3])) == pytest.approx(5 / 8)
    assert gzsl_map(y, s, unseen_mask) == pytest.approx((1 + 1 + 3 / 4 + 1 / 2) / 4)
    with pytest.raises(MumicError, match="unseen"):
        zsl_map(y, s, np.array([True, False]))
    with pytest.raises(MumicError, match="unseen"):
        zsl_map(y, s, np.array([7]))


# --------------------------------------------------------------------------- evaluate_scores


def test_evaluate_scores_keys_and_values():
    y, s = _random(9, n=70, c=12)
    counts = np.arange(12)[::-1] * 3
    thr = fit_thresholds(y, s)
    out = evaluate_scores(y, s, train_counts=counts, majority_n=4, thresholds=thr, ks=(1, 5))
    assert set(out) == {
        "gap10", "gap", "map_macro", "map_majority", "majority_n", "map_micro",
        "p@1", "r@1", "f1@1", "p@5", "r@5", "f1@5",
        "f1_micro_thr", "f1_macro_thr", "f1_sample_thr",
    }
    assert all(isinstance(v, int) if k == "majority_n" else isinstance(v, float) for k, v in out.items())  # counts stay integers
    assert out["gap10"] == pytest.approx(gap(y, s, k=10))
    assert out["gap"] == pytest.approx(gap(y, s))
    assert out["map_macro"] == pytest.approx(macro_map(y, s))
    assert out["map_majority"] == pytest.approx(macro_map(y[:, :4], s[:, :4]))
    assert out["majority_n"] == 4.0
    assert out["p@5"] == pytest.approx(precision_at_k(y, s, 5))
    assert out["f1_micro_thr"] == pytest.approx(f1_at_thresholds(y, s, thr)["micro_f1"])
    assert set(evaluate_scores(y, s)) == {
        "gap10", "gap", "map_macro", "map_micro",
        *(f"{m}@{k}" for m in ("p", "r", "f1") for k in (1, 3, 5, 10)),
    }


def test_evaluate_scores_unseen_uses_seen_columns():
    y, s = _random(10, n=60, c=8)
    unseen = np.array([1, 6])
    seen = [0, 2, 3, 4, 5, 7]
    counts = np.array([9, 100, 8, 7, 6, 5, 100, 4])
    out = evaluate_scores(y, s, unseen=unseen, train_counts=counts, majority_n=3)
    assert out["zsl_map"] == pytest.approx(macro_map(y[:, unseen], s[:, unseen]))
    assert out["gzsl_map"] == pytest.approx(macro_map(y, s))
    assert out["gap"] == pytest.approx(gap(y[:, seen], s[:, seen]))
    assert out["map_macro"] == pytest.approx(macro_map(y[:, seen], s[:, seen]))
    # majority set among seen labels: counts 9, 8, 7 -> labels 0, 2, 3
    assert out["map_majority"] == pytest.approx(macro_map(y[:, [0, 2, 3]], s[:, [0, 2, 3]]))
    assert out["p@3"] == pytest.approx(precision_at_k(y[:, seen], s[:, seen], 3))


def test_evaluate_scores_unseen_slices_thresholds_and_validates():
    y, s = _random(12, n=40, c=5)
    thr = np.array([0.5, 0.99, 0.5, 0.5, 0.01])
    out = evaluate_scores(y, s, unseen=np.array([1]), thresholds=thr)
    seen = [0, 2, 3, 4]
    expected = f1_at_thresholds(y[:, seen], s[:, seen], thr[seen])
    assert out["f1_micro_thr"] == pytest.approx(expected["micro_f1"])
    assert out["f1_macro_thr"] == pytest.approx(expected["macro_f1"])
    with pytest.raises(MumicError, match="ks"):
        evaluate_scores(y, s, ks=(0,))
    with pytest.raises(MumicError, match="thresholds has shape"):
        evaluate_scores(y, s, thresholds=thr[:3])
    with pytest.raises(MumicError, match="every label is unseen"):
        evaluate_scores(y, s, unseen=np.ones(5, dtype=bool))


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "y, s, match",
    [
        (np.ones((3, 4)), np.ones((3, 5)), "does not match"),
        (np.ones(4), np.ones(4), "2-D"),
        (np.ones((0, 4)), np.ones((0, 4)), "empty"),
        (np.ones((2, 2)), np.array([[0.1, np.nan], [0.2, 0.3]]), "NaN"),
        (np.ones((2, 2)), np.array([[0.1, np.inf], [0.2, 0.3]]), "infinite"),
        (np.array([[1, 2], [0, 1]]), np.ones((2, 2)), "only 0 and 1"),
        (np.array([[1.0, np.nan], [0, 1]]), np.ones((2, 2)), "y_true contains NaN"),
    ],
)
def test_bad_inputs_raise(y, s, match):
    for fn in (gap, macro_map, micro_map, average_precision_per_label):
        with pytest.raises(MumicError, match=match):
            fn(y, s)
    with pytest.raises(MumicError, match=match):
        precision_at_k(y, s, 1)
    with pytest.raises(MumicError, match=match):
        evaluate_scores(y, s)


def test_bool_and_float_labels_accepted():
    y, s = _random(2)
    assert gap(y.astype(bool), s) == gap(y.astype(float), s) == gap(y, s)
    assert gap(y, s.astype(np.float32)) == pytest.approx(gap(y, s), abs=1e-6)

"""Suspect scores from out-of-fold probabilities.

For row i and label c let l = logit(p_ic) be the out-of-fold log-odds, y_ic = 1 where the
manifest lists c on i, t_c the label's calibrated threshold (max F1 on validation, from
the fold that scored the row) and pi_c the label's prior (the fraction of audited rows
that list it). Every rule gives one evidence E(i, c), the log-odds that label c applies
to image i, and

    missing(i, c) = E(i, c)       for an unlisted, not explicitly negative cell
    wrong(i, c)   = -E(i, c)      for a listed cell

so a score s > 0 means the rule decides against the manifest. Three rules:

``neighbours`` (default): the model's log-odds plus the votes of the row's look-alikes.
Rows are compared by

    sim(i, j) = 1/2 cos(z_i, z_j) + 1/2 cos(y_i, y_j)

where z_i is the row's out-of-fold logit vector standardized per label (what the model
sees in the image) and y_i its listed-label vector (what the catalogue says); N(i) are the
k = 10 most similar other audited rows, v_ic = (sum_{j in N(i)} y_jc + pi_c) / (k + 1) the
rate at which they list c (one pseudo-row at the prior), and

    E(i, c) = l + lambda (logit(v_ic) - logit(pi_c)),     lambda = 1/2

i.e. the model's log-odds plus a damped log-likelihood ratio of the neighbours' votes:
how much more (or less) often the row's look-alikes list c than the label's base rate.
A tag dropped from one image is usually still listed on its look-alikes, and a tag added
by mistake usually is not. k, lambda and the 1/2 mix were chosen on a development seed of
the noise study (docs/results/noise), not on its reported seeds.

``margin``: the log odds ratio between the image and the label's decision point,
E(i, c) = l - logit(t_c); its odds are e^s times past the threshold odds.

``llr``: the posterior log-odds from the label's own score distributions. The logits of
the cells that list c and of those that do not are each modelled as a Gaussian
N(mu_1c, s_1c), N(mu_0c, s_0c) (stds floored, pooled over labels where a label has fewer
than 5 listed cells), and E(i, c) = log N(l; mu_1c, s_1c) - log N(l; mu_0c, s_0c) + logit(pi_c),
a log-likelihood ratio plus the prior log-odds.

Two more kinds, from the same scores: ``swapped`` rows, every listed label of which is
wrong (> 0) while some unlisted label is missing (> 0), scored by the smaller of the two
(the weakest evidence of the pair); and ``outlier`` cells, a listed label whose logit is
far below the label's other listed images (robust z = (l - median) / (1.4826 MAD) < -3,
score -z). With a prompt head, a label's logits order its images as their cosine to the
label's class text embedding does, so this flags an image that looks like no other
image of its label to the text side.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from mumic.audit.folds import OOF
from mumic.errors import ConfigError

METHODS = ("neighbours", "margin", "llr")
NEIGHBOURS_K = 10
NEIGHBOURS_WEIGHT = 0.5
BLOCK = 2048  # rows of the similarity matrix held at once
KINDS = ("missing", "wrong", "swapped", "outlier")
EPS = 1e-6


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(p, np.float64), EPS, 1 - EPS)
    return np.log(p) - np.log1p(-p)


@dataclass
class Scores:
    """Per-cell suspect scores of the audited rows ([N, C]; NaN where a cell is no candidate)."""

    missing: np.ndarray
    wrong: np.ndarray
    listed: np.ndarray  # [N, C] bool
    negative: np.ndarray  # [N, C] bool: explicit negatives (never missing-tag candidates)
    prior: np.ndarray  # [C]
    method: str


def listed_cells(oof: OOF) -> tuple[np.ndarray, np.ndarray]:
    """Listed labels and explicit negatives of the audited rows, over oof.names."""
    m = oof.manifest.select(oof.rows)
    y, known = m.targets(oof.names, unlisted="unknown", ignore_unknown=True)
    listed = y > 0.5
    return listed, known & ~listed


def _gauss(x: np.ndarray, mu: np.ndarray, sd: np.ndarray) -> np.ndarray:
    return -0.5 * ((x - mu) / sd) ** 2 - np.log(sd)


def _llr(l: np.ndarray, listed: np.ndarray, prior: np.ndarray) -> np.ndarray:
    pos_n = listed.sum(0)
    neg = ~listed
    pooled1 = float(l[listed].std()) if listed.any() else 1.0
    mu1 = np.where(pos_n > 0, np.nansum(np.where(listed, l, 0), 0) / np.maximum(pos_n, 1), float(l[listed].mean()) if listed.any() else 0.0)
    var1 = np.nansum(np.where(listed, (l - mu1) ** 2, 0), 0) / np.maximum(pos_n - 1, 1)
    sd1 = np.where(pos_n >= 5, np.sqrt(var1), pooled1)
    neg_n = neg.sum(0)
    mu0 = np.nansum(np.where(neg, l, 0), 0) / np.maximum(neg_n, 1)
    sd0 = np.sqrt(np.nansum(np.where(neg, (l - mu0) ** 2, 0), 0) / np.maximum(neg_n - 1, 1))
    sd1, sd0 = np.maximum(sd1, 0.25), np.maximum(sd0, 0.25)
    return _gauss(l, mu1, sd1) - _gauss(l, mu0, sd0) + _logit(prior)[None, :]


def _unit_rows(x: np.ndarray, standardize: bool) -> np.ndarray:
    x = np.asarray(x, np.float64)
    if standardize:
        x = (x - x.mean(0)) / (x.std(0) + 1e-6)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def neighbour_votes(l: np.ndarray, listed: np.ndarray, prior: np.ndarray, k: int = NEIGHBOURS_K) -> np.ndarray:
    """v_ic of the ``neighbours`` rule: the smoothed rate at which row i's k most similar other rows list c."""
    n = len(l)
    k = min(k, n - 1)
    if k < 1:
        return np.broadcast_to(prior, l.shape).copy()
    z, y = _unit_rows(l, True), _unit_rows(listed.astype(np.float64), False)
    yf = listed.astype(np.float64)
    votes = np.empty(l.shape, np.float64)
    for a in range(0, n, BLOCK):
        b = min(a + BLOCK, n)
        sim = 0.5 * (z[a:b] @ z.T) + 0.5 * (y[a:b] @ y.T)
        sim[np.arange(b - a), np.arange(a, b)] = -np.inf  # not its own neighbour
        order = np.argsort(-sim, axis=1, kind="stable")[:, :k]  # the k most similar; ties by row order
        votes[a:b] = yf[order].sum(1)
    return (votes + prior[None, :]) / (k + 1)


def score_cells(oof: OOF, method: str = "neighbours", *, k: int = NEIGHBOURS_K) -> Scores:
    """Missing-tag and wrong-tag scores of every candidate cell (see the module docstring)."""
    if method not in METHODS:
        raise ConfigError(f"unknown score {method!r}; choose one of {', '.join(METHODS)}")
    listed, negative = listed_cells(oof)
    prior = np.clip(listed.mean(0), EPS, 1 - EPS)
    l = _logit(oof.probs)
    if method == "margin":
        evidence = l - _logit(oof.thresholds)
    elif method == "llr":
        evidence = _llr(l, listed, prior)
    else:
        v = np.clip(neighbour_votes(l, listed, prior, k), EPS, 1 - EPS)
        evidence = l + NEIGHBOURS_WEIGHT * (_logit(v) - _logit(prior)[None, :])
    missing = np.where(~listed & ~negative, evidence, np.nan)
    wrong = np.where(listed, -evidence, np.nan)
    return Scores(missing=missing, wrong=wrong, listed=listed, negative=negative, prior=prior, method=method)


def _robust_z(l: np.ndarray, listed: np.ndarray) -> np.ndarray:
    z = np.full(l.shape, np.nan)
    for c in range(l.shape[1]):
        rows = np.flatnonzero(listed[:, c])
        if len(rows) < 5:
            continue
        v = l[rows, c]
        med = np.median(v)
        mad = 1.4826 * np.median(np.abs(v - med))
        z[rows, c] = (v - med) / max(mad, 1e-3)
    return z


def suspects(oof: OOF, scores: Scores, *, outlier_z: float = 3.0, max_per_kind: int | None = None) -> list[dict[str, Any]]:
    """The suspects table: every candidate cell with a positive score, by kind, most suspicious first.

    Columns: image, label, kind, score, oof_probability, rank (1 = most suspicious of its
    kind), threshold, suggested (swapped rows: the unlisted labels that look right).
    """
    images = [str(oof.manifest.images[i]) for i in oof.rows]
    names = oof.names
    out: list[dict[str, Any]] = []

    def add(kind: str, items: Sequence[tuple[float, int, int | None, str, float, float, str]]) -> None:
        items = list(items)
        items.sort(key=lambda t: (-t[0], t[1], t[2] if t[2] is not None else -1))
        for rank, (s, i, _, label, p, th, suggested) in enumerate(items[:max_per_kind] if max_per_kind else items, 1):
            out.append({"image": images[i], "label": label, "kind": kind, "score": round(float(s), 4),
                        "oof_probability": round(float(p), 4), "rank": rank, "threshold": round(float(th), 4),
                        "suggested": suggested})

    for kind, mat in (("missing", scores.missing), ("wrong", scores.wrong)):
        ii, cc = np.nonzero(np.nan_to_num(mat, nan=-np.inf) > 0)
        add(kind, [(mat[i, c], int(i), int(c), names[c], oof.probs[i, c], oof.thresholds[i, c], "") for i, c in zip(ii, cc)])
    swapped = []
    for i in range(len(images)):
        cols = np.flatnonzero(scores.listed[i])
        if not len(cols):
            continue
        worst_listed = float(np.min(scores.wrong[i, cols]))
        row_missing = np.nan_to_num(scores.missing[i], nan=-np.inf)
        best = float(row_missing.max()) if row_missing.size else -np.inf
        if worst_listed > 0 and best > 0:
            order = [c for c in np.argsort(-row_missing)[:5] if row_missing[c] > 0]
            swapped.append((min(worst_listed, best), i, None, "|".join(names[c] for c in cols),
                            float(np.mean(oof.probs[i, cols])), float(np.mean(oof.thresholds[i, cols])),
                            "|".join(names[c] for c in order)))
    add("swapped", swapped)
    z = _robust_z(_logit(oof.probs), scores.listed)
    ii, cc = np.nonzero(np.nan_to_num(z, nan=0.0) < -outlier_z)
    add("outlier", [(-z[i, c], int(i), int(c), names[c], oof.probs[i, c], oof.thresholds[i, c], "") for i, c in zip(ii, cc)])
    return out

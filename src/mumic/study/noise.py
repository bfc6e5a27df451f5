"""Label noise for the ``noisy`` cells: the *training* rows only, deterministic given the
seed (the same noisy labels for every cell of that seed, so cells compare on the same data).

``drop_positives`` x P of the P true training positives are dropped at random (a row keeps
at least one label), and ``add_false_positives`` x P false positives are added at random
(row, trained label) cells that were negative. ``verified_negatives`` x N of each row's N
remaining true negatives are listed as explicit negatives (what an annotator who checked
them would give), so ``unlisted: unknown`` has negatives to learn from while the dropped
positives stay unknown. Validation and test rows are untouched.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from mumic.data.manifest import SEPARATOR


def train_rows(n: int, splits: list[str] | None) -> np.ndarray:
    """Rows that training reads: split 'train', or every row where there is none (as training does)."""
    if splits is None or "train" not in set(splits):
        return np.ones(n, bool)
    return np.array([s == "train" for s in splits], bool)


def add_label_noise(labels: list[list[str]], negatives: list[list[str]] | None, vocabulary: list[str], rows: np.ndarray,
                    drop_positives: float, add_false_positives: float, seed: int,
                    verified_negatives: float = 0.0) -> tuple[list[list[str]], dict[str, Any]]:
    """Noisy copies of `labels` on the rows where `rows` is True (others are unchanged).

    round(drop_positives x P) of the P true positives in those rows are dropped, at random
    among all but one random label of each row (a manifest row needs a label, so a
    one-label row keeps its label); then round(add_false_positives x P) labels from
    `vocabulary` are added at random cells that were neither positive nor an explicit
    negative. Deterministic given `seed`.

    With `verified_negatives` > 0, stats["negatives"] holds each row's explicit negatives:
    the given ones plus round(verified_negatives x N) of the row's N true negatives that
    did not become false positives (drawn from their own random stream, so the noisy
    labels do not depend on it).
    """
    rng = np.random.default_rng([int(seed), 0x6E6F6973])
    out = [list(l) for l in labels]
    idx = np.flatnonzero(rows)
    positives = sum(len(labels[i]) for i in idx)
    # every row keeps one random label (a manifest row needs one); the others may go
    droppable = []
    for i in idx:
        if len(labels[i]) > 1:
            anchor = int(rng.integers(len(labels[i])))
            droppable += [(int(i), j) for j in range(len(labels[i])) if j != anchor]
    want_drop = min(int(round(drop_positives * positives)), len(droppable))
    gone: dict[int, set[int]] = {}
    for k in rng.choice(len(droppable), size=want_drop, replace=False) if want_drop else []:
        row, j = droppable[int(k)]
        gone.setdefault(row, set()).add(j)
    for row, js in gone.items():
        out[row] = [l for j, l in enumerate(labels[row]) if j not in js]
    dropped = want_drop
    added = 0
    want = int(round(add_false_positives * positives))
    if want and len(idx) and vocabulary:
        col = {n: j for j, n in enumerate(vocabulary)}
        taken = np.zeros((len(idx), len(vocabulary)), bool)
        for r, i in enumerate(idx):
            for l in labels[i] + (negatives[i] if negatives is not None else []):
                if l in col:
                    taken[r, col[l]] = True
        free = np.flatnonzero(~taken.ravel())
        pick = np.sort(rng.choice(free, size=min(want, len(free)), replace=False))
        for flat in pick:
            r, j = divmod(int(flat), len(vocabulary))
            out[idx[r]].append(vocabulary[j])
        added = len(pick)
    verified = 0
    neg_out = [list(n) for n in negatives] if negatives is not None else [[] for _ in labels]
    if verified_negatives > 0:
        vrng = np.random.default_rng([int(seed), 0x76657269])
        for i in idx:
            seen = set(labels[i]) | set(out[i]) | set(neg_out[i])
            pool = [l for l in vocabulary if l not in seen]
            k = int(round(verified_negatives * len(pool)))
            if k:
                chosen = sorted(vrng.choice(len(pool), size=k, replace=False))
                neg_out[i] += [pool[j] for j in chosen]
                verified += k
    stats: dict[str, Any] = {"train_rows": int(len(idx)), "positives": int(positives), "dropped": dropped, "added": added,
             "verified_negatives_listed": verified, "verified_negatives": verified_negatives,
             "drop_rate": dropped / positives if positives else 0.0,
             "false_positive_rate": added / positives if positives else 0.0, "seed": int(seed),
             "drop_positives": drop_positives, "add_false_positives": add_false_positives}
    if verified_negatives > 0:
        stats["negatives"] = neg_out
    return out, stats


def noisy_tag(noisy: dict[str, float], seed: int) -> str:
    """The part of a noisy manifest's file name that names its noise and seed."""
    verified = noisy.get("verified_negatives", 0.0)
    return (f"noisy-d{noisy['drop_positives']:g}-a{noisy['add_false_positives']:g}"
            + (f"-v{verified:g}" if verified else "") + f"-s{seed}")


def noisy_frame(df: Any, m: Any, vocabulary: list[str], noisy: dict[str, float], seed: int) -> tuple[Any, dict[str, Any]]:
    """The manifest frame `df` (rows of the parsed manifest `m`) with noisy training labels
    (and the verified negatives listed), and the noise statistics."""

    labels, stats = add_label_noise(list(m.labels), m.negatives, vocabulary, train_rows(len(m), m.splits),
                                    noisy["drop_positives"], noisy["add_false_positives"], seed,
                                    verified_negatives=noisy.get("verified_negatives", 0.0))
    df["labels"] = [SEPARATOR.join(l) for l in labels]
    if "negatives" in stats:
        df["negatives"] = [SEPARATOR.join(n) for n in stats.pop("negatives")]
    return df, stats

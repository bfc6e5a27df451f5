"""The labels of EmojiTags: base emoji and their English CLDR keywords from emojibase,
the label vocabulary, the labels held out as unseen, and the splits."""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mumic.data.emoji.sources import _Archive
from mumic.data.labels import SEPARATOR
from mumic.errors import EmojiSourceError

SPLITS = (("train", 0.70), ("val", 0.10), ("test", 0.20))
UNSEEN_FRACTION = 0.25
MIN_COUNT = 10

_EMOJIBASE_DATA = "package/en/data.json"
_COMPONENT_GROUP = 2  # emojibase group of skin-tone and hair-style swatches
_SKIN_TONES = frozenset({"1F3FB", "1F3FC", "1F3FD", "1F3FE", "1F3FF"})
_HEXCODE = re.compile(r"^[0-9A-F]{1,6}(-[0-9A-F]{1,6})*$")


def _norm(hexcode: str) -> str:
    """A hexcode for joining sources: upper case, without the FE0F variation selector."""
    return "-".join(p for p in hexcode.strip().upper().replace("_", "-").split("-") if p and p != "FE0F")


@dataclass
class Emoji:
    """One base emoji: its emojibase hexcode and name, cleaned CLDR tags, and artwork."""

    hexcode: str
    name: str
    tags: list[str]
    order: int
    art: dict[str, str] = field(default_factory=dict)  # style -> archive member
    labels: list[str] = field(default_factory=list)


def _clean_tags(raw: Any) -> list[str]:
    out: list[str] = []
    for t in raw or ():
        if isinstance(t, str):
            t = t.strip().lower()
            if t and t not in out:
                out.append(t)
    return out


def load_base_emoji(archive: _Archive) -> list[Emoji]:
    """Base emoji from emojibase ``en/data.json``: neither skin-tone variants (emojibase
    nests those under ``skins``) nor components (tone and hair swatches) nor the bare
    regional indicators (which have no group)."""
    data = archive.read_json(_EMOJIBASE_DATA)
    if not isinstance(data, list):
        raise EmojiSourceError(f"{archive.path}: {_EMOJIBASE_DATA} is not a list of emoji")
    out: list[Emoji] = []
    seen: set[str] = set()
    for i, entry in enumerate(data):
        if not isinstance(entry, dict) or not isinstance(entry.get("hexcode"), str):
            raise EmojiSourceError(f"{archive.path}: {_EMOJIBASE_DATA} entry {i} has no hexcode")
        hexcode = entry["hexcode"].strip().upper()
        group = entry.get("group")
        if group is None or group == _COMPONENT_GROUP or "tone" in entry:
            continue
        if not _HEXCODE.match(hexcode) or _SKIN_TONES & set(hexcode.split("-")):
            continue
        if _norm(hexcode) in seen:
            continue
        seen.add(_norm(hexcode))
        order = entry.get("order")
        out.append(
            Emoji(
                hexcode=hexcode,
                name=str(entry.get("label") or hexcode),
                tags=_clean_tags(entry.get("tags")),
                order=int(order) if isinstance(order, (int, float)) else len(data) + i,
            )
        )
    out.sort(key=lambda e: e.order)
    return out


def label_vocabulary(tag_lists: Iterable[Sequence[str]], min_count: int = MIN_COUNT) -> tuple[list[str], list[str]]:
    """The sorted labels that occur in at least ``min_count`` tag lists, and the sorted
    frequent tags left out because they contain the manifest separator ``|``."""
    counts: Counter[str] = Counter()
    for tags in tag_lists:
        counts.update(set(tags))
    frequent = {t for t, n in counts.items() if n >= min_count}
    bad = sorted(t for t in frequent if SEPARATOR in t)
    return sorted(frequent - set(bad)), bad


def choose_unseen(labels: Sequence[str], fraction: float = UNSEEN_FRACTION, seed: int = 0) -> list[str]:
    """A deterministic, seeded choice of ``round(fraction * len(labels))`` labels (sorted)."""
    names = sorted(labels)
    k = int(math.floor(fraction * len(names) + 0.5))
    rng = np.random.default_rng([seed, 2])
    pick: Iterable[int] = rng.choice(len(names), size=k, replace=False) if k else []
    return sorted(names[i] for i in pick)


def stratified_split(
    y: np.ndarray, fractions: Sequence[tuple[str, float]] = SPLITS, seed: int = 0
) -> list[str]:
    """A split name per row of the multi-label indicator matrix ``y`` [N, C], by
    iterative stratification (Sechidis et al. 2011), so every label's positives are
    spread over the splits in about the given fractions. Deterministic given ``seed``."""
    from iterstrat.ml_stratifiers import MultilabelStratifiedShuffleSplit

    names = [n for n, _ in fractions]
    weights = np.array([w for _, w in fractions], dtype=float)
    if len(names) < 2 or np.any(weights <= 0):
        raise ValueError(f"need at least two splits with positive fractions, got {fractions}")
    y = np.asarray(y, dtype=bool)
    n = y.shape[0]
    if n < len(names):
        raise EmojiSourceError(f"only {n} emoji with labels: too few for the splits {', '.join(names)}")
    if y.shape[1] < 2:  # the splitter wants a multi-label matrix
        y = np.concatenate([y, np.zeros((n, 2 - y.shape[1]), dtype=bool)], axis=1)
    out = np.array([names[0]] * n, dtype=object)
    remaining = np.arange(n)
    rest = float(weights.sum())
    # Peel off the last split, then the one before, from what is left ...
    for k in range(len(names) - 1, 0, -1):
        share = float(weights[k]) / rest
        splitter = MultilabelStratifiedShuffleSplit(n_splits=1, test_size=share, random_state=seed + k)
        keep, take = next(splitter.split(np.zeros((len(remaining), 1)), y[remaining]))
        out[remaining[take]] = names[k]
        remaining = remaining[keep]
        rest -= float(weights[k])
    return [str(s) for s in out]

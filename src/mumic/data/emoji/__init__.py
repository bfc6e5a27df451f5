"""EmojiTags: a real multi-label image set built from openly licensed emoji artwork.

Every emoji carries the English Unicode CLDR keywords ("cat", "face", "pet", ...) and
was drawn independently by several artists, so the same label set is seen in three
visual styles: Noto Emoji (``google``), Twemoji (``twitter``) and OpenMoji
(``openmoji``). Apple and Facebook artwork is never used: their licences do not allow it.

The sources are four npm packages, pinned by version and checked against their npm
``dist.integrity`` (sha512) before anything is read from them:

- ``emojibase-data`` (``en/data.json``): names and CLDR keywords (the labels);
- ``emoji-datasource-google`` / ``emoji-datasource-twitter``: 64 px PNGs
  (``img/<style>/64/``) and ``emoji.json``, which maps code points to file names;
- ``openmoji``: colour SVGs (``color/svg/<HEXCODE>.svg``), rendered with resvg.

They are fetched with ``npm pack`` into a cache folder, or taken from a folder of
tarballs downloaded beforehand (``from_dir``; file names as ``npm pack`` writes them).

What :func:`build_emoji` writes to ``out_dir``:

- ``images/<style>/<hexcode>.png``: base emoji only (no skin-tone variants), composited
  onto white, RGB, ``size`` x ``size`` pixels;
- ``manifest.csv``: ``image, labels, split, style, hexcode, name``; all styles of one
  emoji share its split (train/val/test 70/10/20, multi-label stratified by emoji);
- ``labels.yaml``: prompt templates and the label vocabulary (CLDR keywords on at least
  ``min_count`` emoji); a fixed 25 % of the labels are ``seen: false``, held out from
  training to measure zero-shot prediction;
- ``ATTRIBUTION.md`` (sources, versions, licences, authors), ``stats.json`` (counts) and
  ``params.json`` (written last: a build with the same parameters returns at once).

Building is resumable: images already written for the same size and sources are kept.

The modules: ``sources`` (the pinned packages: fetch, verify, read), ``cldr`` (emoji,
keywords, labels, splits), ``render`` (artwork to PNG), ``build`` (:func:`build_emoji`).
"""


from mumic.data.emoji.build import TEMPLATES, build_emoji
from mumic.data.emoji.cldr import (
    MIN_COUNT,
    SPLITS,
    UNSEEN_FRACTION,
    Emoji,
    choose_unseen,
    label_vocabulary,
    load_base_emoji,
    stratified_split,
)
from mumic.data.emoji.sources import SOURCES, STYLES, Source, fetch_sources, integrity_of
from mumic.data.labels import SEPARATOR
from mumic.errors import EmojiSourceError

__all__ = [
    "MIN_COUNT", "SEPARATOR", "SOURCES", "SPLITS", "STYLES", "TEMPLATES", "UNSEEN_FRACTION", "Emoji",
    "EmojiSourceError", "Source", "build_emoji", "choose_unseen", "fetch_sources", "integrity_of",
    "label_vocabulary", "load_base_emoji", "stratified_split",
]

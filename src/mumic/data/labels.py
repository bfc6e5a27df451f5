"""Labels files (label names, their prompts, and prompt templates) and the labels in them.

A labels file is YAML or JSON in one of three forms (see :func:`read_labels_file`); every
problem in one is a :class:`~mumic.errors.ManifestError` naming the file (and the line,
for syntax errors and keys given twice).
"""

from __future__ import annotations

import logging
import os
import unicodedata
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mumic.errors import ManifestError, cut, shown
from mumic.readers import read_json, read_text, read_yaml

log = logging.getLogger(__name__)

SEPARATOR = "|"
"""Separator of several labels in one manifest CSV/TSV cell (and in a JSONL string), so
never part of a label name."""

MAX_LABELS = 100_000
"""The most labels a labels file or a run may hold. Every label is one text-tower pass
(its prompts) whenever a model is built from the run; a file of 10^6 labels would keep
`predict` and `serve` embedding for hours. (The service's own limits are per request:
``serve.limits.Limits.max_labels`` zero-shot labels, ``label_cache_size`` kept.)"""

# format characters a label may keep: ZWNJ and ZWJ (spelling in Persian and Indic scripts,
# emoji sequences) and the tag characters of flag emoji; every other one is invisible noise
_KEPT_FORMAT = {"\u200c", "\u200d", *map(chr, range(0xE0020, 0xE0080))}


def normalize_label(name: str) -> str:
    """The canonical form of a label name, wherever labels enter (manifests, labels files,
    runs, zero-shot labels): format characters (zero-width spaces, BOMs, bidi marks, soft
    hyphens; ZWNJ/ZWJ kept) removed, Unicode NFC, runs of whitespace made one space,
    leading and trailing whitespace dropped. So ``café`` typed precomposed or with a
    combining accent, ``cat`` followed by a zero-width space, and ``black  cat`` with two
    spaces each name one label."""
    if name.isascii():  # the common case: only whitespace can change
        return " ".join(name.split())
    kept = "".join(c for c in name if c in _KEPT_FORMAT or unicodedata.category(c) != "Cf")
    return " ".join(unicodedata.normalize("NFC", kept).split())


def warn_case_clashes(names: Iterable[str], where: object) -> None:
    """Log a warning for label names that differ only in case ("Cat" and "cat"): they stay
    distinct labels, which is rarely what was meant."""
    groups: dict[str, list[str]] = {}
    for n in dict.fromkeys(names):
        groups.setdefault(n.casefold(), []).append(n)
    clashes = [g for g in groups.values() if len(g) > 1]
    if clashes:
        groups_text = "; ".join(" / ".join(shown(n) for n in g) for g in clashes[:5])
        more = f" and {len(clashes) - 5} more" if len(clashes) > 5 else ""
        log.warning("%s: %d group(s) of labels differ only in case (%s%s); they are distinct labels — "
                    "rename them to one spelling if they mean the same", where, len(clashes), groups_text, more)


def duplicates(names: Iterable[str]) -> list[str]:
    """The names given more than once, sorted (linear in the number of names)."""
    return sorted(n for n, c in Counter(names).items() if c > 1)


@dataclass
class LabelSpec:
    """One label: its name, optional own prompts and description, and whether it is
    trained on (``seen``) or only predicted zero-shot."""

    name: str
    prompts: list[str] | None = None
    description: str | None = None
    seen: bool = True

    def texts(self, templates: Sequence[str] | None = None) -> list[str]:
        """The prompt texts for this label: its own prompts if it has any, else the
        templates filled with its name, else the name itself; a description is one
        more prompt (the prompts of a label are averaged into its class embedding)."""
        if self.prompts:
            texts = list(self.prompts)
        elif templates:
            texts = [fill_template(t, self.name) for t in templates]
        else:
            texts = [self.name]
        if self.description and self.description not in texts:
            texts.append(self.description)
        return texts


PLACEHOLDER = "{}"
"""Where a template takes the label name; ``{label}`` is accepted and rewritten to ``{}``."""

_ENTRY_KEYS = ("name", "prompts", "description", "seen")
_TOP_KEYS = ("labels", "templates")


def fill_template(template: str, name: str) -> str:
    """``template`` with its ``{}`` replaced by ``name`` (other braces are left alone)."""
    return template.replace(PLACEHOLDER, name, 1)


def _load(path: Path) -> Any:
    """The document of a labels file: YAML or JSON by its extension, a key given twice refused."""
    suffix = path.suffix.lower()
    if suffix == ".json":
        return read_json(path, error=ManifestError, hint=None, unique_keys=True)
    if suffix in (".yaml", ".yml"):
        return read_yaml(path, error=ManifestError)[0]
    read_text(path, error=ManifestError)  # a missing file is said first
    raise ManifestError(
        f"{path}: unsupported labels file extension {suffix or '(none)'!r}; supported: .yaml, .yml, .json"
    )


def _label_name(path: Path, value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise ManifestError(
            f"{path}: {what} is {shown(value)} ({type(value).__name__}), not a string; "
            "quote label names in YAML (e.g. \"no\", \"1\")"
        )
    name = normalize_label(value)
    if not name:
        raise ManifestError(f"{path}: {what} is an empty label name")
    if SEPARATOR in name:
        raise ManifestError(f"{path}: label {shown(name)} contains '|', which separates labels in manifests")
    return name


def _str_list(path: Path, value: Any, what: str) -> list[str]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ManifestError(f"{path}: {what} must be a list of strings, got {shown(value)}")
    out = [v.strip() for v in value]
    if not out:
        raise ManifestError(f"{path}: {what} is empty; remove it or give at least one")
    if any(not v for v in out):
        raise ManifestError(f"{path}: {what} contains an empty string")
    return out


def _label_entry(path: Path, name: str, entry: Any) -> LabelSpec:
    """A LabelSpec from ``name`` and its entry (a mapping of prompts/description/seen, or None)."""
    if entry is None:
        return LabelSpec(name=name)
    if not isinstance(entry, dict):
        raise ManifestError(
            f"{path}: label {shown(name)}: expected a mapping with keys prompts, description, seen "
            f"(or nothing), got {type(entry).__name__}"
        )
    for key in entry:
        if key not in _ENTRY_KEYS[1:]:
            raise ManifestError(
                f"{path}: label {shown(name)}: unknown key {shown(key)}; allowed: {', '.join(_ENTRY_KEYS[1:])}"
            )
    return _spec_from_fields(path, name, entry)


def _spec_from_fields(path: Path, name: str, entry: dict[str, Any]) -> LabelSpec:
    prompts = entry.get("prompts")
    description = entry.get("description")
    seen = entry.get("seen", True)
    if prompts is not None:
        prompts = _str_list(path, prompts, f"label {shown(name)}: prompts")
    if description is not None and not isinstance(description, str):
        raise ManifestError(f"{path}: label {shown(name)}: description must be a string, got {shown(description)}")
    if not isinstance(seen, bool):
        raise ManifestError(f"{path}: label {shown(name)}: seen must be true or false, got {shown(seen)}")
    return LabelSpec(name=name, prompts=prompts, description=description, seen=seen)


def _labels_from_list(path: Path, items: list[Any]) -> list[LabelSpec]:
    specs = []
    for k, item in enumerate(items, start=1):
        if isinstance(item, dict):
            for key in item:
                if key not in _ENTRY_KEYS:
                    raise ManifestError(
                        f"{path}: label #{k}: unknown key {shown(key)}; allowed: {', '.join(_ENTRY_KEYS)}"
                    )
            if "name" not in item:
                raise ManifestError(f"{path}: label #{k} has no 'name'")
            name = _label_name(path, item["name"], f"label #{k} name")
            specs.append(_spec_from_fields(path, name, item))
        else:
            specs.append(LabelSpec(name=_label_name(path, item, f"label #{k}")))
    return specs


def _labels_from_mapping(path: Path, mapping: dict[Any, Any]) -> list[LabelSpec]:
    return [_label_entry(path, _label_name(path, key, f"label key {shown(key)}"), entry) for key, entry in mapping.items()]


def _is_wrapped(data: dict[Any, Any]) -> bool:
    """True for form (c) ``{labels: ..., templates: ...}``, False for form (b) ``{name: entry}``."""
    if "labels" not in data:
        return False
    value = data["labels"]
    if "templates" in data or isinstance(value, list):
        return True
    # {labels: {prompts: ...}} is a label called "labels" (form b).
    return isinstance(value, dict) and not set(value) <= set(_ENTRY_KEYS[1:])


def _templates(path: Path, value: Any) -> list[str] | None:
    if value is None:
        return None
    templates = _str_list(path, value, "templates")
    out = []
    for t in templates:
        t = t.replace("{label}", PLACEHOLDER)
        if t.count(PLACEHOLDER) != 1:
            raise ManifestError(
                f"{path}: template {shown(t)} must contain the placeholder {{}} (or {{label}}) exactly once"
            )
        out.append(t)
    return out


def read_labels_file(path: str | os.PathLike[str]) -> tuple[list[LabelSpec], list[str] | None]:
    """Read a YAML/JSON labels file; return the label specs and the prompt templates (if any).

    Accepted forms: (a) a list of names (or of ``{name, prompts, description, seen}``
    mappings); (b) a mapping ``name -> {prompts, description, seen}`` or ``name -> null``;
    (c) a mapping with ``labels`` (form a or b) and optional ``templates``, a list of
    strings each containing ``{}`` (or ``{label}``) once, where the label name goes.
    """
    path = Path(path)
    data = _load(path)
    templates: list[str] | None = None
    if isinstance(data, dict) and _is_wrapped(data):
        for key in data:
            if key not in _TOP_KEYS:
                raise ManifestError(f"{path}: unknown key {shown(key)}; allowed: {', '.join(_TOP_KEYS)}")
        templates = _templates(path, data.get("templates"))
        data = data["labels"]
    if isinstance(data, list):
        specs = _labels_from_list(path, data)
    elif isinstance(data, dict):
        specs = _labels_from_mapping(path, data)
    elif data is None:
        raise ManifestError(f"{path}: the labels file is empty")
    else:
        raise ManifestError(
            f"{path}: expected a list of label names or a mapping of label names, got {type(data).__name__}"
        )
    if not specs:
        raise ManifestError(f"{path}: no labels")
    if len(specs) > MAX_LABELS:
        raise ManifestError(f"{path}: {len(specs)} labels; at most {MAX_LABELS} are supported (split the vocabulary)")
    names = [s.name for s in specs]
    dup = duplicates(names)
    if dup:
        listed = ", ".join(cut(n) for n in dup[:10]) + (f" and {len(dup) - 10} more" if len(dup) > 10 else "")
        raise ManifestError(f"{path}: duplicate label name(s): {listed} (names are compared after normalising Unicode and whitespace)")
    warn_case_clashes(names, path)
    return specs, templates

"""Reading the text files mumic trusts: UTF-8 text, JSON and YAML, each failure one error
that names the file (and the line) and what to do.

YAML is parsed safely (no Python objects), with duplicate keys and merge keys refused and
aliases bounded (YAML_ALIAS_LIMIT), so a small file cannot expand to gigabytes.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import yaml

from mumic.errors import MumicError, RunError, cut, shown

RUN_HINT = "restore the file from the original run"


def read_text(path: str | os.PathLike[str], *, error: type[MumicError] = RunError) -> str:
    """A UTF-8 text file (a BOM is dropped); unreadable or non-UTF-8 bytes are an ``error``
    naming the file and line."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise error(f"{path} does not exist") from None
    except OSError as e:
        raise error(f"{path}: cannot read: {e.strerror or e}") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        start = e.start + (3 if data.startswith(b"\xef\xbb\xbf") else 0)  # e.start counts from after a BOM
        line = data.count(b"\n", 0, start) + 1
        raise error(f"{path} line {line}: not valid UTF-8 (byte 0x{data[start]:02x}); save the file as UTF-8") from None


def read_json(path: str | os.PathLike[str], *, error: type[MumicError] = RunError, hint: str | None = RUN_HINT,
              unique_keys: bool = False) -> Any:
    """Parse a JSON file; a missing or malformed file is an ``error`` naming it (and the
    line), ending with ``hint``. ``unique_keys`` refuses an object that gives a key twice."""
    path = Path(path)
    tail = f"; {hint}" if hint else ""
    text = read_text(path, error=error)

    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k, v in items:
            if k in out:
                raise error(f"{path}: duplicate key {k!r}; keep one{tail}")
            out[k] = v
        return out

    try:
        return json.loads(text, object_pairs_hook=pairs if unique_keys else None)
    except json.JSONDecodeError as e:
        raise error(f"{path} line {e.lineno}: not valid JSON ({e.msg}, column {e.colno}){tail}") from None
    except (ValueError, RecursionError) as e:
        raise error(f"{path} is not valid JSON ({type(e).__name__}: {e}){tail}") from None


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a mapping key given twice (plain YAML keeps the last)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            try:
                first = seen.get(key)
            except TypeError:
                continue  # an unhashable key: the base constructor rejects it
            if first is not None:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {shown(key)} is given twice (first on line {first}); keep one", key_node.start_mark)
            seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


YAML_ALIAS_LIMIT = 10_000
"""How many values YAML aliases (``*name``) may add to a document beyond those written in
it: enough to share a list of prompts between labels, far too few for an alias bomb (a
few hundred bytes of nested aliases that expand to billions of values)."""


def _alias_growth(root: yaml.Node) -> tuple[int, yaml.Node | None]:
    """(values the document holds with every alias expanded, minus the nodes written in
    it; an alias that refers to a value containing itself, or None), counted without
    expanding anything: each node's expanded size is computed once."""
    size: dict[int, int] = {}
    open_: set[int] = set()
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]

    def children(node: yaml.Node) -> list[yaml.Node]:
        if isinstance(node, yaml.SequenceNode):
            return list(node.value)
        if isinstance(node, yaml.MappingNode):
            return [n for pair in node.value for n in pair]
        return []

    while stack:
        node, done = stack.pop()
        key = id(node)
        if done:
            open_.discard(key)
            size[key] = 1 + sum(size[id(c)] for c in children(node))
        elif key in open_:
            return 0, node
        elif key not in size:
            open_.add(key)
            stack.append((node, True))
            stack.extend((c, False) for c in children(node))
    return size[id(root)] - len(size), None


def read_yaml(path: str | os.PathLike[str], *, error: type[MumicError] = RunError) -> tuple[Any, dict[Any, int]]:
    """The document of a YAML file (safe loader; a key given twice is refused) and the line
    of each top-level key. Every problem is a one-line ``error`` naming the file and line:
    bytes that are not UTF-8, a syntax error, a duplicate key, a tag that is not plain data,
    aliases that expand the document by more than YAML_ALIAS_LIMIT values."""
    path = Path(path)
    text = read_text(path, error=error)
    loader = _UniqueKeyLoader(text)
    try:
        node = loader.get_single_node()
        if node is not None:
            growth, loop = _alias_growth(node)
            if loop is not None:
                raise error(f"{path} line {loop.start_mark.line + 1}: a YAML alias refers to a value that contains it; "
                            "write the value out")
            if growth > YAML_ALIAS_LIMIT:
                raise error(f"{path}: YAML aliases (*name) expand this document by {growth} values, more than "
                            f"{YAML_ALIAS_LIMIT}; write the values out instead of aliasing them")
        value = loader.construct_document(node) if node is not None else None
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line = f" line {mark.line + 1}" if mark is not None else ""
        if e.problem and "is given twice" in e.problem:
            raise error(f"{path}{line}: {e.problem}") from None
        problem = " ".join(x for x in (e.context, e.problem) if x) or "syntax error"
        raise error(f"{path}{line}: not valid YAML ({cut(problem, 160)})") from None
    except yaml.YAMLError as e:
        raise error(f"{path}: not valid YAML ({cut(str(e).splitlines()[0], 160)})") from None
    except RecursionError:
        raise error(f"{path}: not valid YAML (nested too deeply)") from None
    finally:
        loader.dispose()
    lines: dict[Any, int] = {}
    if isinstance(node, yaml.MappingNode):
        for key_node, _ in node.value:
            if isinstance(key_node, yaml.ScalarNode):
                lines.setdefault(key_node.value, key_node.start_mark.line + 1)
    return value, lines

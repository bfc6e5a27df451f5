"""The table formats a manifest may come in: CSV, TSV, JSON Lines and Parquet, each read
into a DataFrame of strings/objects plus the line (row, for Parquet) of every record, so that
errors can name where a problem is."""

from __future__ import annotations

import csv
import io
import json
import re
from pathlib import Path
from typing import Any

import pandas as pd

from mumic.errors import ManifestError
from mumic.readers import read_text

FORMATS: dict[str, str] = {
    ".csv": "csv",
    ".tsv": "tsv",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".parquet": "parquet",
    ".pq": "parquet",
}
def show(text: Any) -> str:
    """Text from a file, fit for a one-line message: as it is when printable, else quoted
    with escapes (a newline in a column name must not break the message)."""
    text = str(text)
    return text if text.isprintable() else repr(text)


def _check_file(path: Path) -> None:
    """A manifest path that is missing or a folder is refused with a message that says so."""
    if not path.exists():
        raise ManifestError(f"{path}: file not found")
    if path.is_dir():
        raise ManifestError(f"{path}: is a directory, not a manifest file")


def _manifest_text(path: Path) -> str:
    _check_file(path)
    return read_text(path, error=ManifestError)


def _read_delimited(path: Path, delimiter: str) -> tuple[pd.DataFrame, list[int]]:
    text = _manifest_text(path)
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, strict=True)
    header: list[str] | None = None
    rows: list[list[str]] = []
    lines: list[int] = []
    last = 0
    while True:
        start = last + 1
        try:
            row = next(reader)
        except StopIteration:
            break
        except csv.Error as e:
            raise ManifestError(f"{path} line {reader.line_num}: cannot parse: {e}") from None
        last = reader.line_num
        if not any(cell.strip() for cell in row):
            continue  # blank line
        if header is None:
            header = [cell.strip() for cell in row]
            dup = sorted({h for h in header if header.count(h) > 1})
            if dup:
                raise ManifestError(f"{path} line {start}: duplicate column name(s): {', '.join(map(show, dup))}")
            continue
        if len(row) != len(header):
            raise ManifestError(
                f"{path} line {start}: expected {len(header)} fields ({', '.join(map(show, header))}), "
                f"found {len(row)}; quote fields that contain {delimiter!r}"
            )
        rows.append(row)
        lines.append(start)
    if header is None:
        raise ManifestError(f"{path}: empty manifest (no header and no rows)")
    return pd.DataFrame(rows, columns=header, dtype=object), lines


def _read_jsonl(path: Path) -> tuple[pd.DataFrame, list[int]]:
    text = _manifest_text(path)
    records: list[dict[str, Any]] = []
    lines: list[int] = []
    # JSON Lines are separated by "\n" only: str.splitlines() would also split at U+2028
    # and other characters that are valid inside a JSON string.
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ManifestError(f"{path} line {number}: invalid JSON: {e.msg} (column {e.colno})") from None
        except RecursionError:
            raise ManifestError(f"{path} line {number}: invalid JSON: nested too deeply") from None
        except ValueError as e:  # e.g. an integer with more digits than Python converts
            raise ManifestError(f"{path} line {number}: invalid JSON: {e}") from None
        if not isinstance(record, dict):
            raise ManifestError(
                f"{path} line {number}: expected a JSON object like "
                f'{{"image": "a.jpg", "labels": ["cat"]}}, got {type(record).__name__}'
            )
        if _SURROGATE_ESCAPE.search(line) and _has_lone_surrogate(record):
            raise ManifestError(
                f"{path} line {number}: a string is not valid Unicode (a lone surrogate from a \\ud800-style "
                "escape); fix the text"
            )
        records.append(record)
        lines.append(number)
    try:
        return pd.DataFrame.from_records(records), lines
    except Exception as e:  # pandas / pyarrow refuse some values in ways of their own
        raise ManifestError(f"{path}: cannot make a table of its rows ({type(e).__name__}: {e})") from None


_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def _has_lone_surrogate(value: Any) -> bool:
    """Whether a parsed JSON value holds a string that is not valid Unicode."""
    stack = [value]
    while stack:
        v = stack.pop()
        if isinstance(v, str):
            try:
                v.encode("utf-8")
            except UnicodeEncodeError:
                return True
        elif isinstance(v, dict):
            stack.extend(v.keys())
            stack.extend(v.values())
        elif isinstance(v, list):
            stack.extend(v)
    return False


def _read_parquet(path: Path) -> tuple[pd.DataFrame, list[int]]:
    _check_file(path)
    try:
        frame = pd.read_parquet(path)
    except Exception as e:  # pyarrow raises several unrelated types for bad files
        raise ManifestError(f"{path}: not a readable Parquet file: {e}") from None
    frame = frame.reset_index(drop=True)
    return frame, list(range(1, len(frame) + 1))



def read_table(path: Path) -> tuple[pd.DataFrame, list[int]]:
    """The records of a manifest file in the format its suffix names, with their lines."""
    kind = FORMATS[path.suffix.lower()]
    if kind == "parquet":
        return _read_parquet(path)
    if kind == "jsonl":
        return _read_jsonl(path)
    return _read_delimited(path, "\t" if kind == "tsv" else ",")

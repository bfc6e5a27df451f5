"""Atomic file writes and safe weight loading.

Every file of a run is written to a temporary file in the same folder and renamed into
place, so a crash never leaves a half-written file that a later run would trust.
Weights are safetensors only: loading never unpickles anything. Each weights file carries
the sha256 of its tensors in its metadata (``DIGEST_KEY``), checked on load, so a file
whose bytes changed after it was written (a flipped bit, an edit) is refused. The digest
catches corruption and naive tampering; it is not a signature.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from mumic.errors import RunError

DIGEST_KEY = "mumic.sha256"
"""safetensors metadata key holding the sha256 of the file's tensors (see tensors_digest)."""


def _atomic(path: Path, write) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: Path, data: bytes) -> None:
    _atomic(path, lambda fh: fh.write(data))


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def tensors_digest(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over the names, dtypes, shapes and bytes of ``tensors`` (in name order), so
    the same tensors give the same digest whatever the file layout."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(json.dumps([name, str(t.dtype), list(t.shape)]).encode("utf-8"))
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Write a safetensors file atomically (tensors made contiguous and moved to CPU), with
    the digest of its tensors in the metadata."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    cpu = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    meta = {**(metadata or {}), DIGEST_KEY: tensors_digest(cpu)}
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(cpu, tmp, metadata=meta)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Read a safetensors file; a missing, truncated or tampered file is a RunError.

    A file with a digest (every file save_tensors wrote) must match it; a file without one
    (written by another tool) is read as it is.
    """
    path = Path(path)
    if not path.is_file():
        raise RunError(f"{path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError, TypeError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise RunError(
            f"{path} is not a readable safetensors file ({reason}); it may be truncated or tampered with — "
            "restore it from the original run"
        ) from None
    expected = meta.get(DIGEST_KEY)
    if expected is not None and tensors_digest(tensors) != expected:
        raise RunError(
            f"{path}: its tensors do not match the sha256 recorded when it was written; the file was "
            "changed or corrupted after it was saved — restore it from the original run"
        )
    return tensors


def read_json(path: Path) -> Any:
    """Parse a JSON file of a run; a missing or malformed file is a RunError naming it."""
    path = Path(path)
    if not path.is_file():
        raise RunError(f"{path} does not exist")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise RunError(f"{path} line {e.lineno}: not valid JSON ({e.msg}, column {e.colno}); restore the file from the original run") from None
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise RunError(f"{path} is not valid JSON ({type(e).__name__}: {e}); restore the file from the original run") from None
    except OSError as e:
        raise RunError(f"{path}: cannot read: {e.strerror or e}") from None


def check_output_folder(out: Path, overwrite: bool, *, marker: str, what: str) -> None:
    """Refuse to write into a folder that is not empty, unless it holds `what` (recognised
    by its `marker` file) and `overwrite` is set: a folder of other files is never replaced."""
    out = Path(out)
    if not out.exists():
        return
    if not out.is_dir():
        raise RunError(f"{out} exists and is not a folder; choose another --out")
    if not any(out.iterdir()):
        return
    if not (out / marker).is_file():
        kind = what.split(" ", 1)[1]
        raise RunError(f"{out} exists and is not {what.split(' ', 1)[0]} {kind} folder; choose another --out (it is never replaced)")
    if not overwrite:
        raise RunError(f"{out} already holds {what}; pass --overwrite to replace it")


@contextlib.contextmanager
def atomic_folder(out: Path):
    """Build a folder in a temporary sibling and swap it in only when the block succeeds,
    so readers see the old folder or the whole new one, never a half-written one."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old")
        if old.exists():
            shutil.rmtree(old)
        out.rename(old)
    tmp.rename(out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)

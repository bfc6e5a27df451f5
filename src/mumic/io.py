"""The one place that writes files and hashes them, and reads safetensors (text, JSON and YAML: mumic.readers).

Every file of a run is written to a temporary file in the same folder and renamed into
place, so a crash never leaves a half-written file that a later run would trust.
Weights are safetensors only: loading never unpickles anything. Each weights file carries
the sha256 of its tensors in its metadata (``DIGEST_KEY``), checked on load, so a file
whose bytes changed after it was written (a flipped bit, an edit) is refused. The digest
catches corruption and naive tampering; it is not a signature.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mumic.errors import MumicError, OutputError, RunError

log = logging.getLogger(__name__)

if TYPE_CHECKING:  # torch is imported where tensors are read or written, not at import
    import torch

DIGEST_KEY = "mumic.sha256"
"""safetensors metadata key holding the sha256 of the file's tensors (see tensors_digest)."""


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _file_mode() -> int:
    """The mode a plain ``open(path, "w")`` would give: 0666 less the umask (mkstemp's
    temporary files are 0600, which would keep other accounts from reading a run)."""
    return 0o666 & ~_umask()


FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})
DENIED_ERRNOS = frozenset({errno.EROFS, errno.EACCES, errno.EPERM})
WRITE_ERRNOS = FULL_ERRNOS | DENIED_ERRNOS
"""The errors of a write that the user, not mumic, can fix: a full disk or quota, a file
system that is read-only or a folder that is not theirs to write."""


def write_failure(e: BaseException) -> tuple[int | None, str] | None:
    """(errno, reason) when `e` is a write that failed for one of WRITE_ERRNOS (or a short
    write, as numpy reports a full disk), else None. safetensors reports the OS error in
    its message ("... (os error 28)")."""
    import re

    if isinstance(e, OSError):
        if e.errno in WRITE_ERRNOS:
            return e.errno, os.strerror(e.errno)
        if e.errno is None and re.search(r"requested and \d+ written", str(e)):
            return errno.ENOSPC, f"short write ({e})"
        return None
    found = re.search(r"\(os error (\d+)\)", str(e))
    if found and int(found.group(1)) in WRITE_ERRNOS:
        return int(found.group(1)), os.strerror(int(found.group(1)))
    return None


def output_error(path: str | os.PathLike[str], e: BaseException) -> OutputError | None:
    """The one-line OutputError for a failed write of `path` (see write_failure), or None
    when `e` is some other error."""
    failure = write_failure(e)
    if failure is None:
        return None
    code, reason = failure
    fix = "free some space and run again" if code in FULL_ERRNOS else "choose a writable --out"
    return OutputError(f"cannot write {path}: {reason}; {fix}")


@contextlib.contextmanager
def writing(path: str | os.PathLike[str]) -> Iterator[None]:
    """Turn a failed write of `path` inside the block (a full disk, a read-only folder) into
    an OutputError naming it; other errors pass unchanged."""
    try:
        yield
    except Exception as e:
        err = output_error(path, e)
        if err is None:
            raise
        raise err from e


def check_writable(folder: str | os.PathLike[str]) -> None:
    """An OutputError now, before any work, when no file can be made in `folder` (made if
    missing): a read-only file system or a folder that is not the user's to write."""
    folder = Path(folder)
    with writing(folder):
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".mumic-probe.", suffix=".tmp", dir=folder)
        os.close(fd)
        os.unlink(tmp)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """A temporary path beside ``path`` for a writer that needs a file name (safetensors,
    onnx, faiss, pyarrow); renamed onto ``path`` when the block succeeds, removed when it
    fails, so ``path`` is the old file or the whole new one, never a half-written one. A
    write that fails for a full disk or a read-only folder is an OutputError naming ``path``."""
    path = Path(path)
    with writing(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        try:
            yield Path(tmp)
            os.chmod(tmp, _file_mode())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def _atomic(path: Path, write: Callable[[Any], Any]) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        write(fh)
        fh.flush()
        os.fsync(fh.fileno())


def atomic_write_bytes(path: Path, data: bytes) -> None:
    _atomic(path, lambda fh: fh.write(data))


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    """Rows (dicts) as a CSV file with a header of every key in order of first appearance;
    nothing is written for no rows."""
    import csv
    import io

    if not rows:
        return
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=keys)
    w.writeheader()
    w.writerows(rows)
    atomic_write_text(path, buf.getvalue())


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def file_digest(path: str | os.PathLike[str], algorithm: str = "sha256", *, digest_size: int | None = None,
                chunk: int = 1 << 20) -> str:
    """Hex digest of a file's bytes, read in chunks, with any ``hashlib`` algorithm
    (``digest_size`` for the variable-length ones, e.g. blake2b). OSError is left to the
    caller, which knows what the file is."""
    # typeshed's hashlib.new takes no constructor keywords; CPython hands them to blake2b/blake2s
    h = hashlib.new(algorithm) if digest_size is None else hashlib.new(algorithm, digest_size=digest_size)  # type: ignore[call-arg]
    _feed(h, path, chunk)
    return h.hexdigest()


def _feed(h: Any, path: str | os.PathLike[str], chunk: int = 1 << 20) -> None:
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)


def files_digest(named: Sequence[tuple[str, str | os.PathLike[str]]], algorithm: str = "sha256") -> str:
    """One hex digest over several files: for each (name, path) in order, the name's UTF-8
    bytes, then the file's bytes."""
    h = hashlib.new(algorithm)
    for name, path in named:
        h.update(name.encode("utf-8"))
        _feed(h, path)
    return h.hexdigest()


def sampled_sha256(path: str | os.PathLike[str], *, ends: int = 1 << 20, blocks: int = 256, block: int = 4096) -> str:
    """sha256 over a file's size, its first and last ``ends`` bytes and ``blocks`` blocks of
    ``block`` bytes at evenly spaced offsets between them (the whole file when it is no
    larger than that): about 3 MB read whatever the size, so checking a file of hundreds
    of megabytes costs milliseconds. It tells one file from another of the same size (a
    copy from elsewhere, a truncated or regenerated one); a change confined to the bytes
    in between is caught only by a full digest."""
    h = hashlib.sha256()
    size = os.path.getsize(path)
    h.update(f"{size}|{ends}|{blocks}|{block}".encode("ascii"))
    with open(path, "rb") as fh:
        if size <= 2 * ends + blocks * block:
            while data := fh.read(1 << 20):
                h.update(data)
            return h.hexdigest()
        h.update(fh.read(ends))
        span = size - 2 * ends - block
        for i in range(blocks):
            fh.seek(ends + span * i // max(1, blocks - 1))
            h.update(fh.read(block))
        fh.seek(size - ends)
        h.update(fh.read(ends))
    return h.hexdigest()


def file_sha256(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    """sha256 hex digest of a file's bytes, read in chunks."""
    return file_digest(path, "sha256", chunk=chunk)


def tensors_digest(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over the names, dtypes, shapes and bytes of ``tensors`` (in name order), so
    the same tensors give the same digest whatever the file layout."""
    import torch

    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(json.dumps([name, str(t.dtype), list(t.shape)]).encode("utf-8"))
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().data)
    return h.hexdigest()


def save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Write a safetensors file atomically (tensors made contiguous and moved to CPU), with
    the digest of its tensors in the metadata."""
    from safetensors.torch import save_file

    cpu = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    meta = {**(metadata or {}), DIGEST_KEY: tensors_digest(cpu)}
    with atomic_path(path) as tmp:
        save_file(cpu, str(tmp), metadata=meta)


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Read a safetensors file; a missing, truncated or tampered file is a RunError.

    A file with a digest (every file save_tensors wrote) must match it; a file without one
    (written by another tool) is read as it is.
    """
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise RunError(f"{path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has keys() but no __iter__)
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


def link_folder(out_dir: Path, folder: Path) -> str:
    """A symbolic link in `out_dir` to `folder`, relative (so both can move together), named
    from the target; returns its name. A derived manifest in `out_dir` then names its images
    by relative paths inside its own folder, as a manifest must by default."""
    out_dir.mkdir(parents=True, exist_ok=True)
    target = os.path.relpath(folder.resolve(), out_dir.resolve())
    name = "src-" + hashlib.blake2b(target.encode(), digest_size=4).hexdigest()
    link = out_dir / name
    if link.is_symlink() and os.readlink(link) == target:
        return name
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(target, target_is_directory=True)
    return name


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


_RENAME_EXCHANGE = 2  # linux/fs.h
_AT_FDCWD = -100


def exchange_paths(a: str | os.PathLike[str], b: str | os.PathLike[str]) -> bool:
    """Swap two existing paths in one atomic step (Linux renameat2 with RENAME_EXCHANGE):
    a reader sees one or the other at each name, never nothing. False where the system
    or the file system has no such call (then nothing was moved)."""
    import ctypes

    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(a), None, str(b))


def replace_folder(new: str | os.PathLike[str], out: str | os.PathLike[str]) -> None:
    """Put the folder `new` at `out`, the old `out` (if any) removed after: where the file
    system can swap folders (exchange_paths) `out` is the old folder or the new one at
    every instant; elsewhere it is missing for the moment between two renames."""
    new, out = Path(new), Path(out)
    if not out.exists() and not out.is_symlink():
        new.rename(out)
        return
    if exchange_paths(new, out):
        shutil.rmtree(new, ignore_errors=True)  # `new` now names the old folder
        return
    log.warning("%s: this file system cannot swap folders atomically; replacing it with two renames", out)
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
    out.replace(old / out.name)
    new.rename(out)
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_folder(out: Path) -> Iterator[Path]:
    """Build a folder in a temporary sibling and swap it in only when the block succeeds,
    so readers see the old folder or the whole new one, never a half-written one (see
    replace_folder). Each writer gets its own temporary folder, so two writers never wipe
    each other's. A write that fails for a full disk or a read-only folder is an
    OutputError naming ``out``."""
    out = Path(out)
    with writing(out):
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
        os.chmod(tmp, 0o777 & ~_umask())
        try:
            yield tmp
            replace_folder(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


LOCK_NAME = ".lock"
"""The file in a folder that :func:`folder_lock` locks while a process writes the folder."""


def _lock_holder(fd: int) -> str:
    """The process id a lock file records, as text ("another process" while it is unwritten)."""
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        text = ""
    return f"process {text}" if text.isdigit() else "another process"


@contextlib.contextmanager
def folder_lock(folder: str | os.PathLike[str], *, error: type[MumicError] = RunError) -> Iterator[Path]:
    """Hold FOLDER/.lock (an exclusive ``flock``, with this process's id written in it) for
    the block: a second writer of the folder gets an ``error`` naming the holder's id instead
    of writing beside it. The kernel drops the lock when its holder exits, crashed or not, so
    a lock file left by a dead process never blocks. The folder is made if missing; the lock
    file is removed when the block ends."""
    import fcntl

    folder = Path(folder)
    with writing(folder):
        folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_NAME
    while True:
        with writing(folder):
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, _file_mode())
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _lock_holder(fd)
            os.close(fd)
            raise error(f"{folder} is being written by {holder} ({path}); wait for it or stop it") from None
        except BaseException:
            os.close(fd)
            raise
        # the holder before us may have removed the file after we opened it: lock the one in place
        try:
            current = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            current = False
        if current:
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
        yield path
    finally:
        path.unlink(missing_ok=True)  # while still holding it, so no one locks a file about to vanish
        os.close(fd)

"""A full disk, a read-only --out, Ctrl-C: one `mumic: error:` line, exit 2, and nothing old lost.

The faults are injected by monkeypatching (the tests may run as root, for whom chmod does
not make a folder read-only): os.fsync fails with ENOSPC for chosen files (where a full disk
shows up on file systems that allocate late), os.open and os.mkdir fail with EROFS under a
chosen folder.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
from pathlib import Path

import pytest

import mumic.io
from mumic.cli import main
from mumic.data.synthetic import make_shapes
from mumic.errors import OutputError, RunError

FULL = os.strerror(errno.ENOSPC)  # "No space left on device"
READ_ONLY = os.strerror(errno.EROFS)  # "Read-only file system"


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file() and p.name != ".lock"}


def disk_full_for(monkeypatch, name_prefix: str) -> list[str]:
    """fsync fails with ENOSPC for the temporary file of any output named name_prefix*."""
    real, failed = os.fsync, []

    def fsync(fd):
        name = os.path.basename(os.readlink(f"/proc/self/fd/{fd}"))
        if name.startswith("." + name_prefix):
            failed.append(name)
            raise OSError(errno.ENOSPC, FULL)
        return real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    return failed


def read_only(monkeypatch, folder: Path) -> None:
    """Nothing can be made under `folder`, as on a read-only file system."""
    for name in ("open", "mkdir"):
        real = getattr(os, name)

        def refuse(path, *args, _real=real, _makes=name == "mkdir", **kw):
            if isinstance(path, (str, os.PathLike)) and os.path.abspath(path).startswith(str(folder)) and (
                    _makes or (args and args[0] & (os.O_WRONLY | os.O_RDWR | os.O_CREAT))):
                raise OSError(errno.EROFS, READ_ONLY, str(path))
            return _real(path, *args, **kw)

        monkeypatch.setattr(os, name, refuse)


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return make_shapes(tmp_path_factory.mktemp("outfaults") / "shapes", n=30, size=32, seed=6).parent


@pytest.fixture(scope="module")
def train_args(shapes, tiny_clip_dir, tmp_path_factory):
    cache = tmp_path_factory.mktemp("outfaults-cache")
    return ["--manifest", str(shapes / "manifest.csv"), "--labels-file", str(shapes / "labels.yaml"), "--backbone",
            f"hf:{tiny_clip_dir}", "--max-steps", "2", "--eval-every", "2", "--batch-size", "8", "--cache-dir", str(cache),
            "--no-progress"]


@pytest.fixture(scope="module")
def good_run(train_args, tmp_path_factory):
    run = tmp_path_factory.mktemp("outfaults-run") / "run"
    assert main(["train", *train_args, "--out", str(run), "--seed", "1"]) == 0
    return run


def _error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("mumic: error:")]
    assert len(lines) == 1, err
    return lines[0]


# ------------------------------------------------------------------------ train --overwrite


def test_a_failed_overwrite_keeps_the_old_run_and_resume_finishes_the_new(good_run, train_args, tmp_path, monkeypatch, capsys,
                                                                            caplog):
    from mumic.run import staging_folder
    from mumic.train import resume

    run = Path(shutil.copytree(good_run, tmp_path / "run"))
    (run / "notes.txt").write_text("mine\n")
    old = _snapshot(run)
    stage = staging_folder(run)

    # Ctrl-C before the first checkpoint: the old run stays; --resume says how to go on
    def interrupt(step):
        raise KeyboardInterrupt

    monkeypatch.setattr("mumic.train.Trainer.evaluate", lambda self, loss: interrupt(0))
    assert main(["train", *train_args, "--out", str(run), "--seed", "2", "--overwrite"]) == 130
    monkeypatch.undo()
    assert _snapshot(run) == old
    with pytest.raises(RunError) as info:
        resume(run, progress=False)
    assert str(info.value) == (f"the interrupted --overwrite of {run} stopped before its first checkpoint; start it again with "
                               f"--overwrite ({run} still holds the previous run)")

    # the disk fills up while the new run's results are written: one line, exit 2, the old run whole
    failed = disk_full_for(monkeypatch, "metrics.json")
    with caplog.at_level(logging.WARNING, logger="mumic.run"):
        assert main(["train", *train_args, "--out", str(run), "--seed", "2", "--overwrite"]) == 2
    assert failed
    assert _error_line(capsys) == f"mumic: error: cannot write {stage / 'metrics.json'}: {FULL}; free some space and run again"
    assert f"{run} still holds the previous run; `mumic train --resume {run}` continues the new one" in caplog.text
    assert _snapshot(run) == old
    monkeypatch.undo()

    # space again: --resume finishes the new run from its checkpoint and swaps it in
    assert main(["train", "--resume", str(run), "--no-progress"]) == 0
    new = _snapshot(run)
    assert new["model.safetensors"] != old["model.safetensors"] and new["notes.txt"] == b"mine\n"
    assert "checkpoint.safetensors" not in new and "best.safetensors" not in new
    assert json.loads(new["metrics.json"])["steps"] == 2
    assert not stage.parent.exists()
    assert f"# Run {run.name}" in new["report.md"].decode()  # the report names the run, not its staging folder


def test_read_only_out_for_train_is_one_line(train_args, tmp_path, monkeypatch, capsys):
    read_only(monkeypatch, tmp_path / "ro")
    assert main(["train", *train_args, "--out", str(tmp_path / "ro" / "run")]) == 2
    assert _error_line(capsys) == f"mumic: error: cannot write {tmp_path / 'ro' / 'run'}: {READ_ONLY}; choose a writable --out"


# ------------------------------------------------------------------------ embed, predict, export, evaluate


def test_a_full_disk_in_embed_is_one_line_and_keeps_the_old_file(good_run, shapes, tmp_path, monkeypatch, capsys):
    out = tmp_path / "e.parquet"
    out.write_bytes(b"the old embeddings")
    failed = []

    def full(table, where, **kw):  # what pyarrow raises when the disk is full
        failed.append(where)
        raise OSError(errno.ENOSPC, f"Error writing bytes to file. Detail: [errno 28] {FULL}")

    monkeypatch.setattr("pyarrow.parquet.write_table", full)
    assert main(["embed", str(good_run), str(shapes / "manifest.csv"), "--out", str(out), "--overwrite", "--device", "cpu"]) == 2
    assert failed
    part = tmp_path / "e.parquet.parts" / "part-00000.parquet"
    assert _error_line(capsys) == f"mumic: error: cannot write {part}: {FULL}; free some space and run again"
    assert out.read_bytes() == b"the old embeddings"
    assert not [p for p in (tmp_path / "e.parquet.parts").iterdir() if p.name.endswith(".tmp")]


def test_a_full_disk_in_the_merge_keeps_the_old_file(good_run, shapes, tmp_path, monkeypatch, capsys):
    out = tmp_path / "p.jsonl"
    out.write_text("old\n")
    def full(src, dst, *a):  # the shards are written; the disk fills up while they are joined
        raise OSError(errno.ENOSPC, FULL)

    monkeypatch.setattr(shutil, "copyfileobj", full)
    assert main(["predict", str(good_run), str(shapes / "manifest.csv"), "--out", str(out), "--overwrite", "--device", "cpu"]) == 2
    assert _error_line(capsys) == f"mumic: error: cannot write {out}: {FULL}; free some space and run again"
    assert out.read_text() == "old\n"
    monkeypatch.undo()  # the rerun resumes from the shards
    assert main(["predict", str(good_run), str(shapes / "manifest.csv"), "--out", str(out), "--overwrite", "--device", "cpu"]) == 0
    assert len(out.read_text().splitlines()) == 30


@pytest.mark.parametrize("verb", ["predict", "embed", "export"])
def test_read_only_out_is_one_line_before_any_work(good_run, shapes, tmp_path, monkeypatch, capsys, verb):
    ro = tmp_path / "ro"
    ro.mkdir()
    read_only(monkeypatch, ro)
    inputs = [] if verb == "export" else [str(shapes / "manifest.csv")]
    out = ro / ("x" if verb == "export" else "x.parquet")
    monkeypatch.setattr("mumic.predictor.Predictor.from_run", lambda *a, **kw: pytest.fail("the run was loaded"))
    assert main([verb, str(good_run), *inputs, "--out", str(out)]) == 2
    assert _error_line(capsys) == f"mumic: error: cannot write {ro}: {READ_ONLY}; choose a writable --out"


def test_evaluate_on_a_read_only_run_prints_the_metrics_then_fails(good_run, shapes, tmp_path, monkeypatch, capsys):
    run = Path(shutil.copytree(good_run, tmp_path / "run"))
    before = _snapshot(run)
    read_only(monkeypatch, run)
    assert main(["evaluate", str(run), "--manifest", str(shapes / "manifest.csv"), "--device", "cpu"]) == 2
    captured = capsys.readouterr()
    assert "map_macro" in captured.out and "gap10" in captured.out.lower()  # the metrics came out first
    target = run / "eval-manifest.json"
    assert [line for line in captured.err.splitlines() if line.startswith("mumic:")] == [
        f"mumic: error: cannot write {target}: {READ_ONLY}; choose a writable --out"]
    monkeypatch.undo()
    assert _snapshot(run) == before


# ------------------------------------------------------------------------ io and the CLI


def test_an_os_error_of_a_write_outside_io_is_one_line(monkeypatch, capsys):
    import mumic.cli.train as cli_train

    def full(a):
        raise OSError(errno.EDQUOT, os.strerror(errno.EDQUOT), "/data/runs/a/log.csv")

    monkeypatch.setattr(cli_train, "run", full)
    assert main(["train", "--out", "x"]) == 2
    quota = os.strerror(errno.EDQUOT)
    assert _error_line(capsys) == f"mumic: error: cannot write /data/runs/a/log.csv: {quota}; free some space and run again"

    def bug(a):
        raise OSError(errno.EBADF, "Bad file descriptor")

    monkeypatch.setattr(cli_train, "run", bug)
    with pytest.raises(OSError, match="Bad file descriptor"):  # not a write the user can fix: a bug, with its traceback
        main(["train", "--out", "x"])


def test_safetensors_and_numpy_reports_of_a_full_disk_are_output_errors(tmp_path, monkeypatch):
    import torch
    from safetensors import SafetensorError

    from mumic.io import save_tensors, writing

    def full(*a, **kw):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr("safetensors.torch.save_file", full)
    with pytest.raises(OutputError, match=rf"^cannot write {tmp_path / 'w.safetensors'}: {FULL}; free some space and run again$"):
        save_tensors(tmp_path / "w.safetensors", {"t": torch.zeros(2)})
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(OutputError, match=rf"^cannot write {tmp_path / 'e.npy'}: short write"), writing(tmp_path / "e.npy"):
        raise OSError("4096 requested and 496 written")  # numpy's tofile on a full disk


def test_tau_must_be_finite(capsys):
    for value in ("inf", "nan"):
        assert main(["train", "--tau", value, "--out", "x"]) == 2
        assert _error_line(capsys) == f"mumic: error: command line: key 'tau' (--tau) must be a finite number, got {float(value)!r}"
    assert main(["train", "--tau", "0", "--out", "x"]) == 2
    assert _error_line(capsys) == "mumic: error: command line: key 'tau' (--tau) must be > 0, got 0.0"


def test_folders_are_swapped_in_one_step_or_with_two_renames(tmp_path, monkeypatch, caplog):
    from mumic.io import atomic_folder, exchange_paths

    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    (a / "f").write_text("A")
    (b / "f").write_text("B")
    assert exchange_paths(a, b)  # Linux: renameat2(RENAME_EXCHANGE)
    assert ((a / "f").read_text(), (b / "f").read_text()) == ("B", "A")
    for swap, warned in ((True, False), (False, True)):
        if not swap:
            monkeypatch.setattr(mumic.io, "exchange_paths", lambda x, y: False)  # a file system without the call
        caplog.clear()
        with atomic_folder(a) as tmp:
            (tmp / "g").write_text(str(swap))
        assert sorted(p.name for p in a.iterdir()) == ["g"] and (a / "g").read_text() == str(swap)
        assert ("cannot swap folders atomically" in caplog.text) == warned
        assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"]  # no temporary folder left

"""Kill `embed`, `predict`, `index` and `train --overwrite` at random points: afterwards the
output is the whole old one or the whole new one, never a mix and never nothing, and a rerun
finishes the job with the right result.

Each job runs in a child forked from this process (torch and the tiny model already loaded)
that SIGKILLs itself just before its N-th file-system step under the test's folder (a
rename, a replace, an unlink, a mkdir, an fsync, a folder swap...). A kill between two
steps leaves what a kill just before the second one leaves, so these points reach every
state the disk can be left in. N is drawn, without replacement, by a seeded RNG from the
steps a full run of the job takes.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import random
import shutil
import signal
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

import mumic.batch as ev
import mumic.io
from mumic.data.manifest import read_manifest
from mumic.data.synthetic import make_shapes

FORK = multiprocessing.get_context("fork")
STEPS = ("replace", "rename", "unlink", "rmdir", "mkdir", "link", "fsync")
POINTS = 10  # kill points per job


def _child(job: Callable[[], None], kill_at: int, root: str, conn) -> None:
    import torch

    torch.set_num_threads(1)  # a forked child must not reuse the parent's thread pool
    steps = 0

    def counted(real):
        def step(*args, **kw):
            nonlocal steps
            first = args[0] if args else None
            mine = real is os.fsync or kw.get("dir_fd") is not None or (
                isinstance(first, (str, bytes, os.PathLike)) and os.fsdecode(first).startswith(root))
            if mine:
                steps += 1
                if steps == kill_at:
                    os.kill(os.getpid(), signal.SIGKILL)
            return real(*args, **kw)
        return step

    for name in STEPS:
        setattr(os, name, counted(getattr(os, name)))
    swap = mumic.io.exchange_paths
    mumic.io.exchange_paths = counted(lambda a, b: swap(a, b))  # one step: the swap of two folders
    job()
    conn.send(steps)


def run_forked(job: Callable[[], None], root: Path, kill_at: int = 0) -> int | None:
    """Run `job` in a forked child killed at its `kill_at`-th step under `root` (0: never);
    the steps it took when it was not killed, else None."""
    recv, send = FORK.Pipe(duplex=False)
    p = FORK.Process(target=_child, args=(job, kill_at, str(root), send))
    p.start()
    send.close()
    p.join(300)
    if p.is_alive():
        p.kill()
        p.join()
        pytest.fail("the child hung")
    try:
        steps = recv.recv()
    except EOFError:  # killed before it could say
        steps = None
    if kill_at == 0 or steps is not None:
        assert p.exitcode == 0, f"the child failed (exit code {p.exitcode})"
    else:
        assert p.exitcode == -signal.SIGKILL
    return steps


def kill_points(steps: int, seed: int) -> list[int]:
    """POINTS steps of 1..steps+1 (steps+1: after the last one) drawn by a seeded RNG."""
    return sorted(random.Random(seed).sample(range(1, steps + 2), min(POINTS, steps + 1)))


def _snapshot(folder: Path, skip: Callable[[str], bool] = lambda name: False) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file() and not skip(p.name)}


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_clip_dir):
    from mumic.predictor import Predictor
    from mumic.train import fit

    tmp = tmp_path_factory.mktemp("faults")
    shapes = make_shapes(tmp / "shapes", n=30, size=32, seed=4).parent
    common = dict(manifest=str(shapes / "manifest.csv"), labels_file=str(shapes / "labels.yaml"), backbone=f"hf:{tiny_clip_dir}",
                  max_steps=2, eval_every=2, batch_size=8, cache_dir=str(tmp / "cache"), progress=False)
    run = fit(out=str(tmp / "run"), seed=1, **common)
    return {"tmp": tmp, "run": run, "common": common, "model": Predictor.from_run(run, device="cpu"),
            "manifest": read_manifest(shapes / "manifest.csv")}


def _leftovers_only(folder: Path, keep: set[str]) -> None:
    """Besides the output (and an interrupted job's OUT.parts/), only temporary files of
    the writers (.NAME.*.tmp / .old) may be left in the folder."""
    for p in folder.iterdir():
        assert p.name in keep or (p.name.startswith(".") and p.name.endswith((".tmp", ".old"))), p


# --------------------------------------------------------------------------- embed, predict


def _rows(path: Path) -> tuple[list[str], np.ndarray]:
    if path.suffix == ".parquet":
        t = pq.read_table(path)
        return t.column("image").to_pylist(), np.stack(t.column("embedding").to_numpy(zero_copy_only=False))
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    names = sorted(rows[0]["scores"])
    return [r["image"] for r in rows], np.array([[r["scores"][n] for n in names] for r in rows])


@pytest.mark.parametrize("verb,name,seed", [("embed", "e.parquet", 1), ("predict", "p.jsonl", 2)])
def test_a_killed_embed_or_predict_leaves_the_old_or_the_new_output(setup, tmp_path, verb, name, seed):
    model, m = setup["model"], setup["manifest"]
    job_fn = ev.embed_manifest if verb == "embed" else ev.predict_manifest
    out = tmp_path / name
    job_fn(model, m.select(list(range(5))), out, progress=False)  # the old output: 5 rows
    old = out.read_bytes()

    def job():
        job_fn(model, m, out, shard_rows=8, progress=False, overwrite=True)

    steps = run_forked(job, tmp_path)
    new = _rows(out)
    assert new[0] == [str(p) for p in m.images]
    for kill_at in kill_points(steps, seed):
        out.write_bytes(old)
        shutil.rmtree(tmp_path / f"{name}.parts", ignore_errors=True)
        run_forked(job, tmp_path, kill_at)
        _leftovers_only(tmp_path, {name, f"{name}.parts"})
        assert out.is_file(), f"killed at step {kill_at} of {steps}: no output at all"
        if out.read_bytes() != old:  # else the old output, whole
            images, values = _rows(out)
            assert images == new[0], f"killed at step {kill_at}: a mix"
            np.testing.assert_allclose(values, new[1], atol=1e-6)
        run_forked(job, tmp_path)  # the rerun resumes what the killed one left
        images, values = _rows(out)
        assert images == new[0]
        np.testing.assert_allclose(values, new[1], atol=1e-6)
        assert not (tmp_path / f"{name}.parts").exists()


# --------------------------------------------------------------------------- index


def test_a_killed_index_build_leaves_the_old_or_the_new_index(setup, tmp_path):
    from mumic.search import Index, build_index

    run, m = setup["run"], setup["manifest"]
    out = tmp_path / "index"
    old_manifest = tmp_path.parent / f"{tmp_path.name}-old.csv"  # beside nothing: absolute image paths
    old_manifest.write_text("image\n" + "".join(f"{p}\n" for p in m.images[:5]))
    build_index(run, old_manifest, out, backend="exact", progress=False, device="cpu", allow_outside=True, engine="torch")
    old = _snapshot(out)

    def job():
        build_index(run, m.path, out, backend="exact", overwrite=True, progress=False, device="cpu", engine="torch")

    steps = run_forked(job, tmp_path)
    new = _snapshot(out)
    assert Index.load(out, use_ann=False).count == len(m)
    for kill_at in kill_points(steps, 3):
        shutil.rmtree(out)
        for rel, data in old.items():
            (out / rel).parent.mkdir(parents=True, exist_ok=True)
            (out / rel).write_bytes(data)
        run_forked(job, tmp_path, kill_at)
        _leftovers_only(tmp_path, {"index"})
        assert out.is_dir(), f"killed at step {kill_at} of {steps}: no index at all"
        got = _snapshot(out)
        assert got in (old, new), f"killed at step {kill_at} of {steps}: a mix of {sorted(got)}"
        assert Index.load(out, use_ann=False).count in (5, len(m))
    old_manifest.unlink()


# --------------------------------------------------------------------------- train --overwrite


def same_tensors(a: bytes, b: bytes) -> bool:
    """The same tensors (the bytes of a safetensors header may order its metadata either way)."""
    from safetensors.torch import load

    ta, tb = load(a), load(b)
    return ta.keys() == tb.keys() and all(bool((ta[k] == tb[k]).all()) for k in ta)


def _not_state(name: str) -> bool:
    return name == mumic.io.LOCK_NAME  # a dead writer's lock file stays behind and blocks no one


def test_a_killed_train_overwrite_leaves_the_old_or_the_new_run(setup, tmp_path):
    from mumic.run import staging_folder
    from mumic.train import fit, resume

    run = tmp_path / "run"
    pristine = tmp_path / "pristine"
    shutil.copytree(setup["run"], pristine)
    (pristine / "notes.txt").write_text("the user's own file\n")
    (pristine / "eval-test.json").write_text("{}\n")  # an evaluation of the old weights
    old = _snapshot(pristine)

    def restore_old() -> None:
        shutil.rmtree(run, ignore_errors=True)
        shutil.rmtree(staging_folder(run).parent, ignore_errors=True)
        shutil.copytree(pristine, run)

    def job():
        fit(out=str(run), seed=2, overwrite=True, **setup["common"])

    restore_old()
    steps = run_forked(job, tmp_path)
    new = _snapshot(run, _not_state)
    assert not same_tensors(new["model.safetensors"], old["model.safetensors"])
    assert new["notes.txt"] == old["notes.txt"] and "eval-test.json" not in new and "checkpoint.safetensors" not in new

    def check(kill_at: int) -> None:
        got = _snapshot(run, _not_state) if run.is_dir() else {}
        if got == old:
            return
        assert got.keys() == new.keys(), f"killed at step {kill_at} of {steps}: a mix of {sorted(got)}"
        for k in ("thresholds.json", "labels.json", "config.yaml", "notes.txt"):
            assert got[k] == new[k], f"killed at step {kill_at} of {steps}: {k} differs"
        assert same_tensors(got["model.safetensors"], new["model.safetensors"]), f"killed at step {kill_at}: other weights"

    resumed = 0
    for kill_at in kill_points(steps, 4):
        restore_old()
        run_forked(job, tmp_path, kill_at)
        check(kill_at)
        _leftovers_only(tmp_path, {"run", "pristine", staging_folder(run).parent.name})
        if staging_folder(run).parent.exists():  # an interrupted overwrite: --resume finishes it, or says to start again
            def again():
                from mumic.errors import RunError

                try:
                    resume(run, progress=False)
                except RunError as e:
                    assert "start it again with --overwrite" in str(e) or "already finished" in str(e), e
            run_forked(again, tmp_path)
            check(kill_at)
            resumed += same_tensors(_snapshot(run, _not_state)["model.safetensors"], new["model.safetensors"])
    assert resumed >= 1  # some kill points left a new run to resume

"""`predict` and `embed` on manifests: streamed in shards, complete, ordered, resumable."""

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

import mumic.batch as ev
from mumic.data.manifest import read_manifest
from mumic.data.synthetic import make_shapes
from mumic.predictor import Predictor
from mumic.train import fit


@pytest.fixture(scope="module")
def run_and_manifest(tmp_path_factory, tiny_clip_dir):
    tmp = tmp_path_factory.mktemp("batch")
    root = make_shapes(tmp / "shapes", n=70, size=48, seed=4).parent
    run = fit(manifest=str(root / "manifest.csv"), labels_file=str(root / "labels.yaml"), out=str(tmp / "run"),
              backbone=f"hf:{tiny_clip_dir}", max_steps=2, eval_every=2, cache_dir=str(tmp / "cache"), progress=False)
    return Predictor.from_run(run, device="cpu"), read_manifest(root / "manifest.csv")


class Boom(Exception):
    pass


def _interrupt_after(monkeypatch, calls_ok):
    real = ev.manifest_embeddings
    count = {"n": 0}

    def flaky(*a, **kw):
        count["n"] += 1
        if count["n"] > calls_ok:
            raise Boom
        return real(*a, **kw)

    monkeypatch.setattr(ev, "manifest_embeddings", flaky)
    return count


def test_embed_in_shards_equals_one_pass_and_resumes(run_and_manifest, tmp_path, monkeypatch):
    model, m = run_and_manifest
    whole = tmp_path / "whole.parquet"
    ev.embed_manifest(model, m, whole, shard_rows=1000, progress=False)
    ref = pq.read_table(whole)
    assert ref.num_rows == len(m)
    assert ref.column("image").to_pylist() == [str(p) for p in m.images]  # complete and in order

    out = tmp_path / "cut.parquet"
    _interrupt_after(monkeypatch, 2)
    with pytest.raises(Boom):
        ev.embed_manifest(model, m, out, shard_rows=20, progress=False)
    parts = sorted((tmp_path / "cut.parquet.parts").glob("part-*.parquet"))
    assert len(parts) == 2 and not out.exists()
    monkeypatch.undo()
    count = _interrupt_after(monkeypatch, 100)
    ev.embed_manifest(model, m, out, shard_rows=20, progress=False)
    assert count["n"] == 2  # only the 2 missing shards of 4 were computed
    got = pq.read_table(out)
    assert got.column("image").to_pylist() == ref.column("image").to_pylist()
    np.testing.assert_allclose(np.stack(got.column("embedding").to_numpy(zero_copy_only=False)),
                               np.stack(ref.column("embedding").to_numpy(zero_copy_only=False)), atol=1e-6)
    assert not (tmp_path / "cut.parquet.parts").exists()


def test_predict_jsonl_and_parquet_agree(run_and_manifest, tmp_path):
    model, m = run_and_manifest
    ev.predict_manifest(model, m, tmp_path / "p.jsonl", shard_rows=25, progress=False)
    ev.predict_manifest(model, m, tmp_path / "p.parquet", shard_rows=25, progress=False)
    rows = [json.loads(l) for l in (tmp_path / "p.jsonl").read_text().splitlines()]
    t = pq.read_table(tmp_path / "p.parquet")
    names = json.loads(t.schema.metadata[b"labels"])
    assert len(rows) == t.num_rows == len(m)
    for r, scores, pred in zip(rows, t.column("scores").to_pylist(), t.column("predicted").to_pylist()):
        assert pred == r["predicted"]
        np.testing.assert_allclose([r["scores"][n] for n in names], scores, atol=1e-5)
    direct = model.predict_proba(m.images)
    np.testing.assert_allclose(np.array(t.column("scores").to_pylist()), direct, atol=1e-5)


def test_a_different_job_does_not_reuse_parts(run_and_manifest, tmp_path, monkeypatch):
    model, m = run_and_manifest
    out = tmp_path / "p.jsonl"
    _interrupt_after(monkeypatch, 1)
    with pytest.raises(Boom):
        ev.predict_manifest(model, m, out, shard_rows=20, progress=False)
    monkeypatch.undo()
    ev.predict_manifest(model, m, out, labels=["red", "zebra"], shard_rows=20, progress=False)
    rows = [json.loads(l) for l in out.read_text().splitlines()]
    assert len(rows) == len(m) and all(set(r["scores"]) == {"red", "zebra"} for r in rows)


def test_a_finished_output_is_replaced_only_with_overwrite(run_and_manifest, tmp_path, monkeypatch):
    from mumic.errors import ConfigError

    model, m = run_and_manifest
    one = m.select([0])
    for out, job in ((tmp_path / "e.parquet", ev.embed_manifest), (tmp_path / "p.jsonl", ev.predict_manifest)):
        job(model, m, out, shard_rows=1000, progress=False)
        before = out.read_bytes()
        with pytest.raises(ConfigError, match=rf"^{out} already exists; pass --overwrite"):
            job(model, one, out, progress=False)
        assert out.read_bytes() == before  # the 70-row file is still there
        assert job(model, one, out, progress=False, overwrite=True) == 1

    # an interrupted job resumes without overwrite: its shards are not a finished output
    out = tmp_path / "cut.jsonl"
    _interrupt_after(monkeypatch, 1)
    with pytest.raises(Boom):
        ev.predict_manifest(model, m, out, shard_rows=20, progress=False)
    monkeypatch.undo()
    assert ev.predict_manifest(model, m, out, shard_rows=20, progress=False) == len(m)


def test_an_input_of_the_job_is_never_its_output(run_and_manifest, tmp_path):
    import shutil

    from mumic.errors import ConfigError

    model, m = run_and_manifest
    labels = model.run_dir / "labels.json"
    before = labels.read_bytes(), m.path.read_bytes()
    for out, what in ((m.path, "a manifest given as input"), (labels, "a file of the run"), (m.images[3], "an image of the input")):
        for job in (ev.embed_manifest, ev.predict_manifest):
            with pytest.raises(ConfigError, match=f"is {what}"):
                job(model, m, out, progress=False, overwrite=True)
    assert (labels.read_bytes(), m.path.read_bytes()) == before
    # several inputs: the second manifest is an input too
    second = tmp_path / "second.csv"
    shutil.copy(m.path, second)
    from mumic.data.inputs import inputs_manifest

    both = inputs_manifest([m.path, second], allow_outside=True)
    with pytest.raises(ConfigError, match="is a manifest given as input"):
        ev.embed_manifest(model, both, second, progress=False, overwrite=True)


def test_index_takes_a_folder_like_predict(run_and_manifest, tmp_path):
    from mumic.search import Index, build_index

    model, m = run_and_manifest
    folder = m.images[0].parent
    assert all(p.parent == folder for p in m.images)
    out = build_index(model.run_dir, [folder], tmp_path / "index", backend="exact", progress=False, device="cpu")
    meta = json.loads((out / "index.json").read_text())
    assert meta["count"] == len(m) and meta["manifest"] is None
    assert Index.load(out, use_ann=False).items["image"].tolist() == sorted(str(p) for p in m.images)


def test_progress_moves_batch_by_batch_even_in_one_shard(run_and_manifest, tmp_path, monkeypatch):
    """The bar is told about every batch (what it draws, and when, is tqdm's business)."""
    bars = []

    class Recorder:
        def __init__(self, *args, total=None, disable=False, **kw):
            self.total, self.disable, self.updates = total, disable, []
            bars.append(self)

        def update(self, n=1):
            self.updates.append(n)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(ev, "tqdm", Recorder)
    model, m = run_and_manifest
    ev.predict_manifest(model, m, tmp_path / "p.jsonl", batch_size=10, shard_rows=4096)  # one shard, 7 batches
    (bar,) = bars
    assert not bar.disable and bar.total == 70 and bar.updates == [10] * 7
    ev.predict_manifest(model, m, tmp_path / "q.jsonl", progress=False)
    assert bars[-1].disable


# ----------------------------------------------------------------- resume trusts only its own shards


def _embeddings(path):
    t = pq.read_table(path)
    return t.column("image").to_pylist(), np.stack(t.column("embedding").to_numpy(zero_copy_only=False))


def test_a_rerun_with_another_shard_size_writes_every_row(run_and_manifest, tmp_path, monkeypatch, caplog):
    model, m = run_and_manifest
    out = tmp_path / "e.parquet"
    _interrupt_after(monkeypatch, 2)
    with pytest.raises(Boom):
        ev.embed_manifest(model, m, out, shard_rows=20, progress=False)  # parts 0 and 1 of 4 written
    monkeypatch.undo()
    # with 50 rows a shard there are 2 shards: parts 0 and 1 exist, but hold 20 rows each
    assert ev.embed_manifest(model, m, out, shard_rows=50, progress=False) == len(m)
    images, emb = _embeddings(out)
    assert images == [str(p) for p in m.images]
    ev.embed_manifest(model, m, tmp_path / "fresh.parquet", shard_rows=1000, progress=False)
    np.testing.assert_allclose(emb, _embeddings(tmp_path / "fresh.parquet")[1], atol=1e-6)
    assert "discarding the shards" in caplog.text and "shard_rows differ" in caplog.text


def test_new_weights_at_the_same_run_path_restart_the_job(run_and_manifest, tmp_path, monkeypatch):
    import shutil

    import torch

    from mumic.io import load_tensors, save_tensors

    model, m = run_and_manifest
    run = Path(shutil.copytree(model.run_dir, tmp_path / "run"))
    old = Predictor.from_run(run, device="cpu")
    out = tmp_path / "e.parquet"
    _interrupt_after(monkeypatch, 2)
    with pytest.raises(Boom):
        ev.embed_manifest(old, m, out, shard_rows=20, progress=False)
    monkeypatch.undo()
    weights = load_tensors(run / "model.safetensors")
    g = torch.Generator().manual_seed(0)
    save_tensors(run / "model.safetensors", {k: v + 0.5 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v
                                             for k, v in weights.items()})
    new = Predictor.from_run(run, device="cpu")
    ev.embed_manifest(new, m, out, shard_rows=20, progress=False)
    ev.embed_manifest(new, m, tmp_path / "fresh.parquet", shard_rows=1000, progress=False)
    ev.embed_manifest(old, m, tmp_path / "old.parquet", shard_rows=1000, progress=False)
    got, fresh, before = (_embeddings(p)[1] for p in (out, tmp_path / "fresh.parquet", tmp_path / "old.parquet"))
    assert np.abs(fresh - before).max() > 0.05  # the new weights embed differently
    np.testing.assert_allclose(got, fresh, atol=1e-6)  # every row from the new weights


def test_new_manifest_content_at_the_same_path_restarts_the_job(run_and_manifest, tmp_path, monkeypatch):
    model, m = run_and_manifest
    lines = m.path.read_text().splitlines()
    header, first, middle, last = lines[0], lines[1], lines[2:-1], lines[-1]
    path = m.path.with_name(f"m-{tmp_path.name}.csv")  # beside the images, as the original
    path.write_text("\n".join([header, first, *middle, last]) + "\n")
    out = tmp_path / "p.jsonl"
    _interrupt_after(monkeypatch, 2)
    with pytest.raises(Boom):
        ev.predict_manifest(model, read_manifest(path), out, shard_rows=20, progress=False)
    monkeypatch.undo()
    # same path, same row count, same first and last image: only the order inside differs
    path.write_text("\n".join([header, first, *reversed(middle), last]) + "\n")
    changed = read_manifest(path)
    ev.predict_manifest(model, changed, out, shard_rows=20, progress=False)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["image"] for r in rows] == [str(p) for p in changed.images]
    direct = model.predict_proba(changed.images)
    names = [s.name for s in model.scored_labels]
    np.testing.assert_allclose([[r["scores"][n] for n in names] for r in rows], direct, atol=1e-5)

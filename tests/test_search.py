"""Index building and nearest-image search: exact reference, HNSW recall, index folders,
the run check, and the `index` / `search` commands."""

import json

import numpy as np
import pandas as pd
import pytest

from mumic.config import load_config
from mumic.data.manifest import read_manifest
from mumic.data.synthetic import make_shapes
from mumic.errors import IndexFolderError, MumicError, RunError
from mumic.search import (
    Index,
    build_index,
    exact_search,
    recall_at_k,
    search_index,
    write_index,
)
from mumic.train import fit


def unit_rows(n, d, seed=0):
    x = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.fixture(scope="session")
def search_shapes(tmp_path_factory):
    return make_shapes(tmp_path_factory.mktemp("search_shapes"), n=60, size=48, seed=3).parent


@pytest.fixture(scope="session")
def search_run(search_shapes, tmp_path_factory, tiny_clip_dir):
    tmp = tmp_path_factory.mktemp("search_run")
    cfg = load_config(overrides={
        "manifest": str(search_shapes / "manifest.csv"), "labels_file": str(search_shapes / "labels.yaml"), "out": str(tmp / "run"),
        "cache_dir": str(tmp / "cache"), "backbone": f"hf:{tiny_clip_dir}", "batch_size": 16, "eval_every": 2, "max_steps": 4,
        "warmup_steps": 1, "patience": 100, "majority_n": 3,
    })
    return fit(cfg, progress=False)


@pytest.fixture
def fake_run(tmp_path):
    """A folder with the two files an index fingerprints (enough for write_index)."""
    run = tmp_path / "fake-run"
    run.mkdir()
    (run / "model.safetensors").write_bytes(b"weights")
    (run / "labels.json").write_text("{}")
    return run


def test_exact_search_is_a_sorted_dot_product():
    x = unit_rows(200, 8)
    q = unit_rows(5, 8, seed=1)
    scores, ids = exact_search(x, q, 10)
    full = q @ x.T
    for r in range(5):
        want = np.argsort(-full[r], kind="stable")[:10]
        np.testing.assert_array_equal(ids[r], want)
        np.testing.assert_allclose(scores[r], full[r, want], rtol=1e-6)
    # ties are broken by id, and k larger than the collection returns everything
    tied = np.ones((4, 2), np.float32) / np.sqrt(2)
    s, i = exact_search(tied, tied[:1], 10)
    assert i.tolist() == [[0, 1, 2, 3]] and s.shape == (1, 4)


def test_hnsw_recall_against_exact(fake_run, tmp_path):
    x = unit_rows(2000, 32)
    q = unit_rows(100, 32, seed=1)
    frame = pd.DataFrame({"image": [f"img{i}.png" for i in range(len(x))]})
    write_index(tmp_path / "idx", x, frame, run_dir=fake_run)
    index = Index.load(tmp_path / "idx")
    assert index.ann is not None and index.count == 2000 and index.dim == 32
    _, exact_ids = index.search(q, 10, exact=True)
    _, ann_ids = index.search(q, 10)
    assert recall_at_k(ann_ids, exact_ids, 10) >= 0.95
    # every indexed vector finds itself first
    _, self_ids = index.search(x[:50], 1)
    assert self_ids[:, 0].tolist() == list(range(50))
    # the same vectors give the same graph (single-threaded build)
    write_index(tmp_path / "idx2", x, frame, run_dir=fake_run)
    again = Index.load(tmp_path / "idx2")
    np.testing.assert_array_equal(again.search(q, 10)[1], ann_ids)


def test_items_keep_mixed_and_missing_columns(fake_run, tmp_path):
    frame = pd.DataFrame({
        "image": ["a.png", "b.png", "c.png"],
        "labels": [["cat", "dog"], "cat", None],  # lists and text in one column
        "score": [0.5, float("nan"), 2.0],  # a column named like a result field
    })
    write_index(tmp_path / "idx", unit_rows(3, 4), frame, run_dir=fake_run, backend="exact")
    index = Index.load(tmp_path / "idx")
    assert index.item(0) == {"image": "a.png", "labels": '["cat", "dog"]', "manifest_score": 0.5}
    assert index.item(1)["labels"] == "cat" and index.item(1)["manifest_score"] is None
    assert index.item(2)["labels"] is None
    hit = index.results(*[a[0] for a in index.search(unit_rows(1, 4, seed=5), 2)])[0]
    assert set(hit) == {"rank", "score", "id", "image", "labels", "manifest_score"}
    json.dumps(hit)


def test_index_folder_contents_and_search(search_run, search_shapes, tmp_path):
    from mumic.predictor import Predictor

    out = build_index(search_run, search_shapes / "manifest.csv", tmp_path / "index", progress=False, device="cpu")
    names = {p.name for p in out.iterdir()}
    assert names == {"index.json", "embeddings.npy", "items.parquet", "ann.faiss"}
    meta = json.loads((out / "index.json").read_text())
    assert meta["count"] == 60 and meta["dim"] == 16 and meta["metric"] == "cosine" and meta["backend"] == "faiss"
    assert meta["run"] == str(search_run.resolve())
    emb = np.load(out / "embeddings.npy")
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    manifest = read_manifest(search_shapes / "manifest.csv")
    model = Predictor.from_run(search_run, device="cpu")
    np.testing.assert_allclose(emb, model.embed_images(manifest.images), atol=1e-5)
    items = pd.read_parquet(out / "items.parquet")
    assert items["image"].tolist() == [str(p) for p in manifest.images]
    assert {"labels", "split"} <= set(items.columns)

    hits = search_index(out, image=manifest.images[7], k=3, device="cpu")
    assert hits[0]["image"] == str(manifest.images[7]) and hits[0]["score"] == pytest.approx(1.0, abs=1e-4)
    assert [h["rank"] for h in hits] == [1, 2, 3]
    text_hits = search_index(out, text="a drawing of a blue shape.", k=60, device="cpu")
    exact_hits = search_index(out, text="a drawing of a blue shape.", k=60, exact=True, device="cpu")
    assert len(exact_hits) == 60
    q = model.embed_texts(["a drawing of a blue shape."])[0]
    want = np.argsort(-(emb @ q), kind="stable")[:5].tolist()
    assert [h["id"] for h in exact_hits[:5]] == want
    assert recall_at_k([[h["id"] for h in text_hits[:10]]], [[h["id"] for h in exact_hits[:10]]], 10) >= 0.9

    with pytest.raises(MumicError, match="exactly one query"):
        search_index(out, text="red", image=manifest.images[0])
    with pytest.raises(RunError, match="--overwrite"):
        build_index(search_run, search_shapes / "manifest.csv", out, progress=False, device="cpu")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "keep.txt").write_text("mine")
    with pytest.raises(RunError, match="not an index folder"):
        build_index(search_run, search_shapes / "manifest.csv", tmp_path / "notes", overwrite=True, progress=False, device="cpu")
    assert (tmp_path / "notes" / "keep.txt").read_text() == "mine"


def test_index_refuses_another_run_and_damaged_files(search_run, search_shapes, tmp_path, fake_run):
    out = build_index(search_run, search_shapes / "manifest.csv", tmp_path / "index", backend="exact", progress=False, device="cpu")
    assert not (out / "ann.faiss").exists()
    assert Index.load(out).ann is None  # exact-only index: searches are exact
    with pytest.raises(IndexFolderError, match="rebuild it"):
        Index.load(out).check_run(fake_run)
    np.save(out / "embeddings.npy", np.zeros((3, 16), np.float32))
    with pytest.raises(IndexFolderError, match="rebuild the index"):
        Index.load(out)
    with pytest.raises(IndexFolderError, match="not an index folder"):
        Index.load(tmp_path)


def test_index_and_search_commands(search_run, search_shapes, tmp_path, capsys):
    from mumic.cli import main

    out = tmp_path / "index"
    assert main(["index", str(search_run), str(search_shapes / "manifest.csv"), "--out", str(out), "--device", "cpu", "--no-progress"]) == 0
    assert "indexed 60 images" in capsys.readouterr().err
    assert main(["search", str(out), "--text", "a drawing of a red shape.", "-k", "4", "--device", "cpu"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    hits = [json.loads(l) for l in lines]
    assert len(hits) == 4 and [h["rank"] for h in hits] == [1, 2, 3, 4]
    assert {"score", "image", "labels", "id"} <= set(hits[0])
    with pytest.raises(SystemExit):  # --text and --image are exclusive, one is required
        main(["search", str(out)])


def test_index_from_embeddings_equals_indexing_the_images_and_refuses_another_run(search_run, search_shapes, tmp_path):
    import shutil

    from mumic.cli import main

    m = str(search_shapes / "manifest.csv")
    assert main(["embed", str(search_run), m, "--out", str(tmp_path / "e.parquet"), "--device", "cpu"]) == 0
    assert main(["index", str(search_run), "--from-embeddings", str(tmp_path / "e.parquet"), "--out", str(tmp_path / "a"),
                 "--backend", "exact"]) == 0
    assert main(["index", str(search_run), m, "--out", str(tmp_path / "b"), "--backend", "exact", "--device", "cpu",
                 "--no-progress"]) == 0
    a, b = Index.load(tmp_path / "a"), Index.load(tmp_path / "b")
    assert a.count == b.count == 60
    np.testing.assert_allclose(a.embeddings, b.embeddings, atol=1e-5)
    assert list(a.items["image"]) == list(b.items["image"])
    # the file names the run that made it: other weights of the run are refused
    other = tmp_path / "other"
    shutil.copytree(search_run, other)
    (other / "labels.json").write_text((other / "labels.json").read_text().replace('"tau"', '"tau" ', 1))
    with pytest.raises(RunError, match="embedded with another run"):
        from mumic.search import index_from_embeddings

        index_from_embeddings(other, tmp_path / "e.parquet", tmp_path / "c")
    assert main(["index", str(search_run), "--out", str(tmp_path / "d")]) == 2  # nothing to index: one line, exit 2

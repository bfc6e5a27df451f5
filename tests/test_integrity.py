"""Files mumic keeps for later (feature-cache shards, cached ONNX graphs, index folders)
are checked when read: a damaged cache entry is computed again, a mixed index is refused."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mumic.backbones import load_backbone
from mumic.features import cached_features, extract_features
from mumic.io import load_tensors


@pytest.fixture(scope="module")
def backbone(tiny_clip_dir):
    return load_backbone(f"hf:{tiny_clip_dir}")


def _images(folder: Path, n: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        paths.append(folder / f"{i}.png")
        Image.new("RGB", (40, 40), (50 * i, 90, 200 - 30 * i)).save(paths[-1])
    return paths


# ============================================================================ feature cache


def test_a_tampered_feature_shard_is_computed_again(backbone, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from safetensors import safe_open
    from safetensors.torch import save_file

    paths = _images(tmp_path / "img", 3)
    cache = tmp_path / "cache"
    reference = extract_features(backbone, paths, progress=False)
    first = cached_features(backbone, paths, cache_dir=cache, progress=False)
    torch.testing.assert_close(first, reference)
    (shard,) = cache.rglob("shard-*.safetensors")
    # rows overwritten with 1e30, the metadata (and its digest) kept as written
    with safe_open(str(shard), framework="pt") as f:
        meta = f.metadata()
        feats = f.get_tensor("features")
    feats[1:] = 1e30
    save_file({"features": feats}, str(shard), metadata=meta)
    with caplog.at_level(logging.WARNING, logger="mumic.features"):
        again = cached_features(backbone, paths, cache_dir=cache, progress=False)
    torch.testing.assert_close(again, reference)
    assert f"feature cache shard {shard} is damaged" in caplog.text and "computing its 3 features again" in caplog.text
    # rewritten: the cache holds the right features again, under a digest that matches
    (rewritten,) = cache.rglob("shard-*.safetensors")
    torch.testing.assert_close(load_tensors(rewritten)["features"], reference)


# ============================================================================ cached ONNX graphs


def test_a_damaged_cached_onnx_graph_is_exported_again(backbone, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    import mumic.backbones.onnx as onnx_mod
    from mumic.backbones.onnx import OnnxImageTower

    px = torch.randint(0, 256, (2, 3, backbone.image_size, backbone.image_size), dtype=torch.uint8)
    with torch.no_grad():
        reference = backbone.image_features(px)
    tower = OnnxImageTower(backbone, cache_dir=tmp_path)
    graph, record = tower.path, tower.path.with_name(tower.path.name + ".sha256")
    assert record.read_text().strip() == onnx_mod.file_sha256(graph)
    size = graph.stat().st_size

    graph.write_bytes(graph.read_bytes()[: size // 2])  # truncated: onnxruntime would raise InvalidProtobuf
    with caplog.at_level(logging.WARNING, logger="mumic.backbones.onnx"):
        tower = OnnxImageTower(backbone, cache_dir=tmp_path)
    assert "sha256 differs" in caplog.text and "exporting it again" in caplog.text
    assert graph.stat().st_size == size
    torch.testing.assert_close(tower(px), reference, atol=1e-5, rtol=1e-4)

    # a graph cached before digests were recorded: trusted once it loads, re-exported when it does not
    record.unlink()
    monkeypatch.setattr(onnx_mod, "onnx_export", lambda *a, **k: pytest.fail("exported a graph that loads"))
    OnnxImageTower(backbone, cache_dir=tmp_path)
    assert record.is_file()
    monkeypatch.undo()
    record.unlink()
    graph.write_bytes(graph.read_bytes()[:1000])
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="mumic.backbones.onnx"):
        tower = OnnxImageTower(backbone, cache_dir=tmp_path)
    assert "onnxruntime cannot load it" in caplog.text
    torch.testing.assert_close(tower(px), reference, atol=1e-5, rtol=1e-4)
    assert not list(graph.parent.glob(".*tmp"))


# ============================================================================ index folders


@pytest.fixture
def two_indexes(tmp_path: Path) -> tuple[Path, Path]:
    """Two faiss indexes of the same run, count and dimension, over other vectors and items."""
    import pandas as pd

    from mumic.search import write_index

    run = tmp_path / "run"
    run.mkdir()
    (run / "model.safetensors").write_bytes(b"weights")
    (run / "labels.json").write_text("{}")
    out = []
    for name, seed in (("a", 0), ("b", 1)):
        x = np.random.default_rng(seed).standard_normal((40, 8)).astype(np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        frame = pd.DataFrame({"image": [f"/{name}/{i:03d}.png" for i in range(40)], "labels": [name] * 40})
        out.append(write_index(tmp_path / name, x, frame, run_dir=run))
    return out[0], out[1]


@pytest.mark.parametrize("swapped,named", [
    (("items.parquet",), "items.parquet"),
    (("embeddings.npy", "ann.faiss"), "embeddings.npy"),
    (("ann.faiss",), "ann.faiss"),
])
def test_a_file_from_another_index_is_refused(two_indexes, swapped: tuple[str, ...], named: str) -> None:
    import shutil

    from mumic.errors import IndexFolderError
    from mumic.search import Index

    a, b = two_indexes
    q = Index.load(a).embeddings[:3]
    _, ids = Index.load(a).search(q, 1)
    assert ids[:, 0].tolist() == [0, 1, 2]
    for name in swapped:
        shutil.copyfile(b / name, a / name)
    with pytest.raises(IndexFolderError) as info:
        Index.load(a)
    msg = str(info.value)
    assert msg.startswith(f"{a / named} is not the file this index was written with") and "rebuild the index" in msg, msg
    if swapped == ("ann.faiss",):
        assert Index.load(a, use_ann=False).count == 40  # exact search does not read the graph


def test_large_index_files_are_bound_by_a_sample(two_indexes, monkeypatch: pytest.MonkeyPatch) -> None:
    import json
    import shutil

    import mumic.search as search
    from mumic.errors import IndexFolderError
    from mumic.search import Index, write_index

    a, b = two_indexes
    monkeypatch.setattr(search, "FULL_DIGEST_BYTES", 100)  # every file but the smallest counts as large
    big = write_index(a.parent / "big", Index.load(a).embeddings, Index.load(a).items, run_dir=a.parent / "run", backend="exact")
    records = json.loads((big / "index.json").read_text())["file_digests"]
    assert set(records["embeddings.npy"]) == {"bytes", "sampled_sha256"}
    assert records["embeddings.npy"]["bytes"] == (big / "embeddings.npy").stat().st_size
    shutil.copyfile(b / "embeddings.npy", big / "embeddings.npy")  # the same size, other vectors
    with pytest.raises(IndexFolderError, match=r"embeddings.npy is not the file this index was written with \(its content differs"):
        Index.load(big)


def test_an_index_without_digests_still_loads_with_a_warning(two_indexes, caplog: pytest.LogCaptureFixture) -> None:
    import json

    from mumic.search import Index

    a, _ = two_indexes
    meta = json.loads((a / "index.json").read_text())
    del meta["file_digests"]
    (a / "index.json").write_text(json.dumps(meta))
    with caplog.at_level(logging.WARNING, logger="mumic.search"):
        assert Index.load(a).count == 40
    assert "records no file digests" in caplog.text


def test_sampled_sha256_reads_a_sample(tmp_path: Path) -> None:
    import hashlib

    from mumic.io import sampled_sha256

    data = bytearray(np.random.default_rng(0).integers(0, 256, 100_000, dtype=np.uint8).tobytes())
    path = tmp_path / "f.bin"
    path.write_bytes(data)
    kw = {"ends": 1000, "blocks": 4, "block": 100}
    base = sampled_sha256(path, **kw)
    # by hand: the size and settings, the first 1000 bytes, blocks at 1000 + k * (100000 - 2000 - 100) // 3, the last 1000
    span = 100_000 - 2000 - 100
    h = hashlib.sha256(b"100000|1000|4|100" + data[:1000])
    for k in range(4):
        h.update(data[1000 + span * k // 3: 1000 + span * k // 3 + 100])
    h.update(data[-1000:])
    assert base == h.hexdigest()
    for offset in (10, 1000 + span // 3 + 5, 99_990):  # in the head, a block, the tail
        changed = bytearray(data)
        changed[offset] ^= 1
        path.write_bytes(changed)
        assert sampled_sha256(path, **kw) != base
    changed = bytearray(data)
    changed[50_000] ^= 1  # between the samples: only a full digest sees it
    path.write_bytes(changed)
    assert sampled_sha256(path, **kw) == base
    path.write_bytes(data[:-1])
    assert sampled_sha256(path, **kw) != base
    path.write_bytes(data[:500])  # small files are hashed whole
    assert sampled_sha256(path, **kw) == hashlib.sha256(b"500|1000|4|100" + data[:500]).hexdigest()

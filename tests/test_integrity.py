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


_ = np  # numpy is used by the index tests below

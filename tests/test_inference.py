"""The inference path: batch splitting on GPU out-of-memory, torch.compile parity."""

import numpy as np
import pytest
import torch

from mumic.backbones import load_backbone
from mumic.data.manifest import LabelSpec
from mumic.predictor import Predictor


@pytest.fixture()
def model(tiny_clip_dir):
    return Predictor(load_backbone(f"hf:{tiny_clip_dir}"), [LabelSpec("cat"), LabelSpec("dog")], ["a photo of {}."]).eval()


def _images(n, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (40, 50, 3), dtype=np.uint8) for _ in range(n)]


def test_out_of_memory_batches_are_split_not_failed(model, monkeypatch, caplog):
    imgs = _images(10)
    ref = model.predict_proba(imgs, batch_size=10)
    ref_emb = model.embed_images(imgs, batch_size=10)
    real = model.backbone.image_features
    calls = []  # (batch size, whether it fit)

    def small_gpu(px):
        calls.append((len(px), len(px) <= 3))
        if len(px) > 3:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(px)

    monkeypatch.setattr(model.backbone, "image_features", small_gpu)
    with caplog.at_level("WARNING", logger="mumic.model"):
        got = model.predict_proba(imgs, batch_size=10)
    # halves until a part fits: 10 -> 5 + 5, each 5 -> 2 + 3
    assert calls == [(10, False), (5, False), (2, True), (3, True), (5, False), (2, True), (3, True)]
    # every image went through the tower exactly once, and the parts are put back in order
    assert sum(n for n, fit in calls if fit) == len(imgs)
    np.testing.assert_allclose(got, ref, atol=1e-6)
    assert [r.getMessage() for r in caplog.records] == [f"batch of {n} images does not fit in GPU memory; splitting it" for n in (10, 5, 5)]
    calls.clear()
    np.testing.assert_allclose(model.embed_images(imgs, batch_size=10), ref_emb, atol=1e-6)
    assert sum(n for n, fit in calls if fit) == len(imgs)


def test_out_of_memory_on_one_image_is_raised(model, monkeypatch):
    def no_gpu(px):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")

    monkeypatch.setattr(model.backbone, "image_features", no_gpu)
    with pytest.raises(torch.cuda.OutOfMemoryError):
        model.predict_proba(_images(1))


@pytest.mark.slow
def test_compiled_tower_gives_the_same_embeddings(model):
    imgs = _images(6, seed=1)
    ref = model.embed_images(imgs, batch_size=6)
    got = model.compile_image_tower().embed_images(imgs, batch_size=6)
    np.testing.assert_allclose(got, ref, atol=1e-4)


def test_onnxruntime_engine_matches_torch_and_caches_its_graph(model, tmp_path, monkeypatch):
    import mumic.backbones.onnx as export

    imgs = _images(5, seed=2)
    ref = model.embed_images(imgs, batch_size=2)
    model.set_engine("onnxruntime", cache_dir=tmp_path)
    graphs = list((tmp_path / "onnx").glob("image-tower-*.onnx"))
    assert len(graphs) == 1 and not list((tmp_path / "onnx").glob(".*tmp"))
    got = model.embed_images(imgs, batch_size=2)  # batches of 2 and 1: the batch axis is dynamic
    np.testing.assert_allclose(got, ref, atol=1e-5)
    probs_ref = model.set_engine("torch").predict_proba(imgs)
    # a second model with the same tower loads the cached graph instead of exporting it again
    monkeypatch.setattr(export, "onnx_export", lambda *a, **k: pytest.fail("exported twice"))
    np.testing.assert_allclose(model.set_engine("onnxruntime", cache_dir=tmp_path).predict_proba(imgs), probs_ref, atol=1e-5)
    # other tower weights are another graph
    with torch.no_grad():
        next(model.backbone.image_tower.parameters()).add_(0.5)
    monkeypatch.undo()
    model.set_engine("onnxruntime", cache_dir=tmp_path)
    assert len(list((tmp_path / "onnx").glob("image-tower-*.onnx"))) == 2
    # training never runs through the engine
    px = torch.zeros((1, 3, model.backbone.image_size, model.backbone.image_size), dtype=torch.uint8)
    model._onnx_tower = lambda pixels: pytest.fail("the engine ran in training")
    model.train()
    assert model._tower(px).shape == (1, model.backbone.image_feature_dim)


def test_engine_choice_errors_name_the_problem(model):
    from mumic.backbones.onnx import resolve_engine
    from mumic.errors import ConfigError

    assert resolve_engine("auto", "cpu") == "onnxruntime" and resolve_engine("auto", "cuda") == "torch"
    with pytest.raises(ConfigError, match="engine must be one of auto, torch, onnxruntime, got 'ort'"):
        model.set_engine("ort")
    with pytest.raises(ConfigError, match="runs the image tower on the CPU, but the model is on cuda"):
        resolve_engine("onnxruntime", "cuda")

"""The inference path: batch splitting on GPU out-of-memory, torch.compile parity."""

import numpy as np
import pytest
import torch

from mumic.backbones import load_backbone
from mumic.data.manifest import LabelSpec
from mumic.model import MuMIC


@pytest.fixture()
def model(tiny_clip_dir):
    return MuMIC(load_backbone(f"hf:{tiny_clip_dir}"), [LabelSpec("cat"), LabelSpec("dog")], ["a photo of {}."]).eval()


def _images(n, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (40, 50, 3), dtype=np.uint8) for _ in range(n)]


def test_out_of_memory_batches_are_split_not_failed(model, monkeypatch):
    imgs = _images(10)
    ref = model.predict_proba(imgs, batch_size=10)
    real = model.backbone.image_features
    sizes = []

    def small_gpu(px):
        sizes.append(len(px))
        if len(px) > 3:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(px)

    monkeypatch.setattr(model.backbone, "image_features", small_gpu)
    got = model.predict_proba(imgs, batch_size=10)
    np.testing.assert_allclose(got, ref, atol=1e-6)
    assert max(s for s in sizes if s <= 3) <= 3 and sizes[0] == 10


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

"""A run's stored class embeddings: scoring its own labels needs no text tower, and gives
the same numbers as computing them; anything else falls back to the text tower."""

import numpy as np
import pytest
import torch

from mumic.config import load_config
from mumic.data.synthetic import make_shapes
from mumic.io import save_tensors
from mumic.predictor import Predictor
from mumic.run import CLASS_EMBEDDINGS
from mumic.train import fit


@pytest.fixture(scope="module")
def lite_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("lite")
    shapes = make_shapes(root / "shapes", n=48, size=48, seed=3).parent
    cfg = load_config(overrides={
        "manifest": str(shapes / "manifest.csv"), "labels_file": str(shapes / "labels.yaml"), "out": str(root / "run"),
        "cache_dir": str(root / "cache"), "backbone": "lite", "image_size": 64, "batch_size": 16, "eval_every": 2,
        "max_steps": 4, "warmup_steps": 1, "patience": 100, "majority_n": 3,
    })
    return fit(cfg, progress=False), sorted((shapes / "images").iterdir())[:5]


def test_run_labels_are_scored_without_loading_the_text_tower(lite_run):
    run, images = lite_run
    assert (run / CLASS_EMBEDDINGS).is_file()
    lazy = Predictor.from_run(run, device="cpu")
    p_lazy = lazy.predict_proba(images)
    assert lazy.backbone.tokenizer is None  # MiniLM was never loaded
    eager = Predictor.from_run(run, device="cpu", lazy_text=False)
    eager._stored_v = None  # every class embedding from the text tower
    np.testing.assert_allclose(p_lazy, eager.predict_proba(images), atol=1e-6)
    # a new label needs the text tower: it is loaded then, and agrees with the eager one
    p_new = lazy.predict_proba(images, labels=["a red circle", lazy.labels[0].name])
    assert lazy.backbone.tokenizer is not None
    np.testing.assert_allclose(p_new, eager.predict_proba(images, labels=["a red circle", lazy.labels[0].name]), atol=1e-6)


def test_stored_embeddings_of_other_weights_are_ignored(lite_run, tmp_path):
    import shutil

    run, images = lite_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    truth = Predictor.from_run(copy, device="cpu").predict_proba(images)
    v = torch.randn(len(Predictor.from_run(copy, device="cpu").labels), 384)
    save_tensors(copy / CLASS_EMBEDDINGS, {"v": v}, metadata={"weights": "0" * 64, "labels": "[]"})
    stale = Predictor.from_run(copy, device="cpu")
    assert getattr(stale, "_stored_v", None) is None
    np.testing.assert_allclose(stale.predict_proba(images), truth, atol=1e-6)


def test_onnxruntime_text_tower_matches_torch_and_skips_transformers(lite_run, tmp_path):
    import os
    import subprocess
    import sys

    run, images = lite_run
    texts = ["a red circle", "A Blue SQUARE with ünïcödé", "shape " * 200]  # the last one is truncated at 128 tokens
    torch_model = Predictor.from_run(run, device="cpu").set_engine("torch")
    ort_model = Predictor.from_run(run, device="cpu").set_engine("onnxruntime", cache_dir=tmp_path)
    np.testing.assert_allclose(ort_model.embed_texts(texts), torch_model.embed_texts(texts), atol=1e-5)
    np.testing.assert_allclose(ort_model.predict_proba(images, labels=["a red circle"]),
                               torch_model.predict_proba(images, labels=["a red circle"]), atol=1e-5)
    # with the graph cached, a text query imports neither transformers nor MiniLM's model code
    code = (f"import sys; from mumic.predictor import Predictor; m = Predictor.from_run({str(run)!r}, device='cpu')"
            f".set_engine('onnxruntime', cache_dir={str(tmp_path)!r}); m.embed_texts(['a red circle']); "
            "print(sorted(k for k in sys.modules if k.split('.')[0] == 'transformers'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=os.environ, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"

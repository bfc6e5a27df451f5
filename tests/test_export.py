"""ONNX export: both graphs run in onnxruntime and reproduce PyTorch's probabilities, for the
tiny hf CLIP and for `lite` at 64 px."""

import json

import numpy as np
import onnxruntime as ort
import pytest

from mumic.config import load_config
from mumic.data.images import load_image, resize_center_crop
from mumic.data.manifest import read_manifest
from mumic.data.synthetic import make_shapes
from mumic.errors import RunError
from mumic.export import ExportError, export_onnx, onnx_probabilities
from mumic.predictor import Predictor
from mumic.train import fit

ZERO_SHOT = ["purple star", "yellow"]


@pytest.fixture(scope="session")
def export_shapes(tmp_path_factory):
    return make_shapes(tmp_path_factory.mktemp("export_shapes"), n=60, size=64, seed=4).parent


def _train(shapes, out, **kw):
    base = {
        "manifest": str(shapes / "manifest.csv"), "labels_file": str(shapes / "labels.yaml"), "out": str(out / "run"),
        "cache_dir": str(out / "cache"), "batch_size": 16, "eval_every": 2, "max_steps": 4, "warmup_steps": 1,
        "patience": 100, "majority_n": 3,
    }
    base.update(kw)
    return fit(load_config(overrides=base), progress=False)


def _session(path):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def check_export_matches_pytorch(run, shapes, out) -> dict[str, float]:
    """Export `run`, then compare onnxruntime with PyTorch on real images, the run's labels
    and zero-shot labels. Returns the max abs differences."""
    from transformers import AutoTokenizer

    readme = export_onnx(run, out)
    for name in ("image_encoder.onnx", "text_encoder.onnx", "label_embeddings.npy", "scoring.json", "README.json", "tokenizer"):
        assert (out / name).exists(), name
    assert readme == json.loads((out / "README.json").read_text())
    model = Predictor.from_run(run, device="cpu")
    size = model.backbone.image_size
    pre = readme["image_encoder"]["preprocessing"]
    assert pre["size"] == size and pre["mean"] == list(model.backbone.mean) and pre["std"] == list(model.backbone.std)
    assert readme["image_encoder"]["inputs"][0]["dtype"] == "uint8"

    # images: the documented preprocessing, a batch of 5 (the graph was traced with 2)
    paths = read_manifest(shapes / "manifest.csv").split("test").images[:5]
    px = np.stack([resize_center_crop(load_image(p), size) for p in paths])
    p_onnx = onnx_probabilities(out, px)
    p_torch = model.predict_proba(paths)
    diffs = {"probability": float(np.abs(p_onnx - p_torch).max())}
    u_onnx = _session(out / "image_encoder.onnx").run(None, {"pixels": px})[0]
    diffs["image_embedding"] = float(np.abs(u_onnx - model.embed_images(paths)).max())
    u_one = _session(out / "image_encoder.onnx").run(None, {"pixels": px[:1]})[0]  # batch of one
    np.testing.assert_allclose(u_one, u_onnx[:1], atol=1e-5)

    # text: the saved tokenizer + the text graph rebuild the label embeddings and score
    # zero-shot labels as MuMIC does (mean of raw prompt embeddings, then normalise)
    tok_cfg = readme["text_encoder"]["tokenizer"]
    tok = AutoTokenizer.from_pretrained(out / "tokenizer")
    text = _session(out / "text_encoder.onnx")
    input_names = [i.name for i in text.get_inputs()]
    assert input_names == [i["name"] for i in readme["text_encoder"]["inputs"]]

    def encode(texts):
        enc = tok(texts, padding=True if tok_cfg["padding"] == "longest" else "max_length", truncation=True,
                  max_length=tok_cfg["max_length"], return_tensors="np")
        return {n: enc[n].astype(np.int64) for n in input_names}

    def class_embedding(prompts):
        raw = text.run(["text_embedding_raw"], encode(prompts))[0]
        v = raw.mean(0)
        return v / np.linalg.norm(v)

    scoring = json.loads((out / "scoring.json").read_text())
    v_saved = np.load(out / "label_embeddings.npy")
    v_rebuilt = np.stack([class_embedding(l["prompts"]) for l in scoring["labels"]])
    diffs["label_embedding"] = float(np.abs(v_rebuilt - v_saved).max())
    specs = model.resolve_labels(ZERO_SHOT)
    v_zs = np.stack([class_embedding(s.texts(scoring["templates"])) for s in specs])
    by_name = {l["name"]: l["bias"] for l in scoring["labels"]}
    b_zs = np.array([by_name.get(s.name, scoring["default_bias"]) for s in specs], np.float32)
    p_zs = 1 / (1 + np.exp(-(u_onnx @ v_zs.T / scoring["tau"] + b_zs)))
    diffs["zero_shot_probability"] = float(np.abs(p_zs - model.predict_proba(paths, labels=ZERO_SHOT)).max())
    single = text.run(["text_embedding"], encode(["a red circle"]))[0]
    diffs["text_embedding"] = float(np.abs(single - model.embed_texts(["a red circle"])).max())
    for k, v in diffs.items():
        assert v < 1e-4, (k, v)
    for k, v in readme["verification"].items():
        if k.endswith("diff"):
            assert v < 1e-4, (k, v)
    print(f"\n{model.backbone.spec.split('/')[-1]} ONNX vs PyTorch max abs diff: " + ", ".join(f"{k} {v:.1e}" for k, v in diffs.items()))
    return diffs


def test_tiny_clip_export_matches_pytorch(export_shapes, tmp_path, tiny_clip_dir):
    run = _train(export_shapes, tmp_path, backbone=f"hf:{tiny_clip_dir}")
    check_export_matches_pytorch(run, export_shapes, tmp_path / "onnx")
    # an existing export is kept unless asked, and another folder is never replaced
    with pytest.raises(RunError, match="--overwrite"):
        export_onnx(run, tmp_path / "onnx")
    export_onnx(run, tmp_path / "onnx", overwrite=True, verify=False)
    with pytest.raises(RunError, match="not an export folder"):
        export_onnx(run, run, overwrite=True)

    from mumic.cli import main

    assert main(["export", str(run), "--format", "onnx", "--out", str(tmp_path / "cli")]) == 0
    assert (tmp_path / "cli" / "README.json").is_file()


def test_tiny_siglip_export_matches_pytorch(export_shapes, tmp_path, tiny_siglip_dir):
    run = _train(export_shapes, tmp_path, backbone=f"hf:{tiny_siglip_dir}")
    check_export_matches_pytorch(run, export_shapes, tmp_path / "onnx")
    readme = json.loads((tmp_path / "onnx" / "README.json").read_text())
    assert [i["name"] for i in readme["text_encoder"]["inputs"]] == ["input_ids"]  # SigLIP runs without a mask
    assert readme["text_encoder"]["tokenizer"]["padding"] == "max_length"


@pytest.mark.slow
def test_lite_export_matches_pytorch(export_shapes, tmp_path):
    run = _train(export_shapes, tmp_path, image_size=64)
    check_export_matches_pytorch(run, export_shapes, tmp_path / "onnx")


def test_linear_head_run_is_refused(export_shapes, tmp_path, tiny_clip_dir):
    run = _train(export_shapes, tmp_path, backbone=f"hf:{tiny_clip_dir}", loss="linear_bce", max_steps=2)
    with pytest.raises(ExportError, match="linear-head"):
        export_onnx(run, tmp_path / "onnx")
    assert not (tmp_path / "onnx").exists()

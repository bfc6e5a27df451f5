"""transformers export: a tiny CLIP trained with a tuned last image block reloads with
CLIPModel.from_pretrained and gives the run's normalised image and text embeddings; the
classifier file alone (numpy) gives `mumic predict`'s scores and decisions; SigLIP at another
image size reloads too (its projections beside); the README's snippet runs as written."""

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.numpy import load_file

from mumic.cli import main
from mumic.config import load_config
from mumic.data.images import load_image, resize_center_crop
from mumic.data.manifest import read_manifest
from mumic.data.synthetic import make_shapes
from mumic.errors import ExportError, RunError
from mumic.export_hf import export_hf
from mumic.predictor import Predictor
from mumic.train import fit

ROOT = Path(__file__).resolve().parents[1]
LAST = "backbone.image_tower.encoder.layers.1."


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return make_shapes(tmp_path_factory.mktemp("hf_shapes"), n=40, size=64, seed=5).parent


def _train(shapes, out, backbone, **kw):
    cfg = {"manifest": str(shapes / "manifest.csv"), "labels_file": str(shapes / "labels.yaml"), "out": str(out / "run"),
           "cache_dir": str(out / "cache"), "batch_size": 16, "eval_every": 2, "max_steps": 3, "warmup_steps": 1,
           "patience": 100, "majority_n": 3, "backbone": backbone, "image_tower": "last", "lr_tower": 5e-2, "lr_head": 5e-2,
           **kw}
    return fit(load_config(overrides=cfg), progress=False)


@pytest.fixture(scope="module")
def clip_run(shapes, tmp_path_factory, tiny_clip_dir):
    return _train(shapes, tmp_path_factory.mktemp("hf_clip"), f"hf:{tiny_clip_dir}", bias="per_label")


@pytest.fixture(scope="module")
def clip_export(clip_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("hf_clip_export") / "tiny-hf"
    assert main(["export", str(clip_run), "--format", "hf", "--out", str(out)]) == 0
    return out


def _pixels(paths, size):
    return np.stack([resize_center_crop(load_image(p), size) for p in paths])


def _pixel_values(px, folder):
    """(x/255 - mean)/std with the export's preprocessor_config.json, by hand."""
    pre = json.loads((folder / "preprocessor_config.json").read_text())
    mean = np.array(pre["image_mean"], np.float32).reshape(1, 3, 1, 1)
    std = np.array(pre["image_std"], np.float32).reshape(1, 3, 1, 1)
    return torch.from_numpy(((px.astype(np.float32) / 255.0 - mean) / std).astype(np.float32))


def test_clip_export_reloads_with_the_runs_tuned_weights_and_embeddings(clip_run, clip_export, shapes, tiny_clip_dir):
    from safetensors.torch import load_file as load_torch
    from transformers import AutoTokenizer, CLIPModel

    model = CLIPModel.from_pretrained(clip_export).eval()
    base = CLIPModel.from_pretrained(tiny_clip_dir).eval()
    run_w = load_torch(str(clip_run / "model.safetensors"))
    # the last block was trained (else this test could not fail), and the export holds the run's values
    key = "encoder.layers.1.mlp.fc1.weight"
    assert not torch.allclose(base.vision_model.state_dict()[key], run_w[LAST + "mlp.fc1.weight"])
    assert torch.equal(model.vision_model.state_dict()[key], run_w[LAST + "mlp.fc1.weight"])
    assert torch.equal(model.visual_projection.weight, run_w["backbone.image_projection.weight"])
    assert torch.equal(model.vision_model.state_dict()["encoder.layers.0.mlp.fc1.weight"],
                       base.vision_model.state_dict()["encoder.layers.0.mlp.fc1.weight"])

    run = Predictor.from_run(clip_run, device="cpu")
    paths = read_manifest(shapes / "manifest.csv").images[:6]
    with torch.no_grad():
        pv = _pixel_values(_pixels(paths, run.backbone.image_size), clip_export)
        u = F.normalize(model.get_image_features(pixel_values=pv).pooler_output, dim=-1).numpy()
        tok = AutoTokenizer.from_pretrained(clip_export)
        texts = ["a red car", "a photo of a blue tree", "green"]
        e = F.normalize(model.get_text_features(**tok(texts, padding=True, return_tensors="pt")).pooler_output, dim=-1).numpy()
    np.testing.assert_allclose(u, run.embed_images(paths), atol=1e-4)
    np.testing.assert_allclose(e, run.embed_texts(texts), atol=1e-4)
    assert model.logit_scale.exp().item() == pytest.approx(1 / run.tau, rel=1e-5)

    pre = json.loads((clip_export / "preprocessor_config.json").read_text())
    size = run.backbone.image_size
    assert pre["crop_size"] == {"height": size, "width": size} and pre["size"] == {"shortest_edge": size}
    assert pre["image_mean"] == list(run.backbone.mean) and pre["image_std"] == list(run.backbone.std)


def test_classifier_file_with_numpy_gives_mumic_predict(clip_run, clip_export, shapes, tmp_path, capsys):
    from transformers import CLIPModel

    doc = json.loads((clip_export / "classifier.json").read_text())
    clf = load_file(str(clip_export / "classifier.safetensors"))
    assert doc["heads"]["folded"] and not (clip_export / "projection_heads.safetensors").exists()
    assert doc["verification"]["probability_max_abs_diff"] < 1e-4
    names = [l["name"] for l in doc["labels"]]
    assert clf["label_embeddings"].shape == (len(names), 16)
    np.testing.assert_allclose(clf["bias"], [l["bias"] for l in doc["labels"]])
    assert len(set(clf["bias"].round(6))) > 1  # per-label b: a mix-up of labels would show

    paths = read_manifest(shapes / "manifest.csv").split("test").images[:5]
    assert main(["predict", str(clip_run), *map(str, paths), "--out", str(tmp_path / "p.jsonl")]) == 0
    records = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()]

    model = CLIPModel.from_pretrained(clip_export).eval()
    with torch.no_grad():
        pv = _pixel_values(_pixels(paths, doc["preprocessing"]["size"]), clip_export)
        u = model.visual_projection(model.vision_model(pixel_values=pv).pooler_output).numpy()
    u = u / np.linalg.norm(u, axis=1, keepdims=True)
    p = 1 / (1 + np.exp(-(u @ clf["label_embeddings"].T / doc["tau"] + clf["bias"])))
    for row, rec in zip(p, records):
        assert max(abs(row[j] - rec["scores"][n]) for j, n in enumerate(names)) < 1e-4
        decided = {n for j, n in enumerate(names) if row[j] >= clf["threshold"][j]}
        assert decided == set(rec["predicted"])


def test_siglip_at_another_size_reloads_with_its_heads_beside(shapes, tmp_path, tiny_siglip_dir):
    from transformers import AutoTokenizer, SiglipModel

    run_dir = _train(shapes, tmp_path, f"hf:{tiny_siglip_dir}", image_size=48, max_steps=2)
    out = tmp_path / "siglip-hf"
    doc = export_hf(run_dir, out)
    assert not doc["heads"]["folded"] and doc["model_class"] == "SiglipModel"
    heads = load_file(str(out / "projection_heads.safetensors"))
    model = SiglipModel.from_pretrained(out).eval()
    assert model.config.vision_config.image_size == 48
    run = Predictor.from_run(run_dir, device="cpu")
    paths = read_manifest(shapes / "manifest.csv").images[:4]
    with torch.no_grad():
        f = model.vision_model(pixel_values=_pixel_values(_pixels(paths, 48), out)).pooler_output.numpy()
        tok = AutoTokenizer.from_pretrained(out)
        texts = ["a red car", "the blue house"]
        enc = tok(texts, padding="max_length", max_length=doc["tokenizer"]["max_length"], truncation=True, return_tensors="pt")
        g = model.text_model(input_ids=enc["input_ids"]).pooler_output.numpy()
    u = f @ heads["image_projection.weight"].T + heads["image_projection.bias"]
    g = g / np.linalg.norm(g, axis=1, keepdims=True)
    e = g @ heads["text_projection.weight"].T + heads["text_projection.bias"]
    np.testing.assert_allclose(u / np.linalg.norm(u, axis=1, keepdims=True), run.embed_images(paths), atol=1e-4)
    np.testing.assert_allclose(e / np.linalg.norm(e, axis=1, keepdims=True), run.embed_texts(texts), atol=1e-4)
    assert "SiglipModel" in (out / "README.md").read_text()


def test_lite_run_is_refused_naming_onnx_and_folders_are_kept(clip_run, clip_export, tmp_path):
    fake = tmp_path / "lite_run"
    shutil.copytree(clip_run, fake)
    meta = json.loads((fake / "labels.json").read_text())
    meta["model"]["backbone"] = {"spec": "lite", "image_size": 64, "image_head": "mlp", "seed": 0}
    (fake / "labels.json").write_text(json.dumps(meta))
    with pytest.raises(ExportError, match=r"'lite' run.*--format onnx"):
        export_hf(fake, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    with pytest.raises(RunError, match="already holds a transformers export; pass --overwrite"):
        export_hf(clip_run, clip_export)
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(RunError, match="is not a transformers export folder"):
        export_hf(clip_run, other)


def test_readme_snippet_runs_as_written(clip_run, clip_export, tmp_path):
    from PIL import Image

    text = (ROOT / "README.md").read_text()
    section = text.split("### Use a fine-tuned model elsewhere", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    assert 'folder = "hotels-hf"' in code and '"photo.jpg"' in code
    run = Predictor.from_run(clip_run, device="cpu")
    size = run.backbone.image_size  # a square photo at the model's size: both preprocessings are the identity
    rgb = np.random.default_rng(1).integers(0, 256, (size, size, 3), dtype=np.uint8)
    photo = tmp_path / "photo.png"
    Image.fromarray(rgb).save(photo)
    code = code.replace('"hotels-hf"', repr(str(clip_export))).replace('"photo.jpg"', repr(str(photo)))
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    expected = run.predict_proba([photo], labels=["red car"])[0, 0]
    assert "red car" not in [l.name for l in run.labels]
    assert float(scope["p"].reshape(-1)[0]) == pytest.approx(float(expected), abs=1e-4)

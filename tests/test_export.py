"""ONNX export: both graphs run in onnxruntime and reproduce PyTorch's probabilities, for the
tiny hf CLIP and for `lite` at 64 px; the export's predict.py, run without torch or mumic,
gives `mumic predict`'s scores and decisions on image files."""

import json
import runpy
import subprocess
import sys

import numpy as np
import onnxruntime as ort
import pytest

from mumic.config import load_config
from mumic.data.images import load_image, resize_center_crop
from mumic.data.manifest import read_manifest
from mumic.data.synthetic import make_shapes
from mumic.errors import RunError
from mumic.export import ExportError, export_onnx, onnx_probabilities, sample_images, script_source
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


@pytest.fixture(scope="module")
def clip_run(export_shapes, tmp_path_factory, tiny_clip_dir):
    return _train(export_shapes, tmp_path_factory.mktemp("clip_run"), backbone=f"hf:{tiny_clip_dir}")


@pytest.fixture(scope="module")
def clip_export(clip_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("clip_export") / "onnx"
    export_onnx(clip_run, out)
    return out


def test_tiny_clip_export_matches_pytorch(clip_run, export_shapes, tmp_path):
    run = clip_run
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


# --- predict.py -------------------------------------------------------------------------------

# Runs predict.py as a user would, where neither torch, transformers nor mumic can be imported.
WITHOUT_MUMIC = """
import runpy, sys

class Blocked:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "transformers", "mumic"):
            raise ImportError("blocked: " + name)

sys.meta_path.insert(0, Blocked())
script = sys.argv.pop(1)
try:
    runpy.run_path(script, run_name="__main__")
except SystemExit as e:
    code = e.code
leaked = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "transformers", "mumic"))
assert not leaked, leaked
sys.exit(code)
"""


def _user_images(folder, size=32):
    """Files unlike the export's own check: a large JPEG with EXIF orientation 8, a grey PNG
    with alpha, a palette GIF with a transparent colour, a CMYK JPEG."""
    from PIL import Image

    rng = np.random.default_rng(7)
    coarse = Image.fromarray(rng.integers(0, 256, (30, 45, 3), dtype=np.uint8))
    photo = Image.fromarray(np.clip(np.asarray(coarse.resize((1100, 730), Image.Resampling.BICUBIC), np.int16)
                                    + rng.integers(-30, 31, (730, 1100, 3)), 0, 255).astype(np.uint8))
    paths = [folder / n for n in ("big.jpg", "grey_alpha.png", "palette.gif", "cmyk.jpg")]
    exif = Image.Exif()
    exif[0x0112] = 8
    photo.save(paths[0], quality=92, exif=exif.tobytes())
    la = photo.resize((3 * size, 2 * size)).convert("LA")
    la.putalpha(Image.linear_gradient("L").resize(la.size).rotate(90))
    la.save(paths[1])
    photo.resize((2 * size, 5 * size)).quantize(16).save(paths[2], transparency=3)
    photo.resize((5 * size, 4 * size)).convert("CMYK").save(paths[3], quality=90)
    return paths


def _lines(text):
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def test_predict_script_without_torch_or_mumic_matches_mumic_predict(clip_run, clip_export, export_shapes, tmp_path, capsys):
    from mumic.cli import main

    readme = json.loads((clip_export / "README.json").read_text())
    assert "predict.py" in readme["image_encoder"]["preprocessing"]["reference"]
    assert readme["verification"]["predict_py_max_abs_diff"] < 1e-4
    images = [*_user_images(tmp_path), *read_manifest(export_shapes / "manifest.csv").images[:3]]
    done = subprocess.run([sys.executable, "-I", "-c", WITHOUT_MUMIC, str(clip_export / "predict.py"), *map(str, images)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    script = _lines(done.stdout)

    assert main(["predict", str(clip_run), *map(str, images)]) == 0
    mumic = _lines(capsys.readouterr().out)
    assert len(script) == len(mumic) == len(images)
    worst = 0.0
    for ours, theirs in zip(script, mumic):
        assert list(ours) == list(theirs) == ["image", "predicted", "scores"]
        assert ours["image"] == theirs["image"]
        assert ours["predicted"] == theirs["predicted"]
        assert set(ours["scores"]) == set(theirs["scores"])
        worst = max(worst, *(abs(ours["scores"][k] - theirs["scores"][k]) for k in theirs["scores"]))
    assert worst < 1e-4
    assert any(r["predicted"] for r in mumic) and any(len(r["predicted"]) < len(r["scores"]) for r in mumic)  # decisions differ by image

    # an unreadable file stops it with a message naming the file
    (tmp_path / "broken.jpg").write_bytes(b"not a jpeg")
    done = subprocess.run([sys.executable, "-I", "-c", WITHOUT_MUMIC, str(clip_export / "predict.py"), str(images[0]),
                           str(tmp_path / "broken.jpg")], capture_output=True, text=True, timeout=300)
    assert done.returncode == 1 and "broken.jpg" in done.stderr and done.stdout == ""


@pytest.mark.parametrize("size", [32, 224])
def test_predict_script_preprocessing_is_mumics_byte_for_byte(clip_export, tmp_path, size):
    text = (clip_export / "predict.py").read_text()
    assert "import mumic" not in text and "from mumic" not in text  # its copy of the preprocessing, not an import
    ns = runpy.run_path(str(clip_export / "predict.py"), run_name="check")
    paths = [*sample_images(tmp_path, size), *_user_images(tmp_path, size)]
    for path in paths:
        ours = ns["load_pixels"](path, size)
        assert ours.dtype == np.uint8 and ours.shape == (3, size, size)
        np.testing.assert_array_equal(ours, resize_center_crop(load_image(path, size_hint=size), size), err_msg=path.name)


def test_plain_resize_of_a_large_jpeg_changes_the_scores(clip_run, clip_export, tmp_path):
    """What README.json used to describe (shorter side to S, bicubic, centre crop; no draft
    decoding) gives other pixels and other probabilities than mumic on a large JPEG."""
    from PIL import Image, ImageOps

    ns = runpy.run_path(str(clip_export / "predict.py"), run_name="check")
    export = ns["load_export"](clip_export)
    size = export["size"]
    big = _user_images(tmp_path)[0]
    with Image.open(big) as img:
        assert img.format == "JPEG" and min(img.size) >= 8 * size
        img = ImageOps.exif_transpose(img).convert("RGB")
    k = size / min(img.size)
    img = img.resize((max(size, round(img.width * k)), max(size, round(img.height * k))), Image.Resampling.BICUBIC)
    left, top = (img.width - size) // 2, (img.height - size) // 2
    plain = np.asarray(img.crop((left, top, left + size, top + size))).transpose(2, 0, 1)
    exact = ns["load_pixels"](big, size)
    assert np.abs(plain.astype(int) - exact.astype(int)).max() >= 8  # not rounding: other pixels
    p_plain, p_exact = ns["probabilities"](export, plain[None]), ns["probabilities"](export, exact[None])
    np.testing.assert_allclose(p_exact, Predictor.from_run(clip_run, device="cpu").predict_proba([big]), atol=1e-4)
    assert np.abs(p_plain - p_exact).max() > 1e-3


def test_export_refuses_a_predict_script_that_drifts(clip_run, tmp_path, monkeypatch):
    """Dropping one step of the preprocessing in predict.py (EXIF orientation) fails the
    export, naming the file and the size of the difference."""
    import mumic.export

    source = script_source()
    drifted = source.replace("oriented = ImageOps.exif_transpose(img)", "oriented = img")
    assert drifted != source
    monkeypatch.setattr(mumic.export, "script_source", lambda: drifted)
    with pytest.raises(ExportError, match=r"predict\.py differs from mumic's probabilities by .* on rotated\.jpg"):
        export_onnx(clip_run, tmp_path / "onnx")
    assert not (tmp_path / "onnx").exists()

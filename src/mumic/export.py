"""ONNX export of a run: the image tower + head and the text tower + head as two graphs.

`mumic export RUN --format onnx --out DIR` writes

    DIR/
      image_encoder.onnx     pixels uint8 [batch, 3, S, S] (RGB, NCHW, already resized and
                             center-cropped to S) -> image_embedding float32 [batch, D],
                             L2-normalised. (x/255 - mean)/std happens inside the graph.
      text_encoder.onnx      input_ids int64 [batch, seq] (+ attention_mask int64 [batch, seq]
                             where the backbone uses one) -> text_embedding float32
                             [batch, D] L2-normalised, and text_embedding_raw
                             P_txt(normalize(f_txt(t))) unnormalised
      label_embeddings.npy   float32 [C, D]: the run's class embeddings v_c, normalised
      scoring.json           labels (name, seen, b, threshold), tau, and the formula
      tokenizer/             the tokenizer files (transformers save_pretrained format)
      predict.py             `python DIR/predict.py IMAGE...`: mumic predict's scores and
                             decisions with numpy, Pillow and onnxruntime only; its image
                             preprocessing is mumic's own source (data/preprocess.py)
      README.json            inputs, outputs, preprocessing (size, mean, std), tokenizer
                             settings, and the measured ONNX vs PyTorch differences
      README.md              the model card (mumic.card)

Probabilities: p = sigmoid((image_embedding . v_c) / tau + b_c). A new (zero-shot) label:
embed each of its prompts with the text graph, average `text_embedding_raw` over the
prompts, L2-normalise (P_txt is affine, so this equals MuMIC's class embedding), and use
the default b of scoring.json. Both graphs have a dynamic batch axis (the text graph a
dynamic sequence axis too). With verify, predict.py runs on a few written image files (a
large JPEG, one with EXIF rotation, a PNG with alpha, 16-bit grey) and must give the
probabilities mumic gives them.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from mumic.backbones.onnx import DEFAULT_OPSET
from mumic.backbones.onnx import onnx_export as _export
from mumic.card import public_spec, write_card
from mumic.errors import ConfigError, ExportError
from mumic.io import atomic_folder, check_output_folder, check_writable

log = logging.getLogger(__name__)

FORMAT = "mumic-onnx-1"
FORMATS = ("onnx", "hf")  # hf: mumic.export_hf
IMAGE_FILE = "image_encoder.onnx"
TEXT_FILE = "text_encoder.onnx"
SCRIPT_FILE = "predict.py"
_PREPROCESS_IMPORT = "from mumic.data.preprocess import decode_rgb, resize_center_crop\n"


def _backbone_kind(backbone: Any) -> str:
    if backbone.spec == "lite":
        return "lite"
    kind = getattr(backbone, "model_type", None)
    if kind in ("clip", "siglip"):
        return kind
    raise ExportError(f"ONNX export does not know the backbone {backbone.spec!r}; supported: lite, hf CLIP, hf SigLIP")


def check_zero_shot(model: Any, run_dir: str | Path) -> None:
    """Refuse a run whose classifier is not text embeddings (nothing to export beside the encoders)."""
    if not model.zero_shot:
        raise ExportError(
            f"{run_dir} is a linear-head (linear_bce) run: its classifier is not text embeddings, so it has no "
            "label embeddings to export; export a tempered_sigmoid / softmax_ce / asl run"
        )


def classifier_table(model: Any, labels: list[Any]) -> tuple[dict[str, Any], Any]:
    """(the scoring of `labels`: formula, tau, b and calibrated threshold of each label,
    prompts, templates; their class embeddings v as float32 [C, D], normalised), what every
    export writes beside its encoders."""
    import numpy as np
    import torch

    from mumic.heads import FORMULA

    with torch.inference_mode():
        v = model.class_embeddings(labels).float().cpu().numpy().astype(np.float32)
        b = model.label_biases(labels).detach().float().cpu().numpy()
    model.clear_text_cache()
    th = getattr(model, "thresholds", None) or {"per_label": {}, "default": 0.5}
    scoring = {
        "formula": FORMULA,
        "tau": model.tau,
        "bias_mode": model.bias_mode,
        "default_bias": float(model.bias.detach().float().mean()),
        "default_threshold": float(th["default"]),
        "labels": [
            {"name": l.name, "seen": l.seen, "bias": float(b[i]), "threshold": float(th["per_label"].get(l.name, th["default"])),
             "prompts": l.texts(model.templates)}
            for i, l in enumerate(labels)
        ],
        "templates": list(model.templates),
    }
    return scoring, v


def tokenizer_settings(backbone: Any) -> dict[str, Any]:
    """How the backbone tokenises prompts (the same call its text_features makes)."""
    kind = _backbone_kind(backbone)
    if kind == "lite":
        from mumic.backbones.lite import TEXT_MAX_LENGTH

        return {"padding": "longest", "truncation": True, "max_length": TEXT_MAX_LENGTH, "attention_mask": True}
    if kind == "siglip":
        return {"padding": "max_length", "truncation": True, "max_length": int(backbone.text_max_length), "attention_mask": False}
    return {"padding": "longest", "truncation": True, "max_length": int(backbone.text_max_length), "attention_mask": True}


def tokenize(backbone: Any, texts: list[str]) -> dict[str, Any]:
    """Token ids (and attention mask where used) as int64 tensors, as the backbone does."""
    s = tokenizer_settings(backbone)
    padding = True if s["padding"] == "longest" else "max_length"
    enc = backbone.tokenizer(list(texts), padding=padding, truncation=True, max_length=s["max_length"], return_tensors="pt")
    out = {"input_ids": enc["input_ids"].long()}
    if s["attention_mask"]:
        out["attention_mask"] = enc["attention_mask"].long()
    return out


def _graphs(backbone: Any) -> tuple[Any, Any]:
    """(image module, text module) wrapping the backbone for tracing."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    kind = _backbone_kind(backbone)

    class ImageGraph(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.backbone = backbone

        def forward(self, pixels: torch.Tensor) -> torch.Tensor:
            return F.normalize(self.backbone.image_head(self.backbone.image_features(pixels)), dim=-1)

    class TextGraph(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.backbone = backbone

        def features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
            tower = self.backbone.text_tower
            if kind == "lite":  # mean of MiniLM's last hidden states over real tokens
                assert attention_mask is not None  # the lite tokenisation always gives one
                hidden = tower(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
                mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
                return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
            if kind == "siglip":  # trained without a mask, on max_length padding
                return tower(input_ids=input_ids).pooler_output
            return tower(input_ids=input_ids, attention_mask=attention_mask).pooler_output

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
            raw = self.backbone.text_head(F.normalize(self.features(input_ids, attention_mask), dim=-1))
            return F.normalize(raw, dim=-1), raw

    return ImageGraph().eval(), TextGraph().eval()


def onnx_probabilities(folder: str | Path, pixels: Any) -> Any:
    """Probabilities [N, C] of the run's labels from an export folder with onnxruntime:
    uint8 pixels [N, 3, S, S] in, the README's formula applied. (For checks and examples.)"""
    import numpy as np
    import torch

    from mumic import heads

    folder = Path(folder)
    sess = _session(folder / IMAGE_FILE)
    u = sess.run(None, {"pixels": np.ascontiguousarray(pixels, dtype=np.uint8)})[0]
    v = np.load(folder / "label_embeddings.npy", allow_pickle=False)
    scoring = json.loads((folder / "scoring.json").read_text())
    b = np.array([l["bias"] for l in scoring["labels"]], dtype=np.float32)
    p = heads.tempered_probabilities(torch.from_numpy(u), torch.from_numpy(v), 1.0 / scoring["tau"], torch.from_numpy(b))
    return p.numpy()


def script_source() -> str:
    """predict.py: mumic.export_script with its one mumic import replaced by the source
    of mumic.data.preprocess, so the script preprocesses with the very code mumic runs."""
    import inspect

    from mumic import __version__, export_script
    from mumic.data import preprocess

    script = inspect.getsource(export_script)
    if script.count(_PREPROCESS_IMPORT) != 1:
        raise ExportError(f"{export_script.__file__}: expected the line {_PREPROCESS_IMPORT.strip()!r} once; cannot write {SCRIPT_FILE}")
    inlined = (f"# ---- mumic.data.preprocess (mumic {__version__}), verbatim ----\n" + inspect.getsource(preprocess)
               + "# ---- end of mumic.data.preprocess ----\n")
    return script.replace(_PREPROCESS_IMPORT, inlined)


def sample_images(folder: Path, size: int) -> list[Path]:
    """Image files where a preprocessing other than mumic's shows: a large non-square JPEG
    (draft decoding, reducing_gap), a JPEG with EXIF orientation 6, an RGBA PNG and a
    16-bit grey PNG, all deterministic."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)

    def picture(w: int, h: int) -> Image.Image:  # smooth colour fields plus pixel noise
        coarse = Image.fromarray(rng.integers(0, 256, (max(2, h // 24), max(2, w // 24), 3), dtype=np.uint8))
        smooth = np.asarray(coarse.resize((w, h), Image.Resampling.BICUBIC), dtype=np.int16)
        return Image.fromarray(np.clip(smooth + rng.integers(-24, 25, (h, w, 3)), 0, 255).astype(np.uint8))

    s = max(size, 32)
    paths = [folder / n for n in ("wide.jpg", "rotated.jpg", "alpha.png", "grey16.png")]
    picture(int(4.3 * s), int(2.7 * s)).save(paths[0], quality=90)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    picture(int(3.1 * s), int(2.2 * s)).save(paths[1], quality=90, exif=exif.tobytes())
    rgba = picture(int(1.6 * s), s).convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize(rgba.size))
    rgba.save(paths[2])
    grey = np.asarray(picture(s + 7, int(1.3 * s)).convert("L"), dtype=np.uint16) * 257
    Image.fromarray(grey).save(paths[3])
    return paths


def _verify_script(folder: Path, model: Any) -> tuple[float, str]:
    """(max abs difference, where) between predict.py run in-process on sample_images and
    the run's own probabilities of the same files."""
    import runpy
    import tempfile

    import numpy as np

    script = runpy.run_path(str(folder / SCRIPT_FILE), run_name="mumic_export_predict")
    with tempfile.TemporaryDirectory(prefix="mumic-export-") as d:
        paths = sample_images(Path(d), model.backbone.image_size)
        export, p_script = script["score_images"](folder, paths)
        p_mumic = model.predict_proba(paths)
    diff = np.abs(p_script - p_mumic)
    i, j = np.unravel_index(int(diff.argmax()), diff.shape)
    return float(diff[i, j]), f"{paths[i].name}, label {export['names'][j]!r}"


def _session(path: Path) -> Any:
    try:
        import onnxruntime as ort
    except ImportError:
        raise ConfigError("checking an ONNX export needs onnxruntime: pip install onnxruntime") from None
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


def _verify(folder: Path, model: Any, text_graph: Any, prompts: list[str], seed: int = 0) -> dict[str, float]:
    """Max absolute differences between onnxruntime and PyTorch on random pixels (batch 3)
    and the run's prompts: embeddings and probabilities."""
    import numpy as np
    import torch

    size = model.backbone.image_size
    gen = torch.Generator().manual_seed(seed)
    px = torch.randint(0, 256, (3, 3, size, size), dtype=torch.uint8, generator=gen)
    with torch.inference_mode():
        u_torch = torch.nn.functional.normalize(model.image_embeddings(px).float(), dim=-1).numpy()
        p_torch = model.proba_from_embeddings(model.image_embeddings(px), list(model.labels))
        tok = tokenize(model.backbone, prompts)
        t_torch, _ = text_graph(**tok)
    u_onnx = _session(folder / IMAGE_FILE).run(None, {"pixels": px.numpy()})[0]
    p_onnx = onnx_probabilities(folder, px.numpy())
    t_onnx = _session(folder / TEXT_FILE).run(["text_embedding"], {k: v.numpy() for k, v in tok.items()})[0]
    return {
        "image_embedding_max_abs_diff": float(np.abs(u_onnx - u_torch).max()),
        "probability_max_abs_diff": float(np.abs(p_onnx - p_torch).max()),
        "text_embedding_max_abs_diff": float(np.abs(t_onnx - t_torch.numpy()).max()),
    }


def export_onnx(
    run_dir: str | Path,
    out: str | Path,
    *,
    opset: int = DEFAULT_OPSET,
    overwrite: bool = False,
    verify: bool = True,
    tolerance: float = 1e-4,
) -> dict[str, Any]:
    """Export a run to ONNX (see the module docstring); returns the README content.

    With verify, both graphs run in onnxruntime on random pixels and the run's prompts and
    must agree with PyTorch within `tolerance` (probabilities and embeddings), and the
    written predict.py must give mumic's probabilities of real image files within it.
    """
    import numpy as np
    import torch

    from mumic.data.preprocess import REDUCING_GAP
    from mumic.predictor import Predictor

    out = Path(out)
    check_output_folder(out, overwrite, marker="README.json", what="an export")
    check_writable(out.parent)  # a read-only --out fails now, not after the export
    model = Predictor.from_run(run_dir, device="cpu", lazy_text=False)
    model.eval()
    check_zero_shot(model, run_dir)
    backbone = model.backbone
    kind = _backbone_kind(backbone)
    settings = tokenizer_settings(backbone)
    size, dim = backbone.image_size, backbone.embed_dim
    labels = list(model.labels)
    prompts = [t for l in labels for t in l.texts(model.templates)]
    image_graph, text_graph = _graphs(backbone)

    # the token path traced below must compute what the backbone's own text path computes
    with torch.inference_mode():
        tok = tokenize(backbone, prompts[:8])
        ref = backbone.encode_text(prompts[:8]).float()
        _, mine = text_graph(**tok)
    if not torch.allclose(ref, mine.float(), atol=1e-5):
        raise ExportError(f"the text graph of {backbone.spec!r} does not reproduce its text_features; export is not supported for it")

    with atomic_folder(out) as tmp:
        px = torch.randint(0, 256, (2, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
        _export(image_graph, (px,), tmp / IMAGE_FILE, ["pixels"], ["image_embedding"],
                {"pixels": {0: "batch"}, "image_embedding": {0: "batch"}}, opset)
        tok = tokenize(backbone, prompts[:2] if len(prompts) > 1 else prompts * 2)
        text_inputs = list(tok)
        dynamic = {name: {0: "batch", 1: "sequence"} for name in text_inputs}
        dynamic.update({"text_embedding": {0: "batch"}, "text_embedding_raw": {0: "batch"}})
        _export(text_graph, tuple(tok[n] for n in text_inputs), tmp / TEXT_FILE, text_inputs,
                ["text_embedding", "text_embedding_raw"], dynamic, opset)
        try:
            import onnx

            for name in (IMAGE_FILE, TEXT_FILE):
                onnx.checker.check_model(str(tmp / name))
        except ImportError:
            log.warning("onnx is not installed: the graphs were not checked")

        scoring, v = classifier_table(model, labels)
        np.save(tmp / "label_embeddings.npy", v, allow_pickle=False)
        (tmp / "scoring.json").write_text(json.dumps(scoring, indent=2) + "\n", encoding="utf-8")
        backbone.tokenizer.save_pretrained(str(tmp / "tokenizer"))
        (tmp / SCRIPT_FILE).write_text(script_source(), encoding="utf-8")

        spec = public_spec(backbone.spec)
        readme: dict[str, Any] = {
            "format": FORMAT,
            "run": Path(run_dir).name,
            "backbone": spec,
            "opset": opset,
            "image_encoder": {
                "file": IMAGE_FILE,
                "inputs": [{"name": "pixels", "dtype": "uint8", "shape": ["batch", 3, size, size], "layout": "NCHW, RGB, 0..255"}],
                "outputs": [{"name": "image_embedding", "dtype": "float32", "shape": ["batch", dim], "normalized": True}],
                "preprocessing": {
                    "reference": f"{SCRIPT_FILE} (load_pixels): mumic's own preprocessing, verbatim; use it, or "
                                 "check another implementation against it: a plain resize gives other pixels",
                    "decode": f"Pillow; JPEGs at the smallest draft scale with both sides >= {size}; EXIF orientation "
                              "applied; first frame; RGB, transparency composited onto white, 16-bit grey scaled",
                    "resize": f"one bicubic resample (Pillow, reducing_gap {REDUCING_GAP}) of the central "
                              f"min(w, h) square to {size}x{size}",
                    "size": size,
                    "in_graph": "x = (pixels / 255 - mean) / std per channel",
                    "mean": list(backbone.mean),
                    "std": list(backbone.std),
                },
            },
            "text_encoder": {
                "file": TEXT_FILE,
                "inputs": [{"name": n, "dtype": "int64", "shape": ["batch", "sequence"]} for n in text_inputs],
                "outputs": [
                    {"name": "text_embedding", "dtype": "float32", "shape": ["batch", dim], "normalized": True},
                    {"name": "text_embedding_raw", "dtype": "float32", "shape": ["batch", dim], "normalized": False,
                     "use": "a label's class embedding is normalize(mean over its prompts of text_embedding_raw)"},
                ],
                "tokenizer": {"folder": "tokenizer", **settings},
            },
            "labels": {"file": "label_embeddings.npy", "dtype": "float32", "shape": [len(labels), dim], "normalized": True,
                       "order": "as the labels of scoring.json"},
            "scoring": {"file": "scoring.json", "formula": scoring["formula"], "tau": model.tau,
                        "zero_shot_bias": "default_bias of scoring.json (the mean b)"},
            "backbone_kind": kind,
        }
        if verify:
            diffs = _verify(tmp, model, text_graph, prompts[:16])
            readme["verification"] = {"against": "PyTorch, 3 random images and the run's prompts", **diffs}
            worst = max(diffs.values())
            log.info("ONNX vs PyTorch: %s", ", ".join(f"{k} {v:.2e}" for k, v in diffs.items()))
            if worst > tolerance:
                raise ExportError(f"the ONNX graphs differ from PyTorch by {worst:.2e} (> {tolerance:g}); please report this")
            script_diff, where = _verify_script(tmp, model)
            readme["verification"]["predict_py"] = "the run's probabilities of 4 written image files (JPEG, EXIF, alpha, 16-bit)"
            readme["verification"]["predict_py_max_abs_diff"] = script_diff
            log.info("%s vs mumic on image files: %.2e", SCRIPT_FILE, script_diff)
            if script_diff > tolerance:
                raise ExportError(f"{SCRIPT_FILE} differs from mumic's probabilities by {script_diff:.2e} on {where} "
                                  f"(> {tolerance:g}); please report this")
        (tmp / "README.json").write_text(json.dumps(readme, indent=2) + "\n", encoding="utf-8")
        write_card(run_dir, tmp, target="onnx", name=out.name, model_type=kind, overwrite=True)
    return readme



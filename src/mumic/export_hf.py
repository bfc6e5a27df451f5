"""transformers export of an `hf:` run: the tuned model as a CLIPModel / SiglipModel folder.

`mumic export RUN --format hf --out DIR` writes

    DIR/
      config.json, model.safetensors   the base model with the run's weights applied
                                      (save_pretrained; safetensors): the tuned tower parts,
                                      the trained projections (CLIP), position embeddings
                                      resampled once to the run's image size, and
                                      logit_scale = log(1/tau) (SigLIP: logit_bias = the mean b)
      tokenizer files                 the run's tokenizer (save_pretrained)
      preprocessor_config.json        the run's image size, mean and std (CLIPImageProcessor /
                                      SiglipImageProcessor settings)
      classifier.safetensors          label_embeddings float32 [C, D] (normalised, in the
                                      order of classifier.json), bias [C], threshold [C]
      classifier.json                 the formula, tau, each label's b, threshold and prompts,
                                      the templates, how to embed images and texts, the
                                      tokenizer settings and mumic's own preprocessing
      projection_heads.safetensors    SigLIP only: the trained projections P_img, P_txt
                                      (Linear D -> D with bias), which have no place in
                                      SiglipModel's layers (see below)
      README.md                       the model card (mumic.card)

Embeddings (both L2-normalised), for a CLIPModel export:

    u = normalize(visual_projection(vision_model(pixel_values).pooler_output))
    e = normalize(text_projection(normalize(text_model(input_ids, attention_mask).pooler_output)))

For one prompt `e` is CLIP's own normalised text embedding. A label's class embedding v is
normalize(mean over its prompts of text_projection(normalize(pooler_output))), the mean
taken before the final normalisation; p = sigmoid(u . v / tau + b).

SigLIP: mumic's projections are Linear(D, D) layers with a bias after the vision pooling head
and after the *normalised* text head. The vision head ends in a residual MLP and the text
side normalises between its head and P_txt, so neither folds into SiglipModel's layers:
they are written to projection_heads.safetensors and classifier.json says how to apply them:
u = normalize(P_img(pooler_output)), e = normalize(P_txt(normalize(pooler_output))).

A `lite` run has no transformers model: export it with `--format onnx`.
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any

from mumic.backbones.base import quiet_local_loading
from mumic.errors import ExportError
from mumic.export import _backbone_kind, check_zero_shot, classifier_table, public_spec, tokenize, tokenizer_settings
from mumic.io import atomic_folder, check_output_folder

log = logging.getLogger(__name__)

FORMAT = "mumic-hf-1"
CLASSIFIER_JSON = "classifier.json"
CLASSIFIER_FILE = "classifier.safetensors"
HEADS_FILE = "projection_heads.safetensors"

IMAGE_RECIPE = {
    "clip": "normalize(visual_projection(vision_model(pixel_values).pooler_output))",
    "siglip": "normalize(P_img(vision_model(pixel_values).pooler_output)), P_img from " + HEADS_FILE,
}
TEXT_RECIPE = {
    "clip": "text_projection(normalize(text_model(input_ids, attention_mask).pooler_output))",
    "siglip": "P_txt(normalize(text_model(input_ids).pooler_output)), P_txt from " + HEADS_FILE,
}


def _source(backbone: Any) -> str:
    return os.path.expanduser(str(backbone.name))


def _assemble(backbone: Any, tau: float, default_bias: float) -> Any:
    """A CLIPModel / SiglipModel holding the run's weights, at the run's image size."""
    import torch
    from transformers import AutoConfig, CLIPModel, SiglipModel

    kind = backbone.model_type
    try:
        config = AutoConfig.from_pretrained(_source(backbone), local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError) as exc:
        raise ExportError(f"could not read the base model's config of {backbone.spec!r} ({exc}); is the base model still there?") from None
    size, native = int(backbone.image_size), int(backbone.native_image_size)
    config.vision_config.image_size = size
    vision = {k: v.detach().clone() for k, v in backbone.image_tower.state_dict().items()}
    if size != native:  # the resampling mumic does at every call (interpolate_pos_encoding), done once
        emb = backbone.image_tower.embeddings
        tokens = (size // int(config.vision_config.patch_size)) ** 2 + (1 if kind == "clip" else 0)
        with torch.no_grad():
            pos = emb.interpolate_pos_encoding(torch.zeros(1, tokens, emb.embed_dim), size, size)
        vision["embeddings.position_embedding.weight"] = pos[0].detach().clone()
    model = (CLIPModel if kind == "clip" else SiglipModel)(config).eval()
    model.vision_model.load_state_dict(vision)
    model.text_model.load_state_dict(backbone.text_tower.state_dict())
    with torch.no_grad():
        if kind == "clip":
            model.visual_projection.load_state_dict(backbone.image_projection.state_dict())
            model.text_projection.load_state_dict(backbone.text_projection.state_dict())
        else:
            model.logit_bias.fill_(default_bias)
        model.logit_scale.fill_(math.log(1.0 / tau))
    return model


def _preprocessor(backbone: Any, kind: str) -> dict[str, Any]:
    size = int(backbone.image_size)
    common = {"do_convert_rgb": True, "do_resize": True, "resample": 3, "do_rescale": True, "rescale_factor": 1 / 255,
              "do_normalize": True, "image_mean": list(backbone.mean), "image_std": list(backbone.std)}
    if kind == "clip":
        return {"image_processor_type": "CLIPImageProcessor", **common, "size": {"shortest_edge": size},
                "do_center_crop": True, "crop_size": {"height": size, "width": size}}
    return {"image_processor_type": "SiglipImageProcessor", **common, "size": {"height": size, "width": size}}


def _heads_state(backbone: Any) -> dict[str, Any]:
    return {f"{name}.{k}": v.detach().float().contiguous().clone()
            for name in ("image_projection", "text_projection")
            for k, v in getattr(backbone, name).state_dict().items()}


def load_heads(folder: str | Path) -> dict[str, Any] | None:
    """The SigLIP projections of an export as torch tensors, or None (CLIP: folded)."""
    from safetensors.torch import load_file

    path = Path(folder) / HEADS_FILE
    return load_file(str(path)) if path.is_file() else None


def hf_image_embeddings(model: Any, pixel_values: Any, heads: dict[str, Any] | None = None) -> Any:
    """[N, D] normalised image embeddings of a reloaded export (classifier.json's recipe)."""
    import torch.nn.functional as F

    f = model.vision_model(pixel_values=pixel_values).pooler_output
    if heads is None:
        return F.normalize(model.visual_projection(f), dim=-1)
    return F.normalize(F.linear(f, heads["image_projection.weight"], heads["image_projection.bias"]), dim=-1)


def hf_text_embeddings(model: Any, enc: dict[str, Any], heads: dict[str, Any] | None = None) -> Any:
    """[M, D] unnormalised text embeddings P_txt(normalize(f_txt)) of a reloaded export;
    average them over a label's prompts, then normalise, for its class embedding."""
    import torch.nn.functional as F

    f = F.normalize(model.text_model(**enc).pooler_output, dim=-1)
    if heads is None:
        return model.text_projection(f)
    return F.linear(f, heads["text_projection.weight"], heads["text_projection.bias"])


def _verify(folder: Path, model: Any, kind: str, prompts: list[str], tau: float, seed: int = 0) -> dict[str, float]:
    """Max abs differences between the reloaded folder and the run: image and text
    embeddings, and probabilities from the classifier file with numpy."""
    import numpy as np
    import torch
    import torch.nn.functional as F
    from safetensors.numpy import load_file
    from transformers import CLIPModel, SiglipModel

    backbone = model.backbone
    with quiet_local_loading():
        reloaded = (CLIPModel if kind == "clip" else SiglipModel).from_pretrained(str(folder), use_safetensors=True).eval()
    heads = load_heads(folder)
    size = backbone.image_size
    px = torch.randint(0, 256, (3, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))
    clf = load_file(str(folder / CLASSIFIER_FILE))
    with torch.inference_mode():
        u_run = F.normalize(model.image_embeddings(px).float(), dim=-1).numpy()
        p_run = model.proba_from_embeddings(model.image_embeddings(px), list(model.labels))
        u_hf = hf_image_embeddings(reloaded, backbone.normalize(px), heads).numpy()
        enc = tokenize(backbone, prompts)
        e_run = F.normalize(backbone.encode_text(prompts).float(), dim=-1).numpy()
        e_hf = F.normalize(hf_text_embeddings(reloaded, enc, heads), dim=-1).numpy()
    z = u_hf @ clf["label_embeddings"].T / np.float32(tau) + clf["bias"]
    p_np = 1.0 / (1.0 + np.exp(-z.astype(np.float64)))
    return {
        "image_embedding_max_abs_diff": float(np.abs(u_hf - u_run).max()),
        "text_embedding_max_abs_diff": float(np.abs(e_hf - e_run).max()),
        "probability_max_abs_diff": float(np.abs(p_np - p_run).max()),
    }


def export_hf(run_dir: str | Path, out: str | Path, *, overwrite: bool = False, verify: bool = True,
              tolerance: float = 1e-4) -> dict[str, Any]:
    """Export an `hf:` run as a transformers folder (see the module docstring); returns the
    content of classifier.json. With verify, the written folder is reloaded with
    from_pretrained and must give the run's embeddings and probabilities within `tolerance`."""
    import numpy as np
    import torch
    from safetensors.numpy import save_file

    from mumic.card import write_card
    from mumic.predictor import Predictor
    from mumic.run import read_run

    out = Path(out)
    check_output_folder(out, overwrite, marker=CLASSIFIER_JSON, what="a transformers export")
    if not str(read_run(run_dir).backbone["spec"]).startswith("hf:"):  # refused before any model is built
        raise ExportError(f"{run_dir} is a 'lite' run: its towers are not a transformers CLIP or SigLIP model; "
                          "export it with `mumic export RUN --format onnx`")
    model = Predictor.from_run(run_dir, device="cpu", lazy_text=False)
    model.eval()
    backbone = model.backbone
    kind = _backbone_kind(backbone)
    check_zero_shot(model, run_dir)
    labels = list(model.labels)
    scoring, v = classifier_table(model, labels)
    hf_model = _assemble(backbone, model.tau, scoring["default_bias"])
    folded = kind == "clip"
    with atomic_folder(out) as tmp:
        with torch.no_grad(), quiet_local_loading():
            hf_model.save_pretrained(str(tmp))
        backbone.tokenizer.save_pretrained(str(tmp))
        (tmp / "preprocessor_config.json").write_text(json.dumps(_preprocessor(backbone, kind), indent=2) + "\n", encoding="utf-8")
        save_file({"label_embeddings": v,
                   "bias": np.array([l["bias"] for l in scoring["labels"]], np.float32),
                   "threshold": np.array([l["threshold"] for l in scoring["labels"]], np.float32)},
                  str(tmp / CLASSIFIER_FILE), metadata={"format": FORMAT})
        if not folded:
            save_file({k: t.numpy() for k, t in _heads_state(backbone).items()}, str(tmp / HEADS_FILE), metadata={"format": FORMAT})
        doc: dict[str, Any] = {
            "format": FORMAT,
            "run": Path(run_dir).name,
            "backbone": public_spec(backbone.spec),
            "model_class": "CLIPModel" if folded else "SiglipModel",
            "file": CLASSIFIER_FILE,
            "tensors": {"label_embeddings": f"float32 [{len(labels)}, {backbone.embed_dim}], normalised, in the order of labels",
                        "bias": "float32 [C]: b of each label", "threshold": "float32 [C]: calibrated decision threshold"},
            **scoring,
            "image_embedding": IMAGE_RECIPE[kind],
            "text_embedding": TEXT_RECIPE[kind],
            "class_embedding": "normalize(mean over the label's prompts of text_embedding); a new label's prompts are the "
                               "templates filled with its name; score it with default_bias",
            "heads": {"folded": True, "where": "visual_projection / text_projection of the model"} if folded else
                     {"folded": False, "file": HEADS_FILE, "tensors": sorted(_heads_state(backbone)),
                      "why": "SigLIP's vision head ends in a residual MLP and mumic normalises the text head's output "
                             "before P_txt, so neither projection folds into SiglipModel's layers"},
            "tokenizer": tokenizer_settings(backbone),
            "preprocessing": {
                "size": int(backbone.image_size), "mean": list(backbone.mean), "std": list(backbone.std),
                "mumic": "the central min(w, h) square, one bicubic resample to size x size (Pillow, reducing_gap), "
                         "then (x/255 - mean)/std; preprocessor_config.json is the nearest image-processor setting "
                         "(it resizes before cropping, so pixels of non-square images differ slightly)",
            },
        }
        if verify:
            prompts = [t for l in labels for t in l.texts(model.templates)][:16]
            diffs = _verify(tmp, model, kind, prompts, float(scoring["tau"]))
            doc["verification"] = {"against": "the run in PyTorch: 3 random images and the run's prompts", **diffs}
            log.info("transformers export vs the run: %s", ", ".join(f"{k} {x:.2e}" for k, x in diffs.items()))
            worst = max(diffs.values())
            if worst > tolerance:
                raise ExportError(f"the reloaded transformers model differs from the run by {worst:.2e} (> {tolerance:g}); "
                                  "please report this")
        (tmp / CLASSIFIER_JSON).write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
        write_card(run_dir, tmp, target="hf", name=out.name, model_type=kind, overwrite=True)
    if not folded:
        log.warning("SigLIP's trained projections do not fold into SiglipModel: they are in %s (see %s)",
                    out / HEADS_FILE, out / CLASSIFIER_JSON)
    return doc

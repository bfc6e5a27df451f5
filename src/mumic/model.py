"""MuMIC: a backbone, class embeddings from prompts as the classifier, and tau / b.

    u   = normalize(P_img(f_img(x)))
    v_c = normalize(P_txt(mean_t normalize(f_txt(t))))      t in the prompts of class c
    z   = (u . v_c) / tau + b,   p = sigmoid(z)

A label never trained on gets v from its prompts and the same tau and b (the mean b when
b is per label): that is zero-shot prediction, with nothing retrained.
"""

from __future__ import annotations

import logging
import math
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from mumic import heads
from mumic.data.manifest import LabelSpec
from mumic.errors import ConfigError, MumicError, RunError

log = logging.getLogger(__name__)

MAX_INV_TAU = heads.MAX_INV_TAU
TEXT_CACHE_SIZE = 8192  # prompt sets whose frozen text features are kept
FORMAT = "mumic-run-1"


def resolve_device(name: str = "auto") -> torch.device:
    """'auto' picks CUDA when available; otherwise the named device, checked."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError):
        raise ConfigError(f"unknown device {name!r}; use cpu, cuda, cuda:N or auto") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} asked for, but CUDA is not available here")
    return dev


class MuMIC(nn.Module):
    """The MuMIC classifier over a backbone (see the module docstring).

    `labels` are all labels of the run; those with `seen=True` are the trained classes
    (the columns of training targets, of a per-label b and of the linear baseline head).
    """

    def __init__(
        self,
        backbone: nn.Module,
        labels: Sequence[LabelSpec],
        templates: Sequence[str],
        *,
        loss: str = "tempered_sigmoid",
        tau: float = 0.07,
        learn_tau: bool = True,
        bias: str = "shared",
    ) -> None:
        super().__init__()
        if not labels:
            raise ConfigError("a MuMIC model needs at least one label")
        names = [l.name for l in labels]
        if len(set(names)) != len(names):
            raise ConfigError("label names must be unique")
        self.backbone = backbone
        self.labels = list(labels)
        self.templates = [t.replace("{label}", "{}") for t in templates]
        self.loss_name = loss
        self.bias_mode = bias
        self.seen = [l for l in self.labels if l.seen]
        if not self.seen:
            raise ConfigError("no seen (trainable) labels: mark at least one label seen")
        self.seen_index = {l.name: i for i, l in enumerate(self.seen)}
        n = len(self.seen)
        fixed = loss == "tempered_sigmoid_fixed" or not learn_tau
        self.log_inv_tau = nn.Parameter(torch.tensor(math.log(1.0 / tau)), requires_grad=not fixed)
        if bias == "none":
            self.register_buffer("bias", torch.zeros(1))
        else:
            self.bias = nn.Parameter(torch.zeros(1 if bias == "shared" else n))
        self.classifier = nn.Linear(backbone.embed_dim, n) if loss == "linear_bce" else None
        # frozen text tower: mean normalised tower feature of each prompt set, computed once
        # (bounded: a service may be asked for any number of new labels)
        self._text_cache: OrderedDict[tuple[str, ...], torch.Tensor] = OrderedDict()
        self.amp = True  # bf16 autocast for inference on CUDA
        # set by from_run / training: calibrated thresholds, the run folder and its config
        self.thresholds: dict[str, Any] | None = None
        self.run_dir: Path | None = None
        self.config: Any = None

    # -- parameters ---------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.log_inv_tau.device

    @property
    def inv_tau(self) -> torch.Tensor:
        return heads.inv_tau(self.log_inv_tau)

    @property
    def tau(self) -> float:
        return float(1.0 / self.inv_tau.detach())

    @property
    def text_tuned(self) -> bool:
        return getattr(self.backbone, "text_tower_mode", "frozen") == "tuned"

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        """Parameter groups with their own learning rates: towers, heads, tau/b."""
        groups = {k: list(v) for k, v in self.backbone.param_groups().items()}
        heads = groups.setdefault("heads", [])
        if self.classifier is not None:
            heads += list(self.classifier.parameters())
        temp = [p for p in (self.log_inv_tau, self.bias) if isinstance(p, nn.Parameter) and p.requires_grad]
        groups["temperature"] = temp
        return groups

    # -- embeddings ---------------------------------------------------------------------
    def image_embeddings(self, pixels: torch.Tensor | None = None, features: torch.Tensor | None = None) -> torch.Tensor:
        """Unnormalised P_img output from uint8 pixels or from cached tower features."""
        if features is None:
            if pixels is None:
                raise MumicError("image_embeddings needs pixels or features")
            features = self._tower(pixels.to(self.device, non_blocking=True))
        return self.backbone.image_head(features.to(self.device).float())

    def compile_image_tower(self, **kwargs: Any) -> "MuMIC":
        """Run the image tower through torch.compile at inference (kwargs go to it).
        The weights and the saved run are unchanged; the first batches pay the compile."""
        self._compiled_tower = torch.compile(self.backbone.image_features, **kwargs)
        return self

    def set_engine(self, engine: str = "auto", cache_dir: str | Path | None = None) -> "MuMIC":
        """Which engine runs the image tower at inference: "torch", "onnxruntime" (CPU
        only; the graph is exported once and cached), or "auto" (onnxruntime on the CPU,
        torch on GPUs). Training always runs in PyTorch. Returns the model."""
        from mumic.backbones.onnx import OnnxImageTower, resolve_engine

        chosen = resolve_engine(engine, self.device)
        self._onnx_tower = OnnxImageTower(self.backbone, cache_dir=cache_dir) if chosen == "onnxruntime" else None
        return self

    def _tower(self, pixels: torch.Tensor) -> torch.Tensor:
        """f_img(x). At inference on CUDA: bf16 autocast, and a batch that does not fit in
        GPU memory is split in halves instead of failing."""
        fn = getattr(self, "_compiled_tower", None) or self.backbone.image_features
        if self.training:
            return fn(pixels)
        onnx = getattr(self, "_onnx_tower", None)
        if onnx is not None and pixels.device.type == "cpu":
            return onnx(pixels)
        try:
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.amp and pixels.device.type == "cuda"):
                return fn(pixels).float()
        except torch.cuda.OutOfMemoryError:
            if len(pixels) < 2:
                raise
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            half = len(pixels) // 2
            log.warning("batch of %d images does not fit in GPU memory; splitting it", len(pixels))
            return torch.cat([self._tower(pixels[:half]), self._tower(pixels[half:])])

    def _prompt_features(self, prompt_sets: Sequence[Sequence[str]]) -> torch.Tensor:
        """[C, F_txt]: per label, the mean of its prompts' normalised tower features."""
        use_cache = not (self.text_tuned and self.training)
        out: list[torch.Tensor | None] = [None] * len(prompt_sets)
        todo: list[int] = []
        for i, ps in enumerate(prompt_sets):
            key = tuple(ps)
            if use_cache and key in self._text_cache:
                out[i] = self._text_cache[key]
                self._text_cache.move_to_end(key)
            else:
                todo.append(i)
        if todo:
            flat = [p for i in todo for p in prompt_sets[i]]
            chunks = []
            ctx = torch.no_grad() if not self.text_tuned else torch.enable_grad()
            with ctx:
                for s in range(0, len(flat), 256):
                    chunks.append(F.normalize(self.backbone.text_features(flat[s : s + 256]).float(), dim=-1))
            feats = torch.cat(chunks)
            pos = 0
            for i in todo:
                n = len(prompt_sets[i])
                f = feats[pos : pos + n].mean(0)
                pos += n
                out[i] = f
                if use_cache:
                    self._text_cache[tuple(prompt_sets[i])] = f.detach()
                    while len(self._text_cache) > TEXT_CACHE_SIZE:
                        self._text_cache.popitem(last=False)
        return torch.stack(out)  # type: ignore[arg-type]

    def class_embeddings(self, labels: Sequence[LabelSpec]) -> torch.Tensor:
        """[C, D] normalised class embeddings v_c of the given labels."""
        feats = self._prompt_features([l.texts(self.templates) for l in labels])
        return F.normalize(self.backbone.text_head(feats.to(self.device)), dim=-1)

    def clear_text_cache(self) -> None:
        self._text_cache.clear()

    # -- scores ---------------------------------------------------------------------------
    def label_biases(self, labels: Sequence[LabelSpec]) -> torch.Tensor:
        """b for each label: its own where b is per label and the label was trained, else the mean."""
        return heads.label_biases(self.bias, self.seen_index, [l.name for l in labels], [l.seen for l in labels])

    def logits(self, u_raw: torch.Tensor, labels: Sequence[LabelSpec] | None = None) -> torch.Tensor:
        """[N, C] logits z for the given labels (default: the seen labels)."""
        labels = self.seen if labels is None else labels
        if self.classifier is not None:
            if any(l.name not in self.seen_index or not l.seen for l in labels):
                raise MumicError("a linear-head run scores only its trained labels; zero-shot labels need a text classifier")
            z = self.classifier(u_raw)
            return z[:, [self.seen_index[l.name] for l in labels]]
        return heads.tempered_logits(u_raw, self.class_embeddings(labels), self.inv_tau, self.label_biases(labels))

    def forward(self, pixels: torch.Tensor | None = None, features: torch.Tensor | None = None) -> torch.Tensor:
        """Logits over the seen labels, from pixels or cached tower features."""
        return self.logits(self.image_embeddings(pixels, features))

    def resolve_labels(self, labels: Sequence[str | LabelSpec] | None) -> list[LabelSpec]:
        """Run labels by name, or new labels (zero-shot) from their names / specs."""
        if labels is None:
            return list(self.labels)
        known = {l.name: l for l in self.labels}
        out = []
        for l in labels:
            if isinstance(l, LabelSpec):
                out.append(l if l.name not in known or l.prompts else known[l.name])
                continue
            name = str(l).strip()
            if not name:
                raise MumicError("a label name must not be empty")
            out.append(known.get(name) or LabelSpec(name=name, seen=False))
        return out

    # -- inference --------------------------------------------------------------------------
    def _pixel_batches(self, images: Sequence[Any], batch_size: int, num_workers: int = 0,
                       decode: str = "cpu") -> Iterator[torch.Tensor]:
        from mumic.data.dataset import pixel_batches
        from mumic.data.images import resize_center_crop

        size = self.backbone.image_size
        if all(isinstance(x, (str, Path)) for x in images):
            for _, px, _ in pixel_batches([Path(x) for x in images], size, batch_size, device=self.device,
                                          num_workers=num_workers, decode=decode):
                yield px
            return
        for s in range(0, len(images), batch_size):
            arrs = []
            for x in images[s : s + batch_size]:
                if isinstance(x, (str, Path)):
                    from mumic.data.images import load_image

                    x = load_image(Path(x), size_hint=size)
                if isinstance(x, np.ndarray):
                    from PIL import Image

                    x = Image.fromarray(x)
                arrs.append(torch.from_numpy(resize_center_crop(x.convert("RGB"), size)))
            yield torch.stack(arrs)

    @torch.inference_mode()
    def embed_images(self, images: Sequence[Any], batch_size: int = 32, num_workers: int = 0, decode: str = "cpu") -> np.ndarray:
        """[N, D] normalised image embeddings (paths, PIL images or HxWx3 uint8 arrays).
        ``decode="gpu"`` decodes JPEG files with nvjpeg (CUDA + torchvision)."""
        self.eval()
        batches = self._pixel_batches(images, batch_size, num_workers, decode)
        out = [F.normalize(self.image_embeddings(px).float(), dim=-1).cpu() for px in batches]
        return torch.cat(out).numpy() if out else np.zeros((0, self.backbone.embed_dim), np.float32)

    @torch.inference_mode()
    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        """[M, D] normalised text embeddings in the image embedding space (one prompt each)."""
        self.eval()
        specs = [LabelSpec(name=t, prompts=[t], seen=False) for t in texts]
        return self.class_embeddings(specs).float().cpu().numpy()

    @torch.inference_mode()
    def proba_from_embeddings(self, u_raw: torch.Tensor, labels: Sequence[str | LabelSpec] | None = None) -> np.ndarray:
        self.eval()
        specs = self.resolve_labels(labels)
        return torch.sigmoid(self.logits(u_raw.to(self.device), specs).float()).cpu().numpy()

    @torch.inference_mode()
    def predict_proba(
        self, images: Sequence[Any], labels: Sequence[str | LabelSpec] | None = None, batch_size: int = 32, num_workers: int = 0,
        decode: str = "cpu",
    ) -> np.ndarray:
        """[N, C] probabilities for the run's labels, or for `labels` (names not in the run
        are zero-shot labels built from the prompt templates)."""
        self.eval()
        specs = self.resolve_labels(labels)
        out = []
        for px in self._pixel_batches(images, batch_size, num_workers, decode):
            out.append(torch.sigmoid(self.logits(self.image_embeddings(px), specs).float()).cpu())
        return torch.cat(out).numpy() if out else np.zeros((0, len(specs)), np.float32)

    # -- persistence ------------------------------------------------------------------------
    def trained_state(self) -> dict[str, torch.Tensor]:
        """The weights that differ from the pretrained backbone: heads, tuned tower parts, tau, b."""
        prefixes = tuple("backbone." + p for p in self.backbone.tuned_prefixes())
        return {
            k: v
            for k, v in self.state_dict().items()
            if not k.startswith("backbone.") or k.startswith(prefixes)
        }

    def load_trained_state(self, state: dict[str, torch.Tensor], source: str = "weights") -> None:
        """Load weights saved by trained_state, refusing missing or unexpected keys."""
        own = self.state_dict()
        expected = set(self.trained_state())
        unexpected = sorted(k for k in state if k not in expected)
        missing = sorted(k for k in expected if k not in state)
        if unexpected or missing:
            what = f"unexpected keys {unexpected[:3]}" if unexpected else f"missing keys {missing[:3]}"
            raise RunError(f"{source} do not fit this model ({what}); was the run made with another backbone or config?")
        for k, v in state.items():
            if not isinstance(v, torch.Tensor):
                raise RunError(f"{source}: '{k}' is a {type(v).__name__}, not a tensor")
            if own[k].shape != v.shape:
                raise RunError(f"{source}: '{k}' has shape {tuple(v.shape)}, the model expects {tuple(own[k].shape)}")
            if own[k].is_floating_point() != v.is_floating_point() or v.is_complex():
                raise RunError(f"{source}: '{k}' has dtype {v.dtype}, the model expects {own[k].dtype}")
            if v.is_floating_point() and not bool(torch.isfinite(v).all()):
                raise RunError(f"{source}: '{k}' holds NaN or infinite values; the weights are corrupt — train the run again")
        self.load_state_dict(state, strict=False)
        self.clear_text_cache()

    @classmethod
    def from_run(cls, run_dir: str | Path, device: str = "auto") -> "MuMIC":
        """Load a trained run directory (config.yaml, labels.json, model.safetensors)."""
        from mumic.backbones import load_backbone
        from mumic.config import load_config
        from mumic.io import load_tensors, read_json

        run = Path(run_dir)
        if not run.is_dir():
            raise RunError(f"run directory {run} does not exist")
        # a run is read through safetensors and JSON/YAML parsers only; anything that
        # could be unpickled is refused outright rather than ignored
        pickle_suffixes = (".pt", ".pth", ".bin", ".pkl", ".pickle", ".ckpt", ".joblib", ".npz")
        pickles = sorted(p.name for p in run.iterdir() if p.name.lower().endswith(pickle_suffixes))
        if pickles:
            raise RunError(f"{run} holds pickle files ({', '.join(pickles)}); runs load safetensors only — remove them")
        for name in ("config.yaml", "labels.json", "model.safetensors"):
            if not (run / name).is_file():
                raise RunError(f"{run} is not a finished run: {name} is missing")
        cfg = load_config(run / "config.yaml")
        labels_path = run / "labels.json"
        meta = read_json(labels_path)

        def malformed(what: str) -> RunError:
            return RunError(f"{labels_path} is malformed: {what}; restore it from the original run")

        def str_list(value: Any, what: str) -> list[str] | None:
            if value is None:
                return None
            if not isinstance(value, list) or not all(isinstance(x, str) for x in value):
                raise malformed(f"{what} must be a list of strings, got {value!r:.80}")
            return list(value)

        def number(value: Any, what: str) -> float:
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise malformed(f"{what} must be a finite number, got {value!r:.80}")
            return float(value)

        if not isinstance(meta, dict):
            raise malformed(f"expected a JSON object, got {type(meta).__name__}")
        if meta.get("format", FORMAT) != FORMAT:
            raise RunError(f"{labels_path}: run format {meta.get('format')!r} is not {FORMAT!r}; it was written by another version of mumic")
        for key in ("labels", "templates", "model"):
            if key not in meta:
                raise malformed(f"the key '{key}' is missing")
        if not isinstance(meta["labels"], list) or not meta["labels"]:
            raise malformed("'labels' must be a non-empty list")
        specs = []
        for k, l in enumerate(meta["labels"]):
            if not isinstance(l, dict):
                raise malformed(f"label #{k + 1} must be an object, got {type(l).__name__}")
            name = l.get("name")
            if not isinstance(name, str) or not name.strip():
                raise malformed(f"label #{k + 1} has no name (a non-empty string)")
            if not isinstance(l.get("seen"), bool):
                raise malformed(f"label {name!r}: 'seen' must be true or false, got {l.get('seen')!r:.80}")
            description = l.get("description")
            if description is not None and not isinstance(description, str):
                raise malformed(f"label {name!r}: 'description' must be a string")
            specs.append(LabelSpec(name=name, prompts=str_list(l.get("prompts"), f"label {name!r}: 'prompts'"),
                                   description=description, seen=l["seen"]))
        names = [l.name for l in specs]
        if len(set(names)) != len(names):
            raise malformed(f"duplicate label names ({', '.join(sorted({n for n in names if names.count(n) > 1})[:3])})")
        templates = str_list(meta["templates"], "'templates'") or []
        model_meta = meta["model"]
        if not isinstance(model_meta, dict) or not isinstance(model_meta.get("backbone"), dict):
            raise malformed("'model' must be an object with a 'backbone' object")
        backbone_args = model_meta["backbone"]
        allowed = ("spec", "image_size", "image_head", "seed")
        odd = sorted(set(backbone_args) - set(allowed))
        if odd or not isinstance(backbone_args.get("spec"), str):
            raise malformed(f"'model.backbone' must have a string 'spec' and only the keys {', '.join(allowed)}" + (f" (found {', '.join(odd)})" if odd else ""))
        if backbone_args.get("image_size") is not None and (isinstance(backbone_args["image_size"], bool) or not isinstance(backbone_args["image_size"], int)):
            raise malformed("'model.backbone.image_size' must be an integer")
        if not isinstance(backbone_args.get("seed", 0), int) or isinstance(backbone_args.get("seed", 0), bool):
            raise malformed("'model.backbone.seed' must be an integer")
        if backbone_args.get("image_head") is not None and not isinstance(backbone_args["image_head"], str):
            raise malformed("'model.backbone.image_head' must be a string")
        tau = number(model_meta.get("tau", 0.07), "'model.tau'")
        if tau <= 0:
            raise malformed(f"'model.tau' must be > 0, got {tau}")
        dev = resolve_device(device)
        backbone = load_backbone(**backbone_args, device=str(dev))
        backbone.set_trainable(image_tower=cfg.image_tower, text_tower=cfg.text_tower)
        model = cls(backbone, specs, templates, loss=cfg.loss, tau=tau, learn_tau=cfg.learn_tau, bias=cfg.bias)
        model.to(dev)
        model.load_trained_state(load_tensors(run / "model.safetensors"), source=str(run / "model.safetensors"))
        thresholds = load_thresholds(run, [l.name for l in specs])
        per_label = thresholds["per_label"]
        if not isinstance(per_label, dict) or not all(
            isinstance(k, str) and not isinstance(v, bool) and isinstance(v, (int, float)) and 0.0 <= v <= 1.0
            for k, v in per_label.items()
        ):
            raise RunError(f"{run / 'thresholds.json'} is malformed: 'per_label' must map label names to numbers in [0, 1]")
        default = thresholds["default"]
        if isinstance(default, bool) or not isinstance(default, (int, float)) or not 0.0 <= default <= 1.0:
            raise RunError(f"{run / 'thresholds.json'} is malformed: 'default' must be a number in [0, 1], got {default!r:.80}")
        model.thresholds = thresholds
        model.run_dir = run
        model.config = cfg
        model.eval()
        return model

    def decide(self, probs: np.ndarray, labels: Sequence[LabelSpec]) -> np.ndarray:
        """Boolean decisions with the run's calibrated thresholds (default for new labels)."""
        th = getattr(self, "thresholds", None) or {"per_label": {}, "default": 0.5}
        t = np.array([th["per_label"].get(l.name, th["default"]) for l in labels], dtype=np.float32)
        return probs >= t


def load_thresholds(run: Path, names: Sequence[str]) -> dict[str, Any]:
    from mumic.io import read_json

    path = Path(run) / "thresholds.json"
    if not path.is_file():
        log.warning("%s is missing; deciding at probability 0.5", path)
        return {"per_label": {}, "default": 0.5}
    data = read_json(path)
    if not isinstance(data, dict) or "per_label" not in data or "default" not in data:
        raise RunError(f"{path} is malformed: expected keys per_label and default")
    return data


def labels_meta(model: MuMIC, train_counts: dict[str, int], backbone_config: dict[str, Any], tau0: float) -> dict[str, Any]:
    """The content of a run's labels.json."""
    return {
        "format": FORMAT,
        "labels": [
            {"name": l.name, "prompts": l.prompts, "description": l.description, "seen": l.seen, "train_positives": int(train_counts.get(l.name, 0))}
            for l in model.labels
        ],
        "templates": model.templates,
        "model": {"backbone": backbone_config, "tau": tau0},
    }

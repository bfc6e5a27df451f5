"""MuMIC: a backbone, class embeddings from prompts as the classifier, and tau / b.

    u   = normalize(P_img(f_img(x)))
    v_c = normalize(P_txt(mean_t normalize(f_txt(t))))      t in the prompts of class c
    z   = (u . v_c) / tau + b,   p = sigmoid(z)

A label never trained on gets v from its prompts and the same tau and b (the mean b when
b is per label): that is zero-shot prediction, with nothing retrained.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from mumic import heads
from mumic.backbones.base import Backbone
from mumic.data.labels import LabelSpec, normalize_label
from mumic.errors import ConfigError, MumicError, RunError
from mumic.losses import loss_spec

log = logging.getLogger(__name__)

MAX_INV_TAU = heads.MAX_INV_TAU
TEXT_CACHE_SIZE = 8192  # prompt sets whose frozen text features are kept


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

    thresholds: dict[str, Any] | None = None  # calibrated per-label thresholds, once fitted

    def __init__(
        self,
        backbone: Backbone,
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
        spec = loss_spec(loss)
        self.head_kind = spec.head  # "prompt": class embeddings score any label; "linear": the trained ones only
        fixed = not spec.learns_tau or not learn_tau
        self.log_inv_tau = nn.Parameter(torch.tensor(math.log(1.0 / tau)), requires_grad=not fixed)
        if bias == "none":
            self.register_buffer("bias", torch.zeros(1))
        else:
            self.bias = nn.Parameter(torch.zeros(1 if bias == "shared" else n))
        self.classifier = nn.Linear(backbone.embed_dim, n) if spec.head == "linear" else None
        # frozen text tower: mean normalised tower feature of each prompt set, computed once
        # (bounded: a service may be asked for any number of new labels)
        self._text_cache: OrderedDict[tuple[str, ...], torch.Tensor] = OrderedDict()
        self.amp = True  # bf16 autocast for inference on CUDA

    # -- parameters ---------------------------------------------------------------------
    @property
    def zero_shot(self) -> bool:
        """Whether the head scores labels from their prompts, so new labels need no training."""
        return self.head_kind == "prompt"

    @property
    def scored_labels(self) -> list[LabelSpec]:
        """The run labels the head can score: all of them, or the trained ones for a linear head."""
        return list(self.labels) if self.zero_shot else list(self.seen)

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
        if self.classifier is not None:  # the linear head
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

    def _tower(self, pixels: torch.Tensor, fn: Any = None) -> torch.Tensor:
        """f_img(x), through `fn` when given (a compiled tower). At inference on CUDA: bf16
        autocast, and a batch that does not fit in GPU memory is split in halves instead of
        failing."""
        fn = fn or self.backbone.image_features
        if self.training:
            return fn(pixels)
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
            return torch.cat([self._tower(pixels[:half], fn), self._tower(pixels[half:], fn)])

    def _prompt_features(self, prompt_sets: Sequence[Sequence[str]]) -> torch.Tensor:
        """[C, F_txt]: per label, the mean of its prompts' normalised tower features."""
        use_cache = not (self.text_tuned and self.training)
        out: list[torch.Tensor | None] = [None] * len(prompt_sets)
        todo: list[int] = []
        for i, ps in enumerate(prompt_sets):
            key = tuple(ps)
            hit = self._text_cache.get(key) if use_cache else None
            if hit is not None:
                out[i] = hit
                with contextlib.suppress(KeyError):  # cleared meanwhile by another thread (a service's text jobs)
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
                        with contextlib.suppress(KeyError):
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
        if self.classifier is not None:  # the linear head
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
            name = normalize_label(str(l))
            if not name:
                raise MumicError("a label name must not be empty")
            out.append(known.get(name) or LabelSpec(name=name, seen=False))
        return out

    @torch.inference_mode()
    def proba_from_embeddings(self, u_raw: torch.Tensor, labels: Sequence[str | LabelSpec] | None = None) -> np.ndarray:
        """[N, C] probabilities sigmoid(z) of image embeddings for the given labels."""
        self.eval()
        specs = self.resolve_labels(labels)
        return torch.sigmoid(self.logits(u_raw.to(self.device), specs).float()).cpu().numpy()

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

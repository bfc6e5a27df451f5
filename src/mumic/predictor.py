"""Inference with a trained run: `Predictor.from_run(RUN)`.

A Predictor is the run's MuMIC model plus what inference needs around it: the run's
calibrated thresholds and config, the engine that runs the image tower (onnxruntime on
CPUs, PyTorch with bf16 autocast on GPUs, optionally torch.compile), image inputs of every
kind (paths, PIL images, arrays), and the run's stored class embeddings, so that scoring
the run's own labels loads no text tower.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from mumic.backbones import load_backbone
from mumic.backbones.onnx import OnnxImageTower, resolve_engine
from mumic.data.dataset import pixel_batches
from mumic.data.images import load_image, resize_center_crop
from mumic.data.labels import LabelSpec
from mumic.io import load_tensors
from mumic.model import MuMIC, resolve_device
from mumic.run import RunFiles, read_class_embeddings, read_run

log = logging.getLogger(__name__)


class Predictor(MuMIC):
    """A trained run, ready to embed and score images (see the module docstring)."""

    run_dir: Path | None
    config: Any
    _stored_v: dict[str, tuple[tuple[str, ...], torch.Tensor]] | None = None  # the run's own class embeddings

    @classmethod
    def from_run(cls, run_dir: str | Path, device: str = "auto", *, lazy_text: bool = True) -> Predictor:
        """Load a trained run directory (config.yaml, labels.json, model.safetensors).
        With `lazy_text` a frozen text tower is loaded only when a label or a text query
        needs it (the run's own labels are scored from their stored class embeddings)."""

        files: RunFiles = read_run(run_dir)
        cfg = files.config
        dev = resolve_device(device)
        backbone = load_backbone(**files.backbone, device=str(dev), lazy_text=lazy_text and cfg.text_tower == "frozen")
        backbone.set_trainable(image_tower=cfg.image_tower, text_tower=cfg.text_tower)
        model = cls(backbone, files.labels, files.templates, loss=cfg.loss, tau=files.tau,
                    learn_tau=cfg.resolved_learn_tau(backbone.logit_scale), bias=cfg.bias)
        model.to(dev)
        weights_path = files.path / "model.safetensors"
        weights = load_tensors(weights_path)
        model.load_trained_state(weights, source=str(weights_path))
        stored = read_class_embeddings(files.path, model, weights)
        if stored is not None:
            model._stored_v = {s.name: (tuple(s.texts(model.templates)), stored[i].to(dev)) for i, s in enumerate(model.labels)}
        model.thresholds = files.thresholds
        model.run_dir = files.path
        model.config = cfg
        model.eval()
        return model

    # -- the image tower at inference ------------------------------------------------------
    def compile_image_tower(self, **kwargs: Any) -> Predictor:
        """Run the image tower through torch.compile at inference (kwargs go to it).
        The weights and the saved run are unchanged; the first batches pay the compile."""
        self._compiled_tower = torch.compile(self.backbone.image_features, **kwargs)
        return self

    def set_engine(self, engine: str = "auto", cache_dir: str | Path | None = None, text_threads: int | None = None,
                   image_threads: int | None = None) -> Predictor:
        """Which engine runs the image tower at inference: "torch", "onnxruntime" (CPU
        only; the graph is exported once and cached), or "auto" (onnxruntime on the CPU,
        torch on GPUs). onnxruntime runs the image tower on `image_threads` threads
        (default: torch's), and a frozen `lite` text tower there too, on `text_threads`
        threads (default: torch's). Training always runs in PyTorch. Returns the predictor."""

        chosen = resolve_engine(engine, self.device)
        self._onnx_tower = (OnnxImageTower(self.backbone, cache_dir=cache_dir, threads=image_threads)
                            if chosen == "onnxruntime" else None)
        use_onnx_text = getattr(self.backbone, "use_onnx_text", None)  # backbones whose text tower has a graph
        if use_onnx_text is not None:
            use_onnx_text(chosen == "onnxruntime", cache_dir, text_threads)
        return self

    def _tower(self, pixels: torch.Tensor, fn: Any = None) -> torch.Tensor:
        if not self.training:
            onnx = getattr(self, "_onnx_tower", None)
            if onnx is not None and pixels.device.type == "cpu":
                return onnx(pixels)
        return super()._tower(pixels, fn or getattr(self, "_compiled_tower", None))

    # -- class embeddings ------------------------------------------------------------------
    def class_embeddings(self, labels: Sequence[LabelSpec]) -> torch.Tensor:
        """[C, D] class embeddings: the run's stored ones for its own labels (same prompts),
        the text tower for the others."""
        stored = getattr(self, "_stored_v", None)
        if not stored or (self.text_tuned and self.training):
            return super().class_embeddings(labels)
        hits = [stored.get(s.name) for s in labels]
        ok = [h is not None and h[0] == tuple(s.texts(self.templates)) for h, s in zip(hits, labels)]
        if all(ok):
            return torch.stack([h[1] for h in hits]) if hits else super().class_embeddings(labels)
        todo = [s for s, k in zip(labels, ok) if not k]
        fresh = iter(super().class_embeddings(todo))
        return torch.stack([h[1] if k else next(fresh) for h, k in zip(hits, ok)])

    # -- inputs ----------------------------------------------------------------------------
    def _pixel_batches(self, images: Sequence[Any], batch_size: int, num_workers: int = 0,
                       decode: str = "cpu") -> Iterator[torch.Tensor]:

        size = self.backbone.image_size
        if all(isinstance(x, (str, Path)) for x in images):
            for _, px, _ in pixel_batches([Path(x) for x in images], size, batch_size, device=self.device,
                                          num_workers=num_workers, decode=decode):
                yield px
            return
        from PIL import Image

        for s in range(0, len(images), batch_size):
            arrs = []
            for x in images[s : s + batch_size]:
                if isinstance(x, (str, Path)):
                    x = load_image(Path(x), size_hint=size)
                if isinstance(x, np.ndarray):
                    x = Image.fromarray(x)
                arrs.append(torch.from_numpy(resize_center_crop(x.convert("RGB"), size)))
            yield torch.stack(arrs)

    # -- outputs ---------------------------------------------------------------------------
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
        return MuMIC.class_embeddings(self, specs).float().cpu().numpy()

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

    def decide(self, probs: np.ndarray, labels: Sequence[str | LabelSpec] | None = None) -> np.ndarray:
        """Boolean decisions with the run's calibrated thresholds (the default one for
        labels without their own); `labels` as in predict_proba, by default the run's."""
        specs = self.resolve_labels(labels)
        th = getattr(self, "thresholds", None) or {"per_label": {}, "default": 0.5}
        t = np.array([th["per_label"].get(s.name, th["default"]) for s in specs], dtype=np.float32)
        return probs >= t

"""Evaluation of a model on a manifest (the paper's metrics) and the run report."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from mumic.data.dataset import pixel_batches
from mumic.data.labels import LabelSpec
from mumic.data.manifest import Manifest, read_manifest
from mumic.errors import ConfigError, ManifestError
from mumic.features import cached_features
from mumic.io import atomic_write_json
from mumic.metrics import evaluate_scores
from mumic.model import MuMIC
from mumic.predictor import Predictor
from mumic.report import HEADLINE, per_label_rows

log = logging.getLogger(__name__)



@torch.inference_mode()
def manifest_embeddings(
    model: MuMIC,
    paths: Sequence[Path],
    *,
    features: torch.Tensor | None = None,
    batch_size: int = 64,
    num_workers: int = 0,
    device: torch.device | None = None,
    progress: bool = False,
    failures: list[tuple[int, str]] | None = None,
    decode: str = "cpu",
    on_batch: Callable[[int], Any] | None = None,
) -> torch.Tensor:
    """[N, D] unnormalised image embeddings P_img(f_img(x)), from cached features if given.

    With a `failures` list, unreadable images give NaN rows and a (row, reason) entry
    instead of an error. `on_batch(n)` is called after each batch of n images (a
    progress bar of the caller's)."""

    model.eval()
    device = device or model.device
    if features is not None:
        return torch.cat([model.image_embeddings(features=features[s : s + 4096].to(device)).float().cpu()
                          for s in range(0, len(features), 4096)])
    skip = failures is not None
    batches = pixel_batches(list(paths), model.backbone.image_size, batch_size, device=device, num_workers=num_workers,
                            skip_bad=skip, decode=decode)
    out = []
    for idx, px, reasons in tqdm(batches, desc="images", unit="batch", disable=not progress, leave=False):
        u = model.image_embeddings(px).float().cpu()
        if on_batch is not None:
            on_batch(len(u))
        if reasons is not None:
            bad = [r for r, reason in enumerate(reasons) if reason]
            failures.extend((int(idx[r]), reasons[r]) for r in bad)  # type: ignore[union-attr]
            u[bad] = float("nan")
        out.append(u)
    return torch.cat(out) if out else torch.zeros((0, model.backbone.embed_dim))


def evaluate_probs(
    model: MuMIC,
    manifest: Manifest,
    probs: np.ndarray,
    *,
    labels: Sequence[LabelSpec] | None = None,
    seen_only: bool = False,
    train_counts: dict[str, int] | None = None,
    majority_n: int = 32,
) -> dict[str, float]:
    """Metrics of probabilities [N, C] over `labels` (default: the seen labels if seen_only)."""

    labels = list(model.seen if seen_only or labels is None else labels)
    names = [l.name for l in labels]
    y, _ = manifest.targets(names, unlisted="negative", ignore_unknown=True)
    unseen = np.array([not l.seen for l in labels])
    counts = np.array([(train_counts or {}).get(n, 0) for n in names]) if train_counts else None
    th = getattr(model, "thresholds", None)
    thresholds = None
    if th:
        thresholds = np.array([th["per_label"].get(n, th["default"]) for n in names], np.float32)
    out = evaluate_scores(
        np.asarray(y), probs, train_counts=counts, majority_n=majority_n,
        unseen=unseen if unseen.any() else None, thresholds=thresholds,
    )
    # plain JSON numbers: counts stay integers
    return {k: (int(v) if isinstance(v, (int, np.integer)) else float(v) if isinstance(v, (float, np.floating)) else v)
            for k, v in out.items()}


def model_probs(
    model: MuMIC,
    manifest: Manifest,
    *,
    labels: Sequence[LabelSpec] | None = None,
    use_cache: bool = False,
    cache_dir: str | Path | None = None,
    batch_size: int = 64,
    num_workers: int = 0,
    progress: bool = False,
    failures: list[tuple[int, str]] | None = None,
    decode: str = "cpu",
    engine: str = "torch",
) -> tuple[np.ndarray, list[LabelSpec]]:
    """Probabilities [N, C] of a model on a manifest's images, and the labels scored
    (default: every label the model can score). `use_cache` reads and fills the frozen
    image-tower feature cache (only valid while the image tower is frozen)."""
    feats = None
    if use_cache:

        # cached_features takes a Path; an empty cache_dir means the default, as None does
        cache = Path(cache_dir) if cache_dir else None
        feats = cached_features(model.backbone, manifest.images, cache_dir=cache, batch_size=batch_size,
                                num_workers=num_workers, device=model.device, progress=progress, failures=failures,
                                decode=decode, engine=engine)
    u = manifest_embeddings(model, manifest.images, features=feats, batch_size=batch_size, num_workers=num_workers,
                            progress=progress, failures=None if feats is not None else failures, decode=decode)
    specs = list(labels) if labels is not None else model.scored_labels
    return model.proba_from_embeddings(u, specs), specs


def evaluate_model(
    model: MuMIC,
    manifest: Manifest,
    *,
    train_counts: dict[str, int] | None = None,
    majority_n: int = 32,
    **kw: Any,
) -> dict[str, float]:
    """All metrics of a model on a manifest: seen labels, and zero-shot on unseen ones.
    Keyword arguments go to model_probs."""
    return evaluate_model_scores(model, manifest, train_counts=train_counts, majority_n=majority_n, **kw)[0]


def evaluate_model_scores(
    model: MuMIC,
    manifest: Manifest,
    *,
    train_counts: dict[str, int] | None = None,
    majority_n: int = 32,
    **kw: Any,
) -> tuple[dict[str, float], Manifest, np.ndarray, list[LabelSpec]]:
    """evaluate_model, and what it scored: (metrics, the rows evaluated, their
    probabilities [N, C], the labels)."""
    known = {l.name for l in model.labels}
    for i, labels in enumerate(manifest.labels):
        bad = [l for l in labels if l not in known]
        if bad:
            raise ManifestError(f"{manifest.path}, line {manifest.lines[i]}: label '{bad[0]}' is not a label of this run")
    probs, specs = model_probs(model, manifest, **kw)
    if kw.get("failures"):
        ok = ~np.isnan(probs).any(1)
        manifest, probs = manifest.select(np.flatnonzero(ok)), probs[ok]
    metrics = evaluate_probs(model, manifest, probs, labels=specs, train_counts=train_counts, majority_n=majority_n)
    return metrics, manifest, probs, specs


def evaluate_run(run_dir: str | Path, manifest_path: str | Path, *, split: str | None = None, out: str | Path | None = None,
                 batch_size: int = 64, num_workers: int = 0, device: str = "auto", progress: bool = True,
                 allow_outside: bool = False, allow_duplicates: bool = False, decode: str = "cpu",
                 engine: str = "torch", per_label: bool = False, overwrite: bool = True,
                 on_result: Callable[[dict[str, Any]], Any] | None = None) -> dict[str, Any]:
    """`mumic evaluate`: metrics of a run on a manifest (or one split of it), written as JSON.
    `on_result` gets the result before the JSON is written, so a write that fails (a full
    disk, a read-only run) does not lose what was computed.
    With `per_label`, the result (and the JSON) also hold "per_label": one row per label
    (see report.per_label_rows: positives, AP, threshold, whether it is the global one).
    Without `overwrite` an existing output file is refused before anything is computed."""
    target = Path(out) if out else Path(run_dir) / f"eval-{Path(manifest_path).stem}{'-' + split if split else ''}.json"
    if target.exists() and not overwrite:
        raise ConfigError(f"{target} already exists; pass --overwrite to replace it, or choose another --out")
    model = Predictor.from_run(run_dir, device=device).set_engine(engine)
    manifest = read_manifest(manifest_path, allow_outside=allow_outside, allow_duplicates=allow_duplicates)
    if split:
        manifest = manifest.split(split)
    meta = json.loads((Path(run_dir) / "labels.json").read_text())
    counts = {l["name"]: l.get("train_positives", 0) for l in meta["labels"]}
    metrics, scored, probs, specs = evaluate_model_scores(model, manifest, train_counts=counts, majority_n=model.config.majority_n,
                                                          batch_size=batch_size, num_workers=num_workers, progress=progress,
                                                          decode=decode)
    result: dict[str, Any] = dict(metrics)
    doc: dict[str, Any] = {"manifest": str(manifest_path), "split": split, "images": len(manifest), "metrics": metrics}
    if per_label:
        names = [s.name for s in specs]
        y, _ = scored.targets(names, ignore_unknown=True)
        rows = per_label_rows(names, [s.seen for s in specs], np.asarray(y), probs, model.thresholds, counts)
        result["per_label"] = doc["per_label"] = rows
    if on_result is not None:
        on_result(result)
    atomic_write_json(target, doc)
    return result


def format_metrics(metrics: dict[str, Any]) -> str:
    """Metrics as aligned text, the paper's figures first."""
    keys = [k for k in HEADLINE if k in metrics] + [k for k in metrics if k not in HEADLINE and not isinstance(metrics[k], list)]
    lines = []
    for k in keys:
        v = metrics[k]
        lines.append(f"{k:>14}  {v:.4f}" if isinstance(v, float) else f"{k:>14}  {v}")
    return "\n".join(lines)

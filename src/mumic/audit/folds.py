"""Out-of-fold probabilities by K-fold cross-fitting with a run's own configuration.

The audited rows (the training rows of the manifest: split 'train', or every row where
there is none) are dealt into K folds by a seeded permutation. Fold k trains a normal run
(:func:`mumic.train.fit`) on the other K-1 folds, with the manifest's validation rows for
early stopping and thresholds, then scores the rows of fold k. With a frozen image tower
every fold reads the same feature cache, so the audit costs K trainings on cached
features, not K feature passes.

    AUDIT/folds/fold-<k>/manifest.csv      the fold's training + validation rows
    AUDIT/folds/fold-<k>/heldout.csv       the rows it scores
    AUDIT/folds/fold-<k>/run/              its run directory
    AUDIT/folds/fold-<k>/oof.safetensors   rows, probabilities and thresholds of fold k

A fold whose oof.safetensors holds the same key (a digest of the fold's configuration and
rows) is reused, an interrupted fold run is resumed, so an interrupted audit resumes
where it stopped.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mumic.config import TrainConfig, load_config
from mumic.data.manifest import SEPARATOR, Manifest, read_manifest
from mumic.errors import ConfigError, ManifestError, RunError
from mumic.io import atomic_write_text

log = logging.getLogger(__name__)

NEUTRAL_KEYS = ("out", "device", "num_workers", "cache_dir", "engine")  # keys that do not change what a fold learns


@dataclass
class OOF:
    """Out-of-fold scores of the audited rows of a manifest."""

    manifest: Manifest  # the whole manifest as read
    rows: np.ndarray  # [N] indices into the manifest of the audited rows
    names: list[str]  # the C trained labels, in column order
    probs: np.ndarray  # [N, C] out-of-fold probabilities
    thresholds: np.ndarray  # [N, C] the calibrated threshold of each row's fold
    fold: np.ndarray  # [N] the fold that scored each row
    config: TrainConfig  # the configuration the folds were trained with (out unset)


def audit_config(run_or_config: str | os.PathLike[str], manifest: str | os.PathLike[str] | None = None,
                 overrides: dict[str, Any] | None = None) -> TrainConfig:
    """The configuration to cross-fit: a run directory's config.yaml or a YAML config file,
    with `manifest` (if given) as the training manifest."""
    src = Path(run_or_config)
    path = src / "config.yaml" if src.is_dir() else src
    if src.is_dir() and not path.is_file():
        raise RunError(f"{src} is not a run directory (config.yaml is missing); give a run or a YAML config")
    if not path.is_file():
        raise ConfigError(f"{src} is neither a run directory nor a config file")
    values = load_config(path).to_dict()
    if manifest is not None:
        values["manifest"] = str(manifest)
        if src.is_dir():  # a run's own validation/test files still apply only when given explicitly
            values.update(val_manifest=values.get("val_manifest"), test_manifest=values.get("test_manifest"))
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    values["out"] = None
    cfg = load_config(None, values)
    if not cfg.manifest:
        raise ConfigError(f"{src} names no training manifest; give --manifest")
    return cfg


def audited_rows(m: Manifest) -> np.ndarray:
    """Rows that training reads: split 'train' (any case), or every row where there is none."""
    if m.splits is None:
        return np.arange(len(m))
    names = {s for s in m.splits if s.strip().lower() == "train"}
    if not names:
        return np.arange(len(m))
    return np.flatnonzero([s in names for s in m.splits])


def fold_of(n: int, k: int, seed: int) -> np.ndarray:
    """Fold (0..k-1) of each of n rows: a seeded permutation dealt round-robin."""
    if k < 2:
        raise ConfigError(f"--folds must be at least 2, got {k}")
    if n < k:
        raise ManifestError(f"only {n} training rows for {k} folds; use fewer folds")
    out = np.empty(n, np.int64)
    perm = np.random.default_rng([int(seed), 0x61756469]).permutation(n)
    out[perm] = np.arange(n) % k
    return out


def _csv(m: Manifest, rows: np.ndarray, splits: list[str] | None) -> str:
    """Rows of `m` as a CSV manifest with absolute image paths (labels and negatives as parsed)."""
    import io

    df = m.frame.iloc[rows].reset_index(drop=True).copy()
    df["image"] = [str(m.images[i]) for i in rows]
    df["labels"] = [SEPARATOR.join(m.labels[i]) for i in rows]
    if m.negatives is not None:
        df["negatives"] = [SEPARATOR.join(m.negatives[i]) for i in rows]
    if splits is not None:
        df["split"] = splits
    buf = io.StringIO()
    df.to_csv(buf, index=False, lineterminator="\n")
    return buf.getvalue()


def _write_if_changed(path: Path, text: str) -> None:
    if path.is_file() and path.read_text(encoding="utf-8") == text:
        return
    atomic_write_text(path, text)


def _key(cfg: TrainConfig, train_csv: str, held_csv: str) -> str:
    values = {k: v for k, v in cfg.to_dict().items() if k not in NEUTRAL_KEYS and k != "manifest"}
    text = json.dumps(values, sort_keys=True, default=str) + train_csv + held_csv
    return hashlib.blake2b(text.encode(), digest_size=12).hexdigest()


def _fold_state(folder: Path, key: str) -> str:
    """done (oof with this key), scored-run (finished run), interrupted, or pending."""
    oof = folder / "oof.safetensors"
    if oof.is_file():
        from safetensors import safe_open

        with safe_open(str(oof), "pt") as f:
            if (f.metadata() or {}).get("key") == key:
                return "done"
    run = folder / "run"
    same = (folder / "key.txt").is_file() and (folder / "key.txt").read_text(encoding="utf-8") == key
    if same and (run / "metrics.json").is_file():
        return "finished"
    if same and (run / "checkpoint.safetensors").is_file():
        return "interrupted"
    return "pending"


def _score_fold(run: Path, held: Path, cfg: TrainConfig) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Probabilities of the held-out rows under the fold's run, and its thresholds."""
    from mumic.evaluate import model_probs
    from mumic.predictor import Predictor

    model = Predictor.from_run(run, device=cfg.device)
    m = read_manifest(held, allow_outside=True, allow_duplicates=True, allow_untagged=True)
    probs, specs = model_probs(model, m, labels=list(model.seen), use_cache=cfg.image_tower == "frozen", cache_dir=cfg.cache_dir,
                               batch_size=cfg.batch_size, num_workers=cfg.num_workers, engine=cfg.engine)
    names = [s.name for s in specs]
    th = model.thresholds or {"per_label": {}, "default": 0.5}
    t = np.array([th["per_label"].get(n, th["default"]) for n in names], np.float32)
    return names, np.asarray(probs, np.float32), t


def cross_fit(cfg: TrainConfig, out: str | os.PathLike[str], *, folds: int = 5, progress: bool = True) -> OOF:
    """Out-of-fold probabilities of every training row of cfg.manifest (see the module docstring)."""
    import torch
    from tqdm.auto import tqdm

    from mumic.io import load_tensors, save_tensors
    from mumic.train import fit, resume

    assert cfg.manifest is not None  # audit_config checked it
    m = read_manifest(cfg.manifest, allow_outside=cfg.allow_outside_paths, allow_duplicates=cfg.allow_duplicate_rows,
                      allow_untagged=cfg.allow_untagged)
    rows = audited_rows(m)
    if cfg.val_manifest is None and (m.splits is None or len(rows) == len(m)):
        raise ManifestError(f"{cfg.manifest}: no validation rows to stop and calibrate the folds on; mark some rows with "
                            f"split val, or set val_manifest")
    val_rows = np.flatnonzero([(s or "").strip().lower() in ("val", "valid", "validation", "dev") for s in (m.splits or [])])
    fold = fold_of(len(rows), folds, cfg.seed)
    root = Path(out) / "folds"
    names: list[str] | None = None
    probs: np.ndarray | None = None
    thresholds: np.ndarray | None = None
    bar = tqdm(range(folds), desc="audit folds", unit="fold", disable=not progress)
    for k in bar:
        folder = root / f"fold-{k}"
        train_rows = rows[fold != k]
        held_rows = rows[fold == k]
        train_csv = _csv(m, np.concatenate([train_rows, val_rows]), ["train"] * len(train_rows) + ["val"] * len(val_rows))
        held_csv = _csv(m, held_rows, None)
        fold_cfg = load_config(None, {**cfg.to_dict(), "manifest": str(folder / "manifest.csv"), "out": str(folder / "run"),
                                      "allow_outside_paths": True, "allow_duplicate_rows": True, "test_manifest": None})
        key = _key(fold_cfg, train_csv, held_csv)
        state = _fold_state(folder, key)
        bar.set_postfix(fold=k, state=state)
        if state != "done":
            _write_if_changed(folder / "manifest.csv", train_csv)
            _write_if_changed(folder / "heldout.csv", held_csv)
            if state == "interrupted":
                log.info("fold %d: resuming %s", k, folder / "run")
                resume(folder / "run", progress=False)
            elif state == "pending":
                log.info("fold %d: training on %d rows, scoring %d", k, len(train_rows), len(held_rows))
                atomic_write_text(folder / "key.txt", key)
                fit(fold_cfg, overwrite=True, progress=False)
            fold_names, p, t = _score_fold(folder / "run", folder / "heldout.csv", fold_cfg)
            save_tensors(folder / "oof.safetensors", {"rows": torch.from_numpy(held_rows.astype(np.int64)),
                                                      "probs": torch.from_numpy(p), "thresholds": torch.from_numpy(t)},
                         metadata={"key": key, "names": json.dumps(fold_names)})
        from safetensors import safe_open

        with safe_open(str(folder / "oof.safetensors"), "pt") as f:
            fold_names = json.loads((f.metadata() or {})["names"])
        saved = load_tensors(folder / "oof.safetensors")
        if names is None:
            names = fold_names
            probs = np.full((len(m), len(names)), np.nan, np.float32)
            thresholds = np.full((len(m), len(names)), np.nan, np.float32)
        elif fold_names != names:
            raise RunError(f"fold {k} trained the labels {fold_names[:3]}... but fold 0 trained {names[:3]}...; "
                           f"every fold must see every label (use fewer folds)")
        r = saved["rows"].numpy()
        probs[r] = saved["probs"].numpy()  # type: ignore[index]
        thresholds[r] = saved["thresholds"].numpy()[None, :]  # type: ignore[index]
    bar.close()
    assert names is not None and probs is not None and thresholds is not None
    return OOF(manifest=m, rows=rows, names=names, probs=probs[rows], thresholds=thresholds[rows], fold=fold,
               config=dataclasses.replace(cfg, out=None))

"""The data of a training run: its manifests by split and its label set."""

from __future__ import annotations

import dataclasses

from mumic.config import TrainConfig, absolute_backbone
from mumic.data.labels import LabelSpec, read_labels_file
from mumic.data.manifest import Manifest, read_manifest
from mumic.errors import ConfigError, ManifestError

VAL_SPLITS = ("val", "valid", "validation", "dev")


def split_manifests(cfg: TrainConfig) -> tuple[Manifest, Manifest, Manifest | None]:
    """train, val and (if any) test manifests: the manifest's own splits unless given separately."""
    if not cfg.manifest:
        raise ConfigError("no training manifest: give --manifest or 'manifest:' in the config")
    full = read_manifest(cfg.manifest, allow_outside=cfg.allow_outside_paths, allow_duplicates=cfg.allow_duplicate_rows)
    splits = set(full.splits) if full.splits is not None else set()
    train = full.split("train") if "train" in splits else full
    if cfg.val_manifest:
        val = read_manifest(cfg.val_manifest, allow_outside=cfg.allow_outside_paths, allow_duplicates=cfg.allow_duplicate_rows)
    else:
        name = next((s for s in VAL_SPLITS if s in splits), None)
        if name is None:
            raise ManifestError(
                f"{cfg.manifest}: no validation data — add a 'split' column with train/val rows, or give --val-manifest"
            )
        val = full.split(name)
    test: Manifest | None
    if cfg.test_manifest:
        test = read_manifest(cfg.test_manifest, allow_outside=cfg.allow_outside_paths, allow_duplicates=cfg.allow_duplicate_rows)
    else:
        test = full.split("test") if "test" in splits else None
    return train, val, test


def saved_config(cfg: TrainConfig, templates: list[str] | None = None) -> TrainConfig:
    """`cfg` as a run of it records it in config.yaml: with the templates the run uses (the
    labels file's, if it gives any) and a local `hf:` folder as an absolute path."""
    if templates is None:
        templates = list(cfg.templates)
        if cfg.labels_file:
            file_templates = read_labels_file(cfg.labels_file)[1]
            templates = list(file_templates) if file_templates else templates
    return dataclasses.replace(cfg, templates=list(templates), backbone=absolute_backbone(cfg.backbone))


def resolve_labels(cfg: TrainConfig, manifests: list[Manifest]) -> tuple[list[LabelSpec], list[str]]:
    """The run's labels (from the labels file, else the training manifest) and templates."""
    templates = list(cfg.templates)
    if cfg.labels_file:
        specs, file_templates = read_labels_file(cfg.labels_file)
        if file_templates:
            templates = list(file_templates)
    else:
        specs = [LabelSpec(name=n) for n in manifests[0].label_names()]
    names = {s.name for s in specs}
    for m in manifests:
        for i, labels in enumerate(m.labels):
            extra = [l for l in labels + (m.negatives[i] if m.negatives else []) if l not in names]
            if extra:
                where = f"{m.path}, line {m.lines[i]}" if m.lines else str(m.path)
                src = f"the labels file {cfg.labels_file}" if cfg.labels_file else "the training manifest"
                raise ManifestError(f"{where}: label '{extra[0]}' is not in {src}")
    return specs, templates

"""The data of a training run: its manifests by split and its label set."""

from __future__ import annotations

import dataclasses
import logging

from mumic.config import TrainConfig, absolute_backbone
from mumic.data.labels import LabelSpec, read_labels_file
from mumic.data.manifest import Manifest, read_manifest
from mumic.errors import ConfigError, ManifestError

log = logging.getLogger(__name__)

VAL_SPLITS = ("val", "valid", "validation", "dev")


def split_manifests(cfg: TrainConfig) -> tuple[Manifest, Manifest, Manifest | None]:
    """train, val and (if any) test manifests: the manifest's own splits unless given
    separately. Split names are matched without regard to case (Train, VALID, ...)."""
    if not cfg.manifest:
        raise ConfigError("no training manifest: give --manifest or 'manifest:' in the config")
    kw = {"allow_outside": cfg.allow_outside_paths, "allow_duplicates": cfg.allow_duplicate_rows, "allow_untagged": cfg.allow_untagged}
    full = read_manifest(cfg.manifest, **kw)
    found = full.split_names()

    def named(*names: str) -> str | None:
        return next((v for n in names for v in found if v.strip().lower() == n), None)

    train_name = named("train")
    train = full.split(train_name) if train_name is not None else full
    if cfg.val_manifest:
        val = read_manifest(cfg.val_manifest, **kw)
    else:
        val_name = named(*VAL_SPLITS)
        if val_name is None:
            seen = f"its split column holds {', '.join(map(repr, found))}" if found else "it has no split column"
            raise ManifestError(
                f"{cfg.manifest}: no validation data ({seen}); mark validation rows with split "
                f"{' / '.join(VAL_SPLITS)}, or give --val-manifest"
            )
        val = full.split(val_name)
    test: Manifest | None
    if cfg.test_manifest:
        test = read_manifest(cfg.test_manifest, **kw)
    else:
        test_name = named("test")
        test = full.split(test_name) if test_name is not None else None
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


def _names(m: Manifest) -> list[str]:
    """Label names of a manifest's labels and negatives, in order of first appearance."""
    out: dict[str, None] = {}
    for i, row in enumerate(m.labels):
        out.update(dict.fromkeys(row + (m.negatives[i] if m.negatives else [])))
    return list(out)


def resolve_labels(cfg: TrainConfig, manifests: list[Manifest]) -> tuple[list[LabelSpec], list[str]]:
    """The run's labels and templates.

    The labels file (if any) comes first, with its prompts, descriptions and `seen` marks; it
    may describe only some labels. Every other label of the training manifest is a seen label
    with the templates; a label that occurs only in the validation or test manifests is unseen
    (zero-shot: measured, never trained), with one warning naming them.
    """
    templates = list(cfg.templates)
    specs: list[LabelSpec] = []
    if cfg.labels_file:
        specs, file_templates = read_labels_file(cfg.labels_file)
        if file_templates:
            templates = list(file_templates)
    known = {s.name for s in specs}
    train_only = [n for n in sorted(_names(manifests[0])) if n not in known]
    specs += [LabelSpec(name=n) for n in train_only]
    known.update(train_only)
    if cfg.labels_file and train_only:
        log.info("%d label(s) of the training manifest are not in %s; they use the templates: %s",
                 len(train_only), cfg.labels_file, ", ".join(train_only[:5]) + (" ..." if len(train_only) > 5 else ""))
    held_out = sorted({n for m in manifests[1:] for n in _names(m)} - known)
    if held_out:
        log.warning("%d label(s) occur only in the validation/test data and are unseen (zero-shot) labels: %s",
                    len(held_out), ", ".join(held_out[:10]) + (" ..." if len(held_out) > 10 else ""))
        specs += [LabelSpec(name=n, seen=False) for n in held_out]
    return specs, templates

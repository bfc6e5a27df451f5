"""Typed run configuration: a YAML file plus command-line overrides.

One flat dataclass keeps the YAML, the command line (`mumic train --help` lists every
field) and the saved `config.yaml` of a run in one-to-one correspondence; GROUPS sorts
its settings into data / model / optimisation / runtime. Importing this module imports
neither torch nor transformers.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mumic.errors import ConfigError, cut, shown
from mumic.io import atomic_write_text
from mumic.losses import LOSS_NAMES, loss_spec
from mumic.readers import read_yaml

DEFAULT_TEMPLATES = ["a photo of {}.", "a picture of {}.", "an image showing {}."]


def _f(default: Any, help: str, choices: tuple | None = None, **kw: Any) -> Any:
    meta = {"help": help, "choices": choices}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta, **kw)


@dataclass
class TrainConfig:
    # data (GROUPS below says which group each setting belongs to)
    manifest: str | None = _f(None, "training manifest (CSV/TSV/JSONL/Parquet with image, labels[, split])")
    val_manifest: str | None = _f(None, "validation manifest; default: rows of --manifest whose split is val")
    test_manifest: str | None = _f(None, "test manifest evaluated at the end; default: split test if present")
    labels_file: str | None = _f(None, "labels file (YAML/JSON): label names, prompts, seen/unseen, templates")
    allow_outside_paths: bool = _f(False, "accept manifest image paths outside the manifest's folder (../x.png, /elsewhere/x.png); "
                                          "only for manifests you trust")
    allow_duplicate_rows: bool = _f(False, "keep manifest rows that repeat an earlier row exactly (default: an error naming both lines)")
    allow_untagged: bool = _f(True, "take an image with an empty label list as a negative for every label (--no-allow-untagged: "
                                    "refuse such rows)")
    templates: list[str] = _f(DEFAULT_TEMPLATES, "prompt templates with {} for the label; a label's prompts are averaged")
    unlisted: str = _f("negative", "labels not listed for an image are negatives or unknown (masked)", ("negative", "unknown"))
    out: str | None = _f(None, "run directory to write")
    # model
    backbone: str = _f("lite", "backbone: 'lite' (offline default) or 'hf:<hub name or local dir>'")
    image_size: int | None = _f(None, "input resolution in pixels (default: the backbone's)")
    image_head: str = _f("mlp", "lite image projection: mlp or linear", ("mlp", "linear"))
    image_tower: str = _f("frozen", "image tower: frozen (features cached), last (last stage tuned), full", ("frozen", "last", "full"))
    text_tower: str = _f("frozen", "text tower: frozen (class embeddings cached) or tuned", ("frozen", "tuned"))
    loss: str = _f("tempered_sigmoid", "training loss", LOSS_NAMES)
    tau: float | None = _f(None, "initial temperature (default: 1/the backbone's logit scale, else 0.07; 1.0 for tempered_sigmoid_fixed)")
    learn_tau: bool | None = _f(None, "learn the temperature (default: learned from the backbone's logit scale for CLIP/SigLIP; "
                                      "fixed for backbones without one, such as lite, where the EmojiTags study chose a fixed "
                                      "tau of 0.07 on validation; tempered_sigmoid_fixed never learns it)")
    bias: str = _f("shared", "logit bias b: one shared scalar, one per label, or none", ("shared", "per_label", "none"))
    bias_init: str = _f("prior", "initial b: from the label prior (mean p near the positive rate) or zero", ("prior", "zero"))
    # optimisation
    epochs: int = _f(30, "maximum number of epochs")
    max_steps: int | None = _f(None, "stop after this many optimizer steps (overrides epochs)")
    batch_size: int = _f(64, "images per optimizer step (before accumulation)")
    grad_accum: int = _f(1, "gradient accumulation steps")
    lr_tower: float = _f(1e-5, "learning rate of tuned tower weights")
    lr_head: float = _f(1e-3, "learning rate of projection heads / linear classifier")
    lr_temp: float = _f(1e-2, "learning rate of tau and b")
    weight_decay: float = _f(0.01, "AdamW weight decay (not applied to tau, b, norms and biases)")
    warmup_steps: int = _f(20, "linear warmup steps, then cosine decay to 0")
    eval_every: int = _f(50, "evaluate on validation every N optimizer steps (and at the end of each epoch)")
    patience: int = _f(6, "early stopping: evaluations without a better validation GAP@10")
    seed: int = _f(0, "random seed (data order, head initialisation, augmentation)")
    device: str = _f("auto", "cpu, cuda, cuda:N or auto")
    amp: bool = _f(True, "bf16 autocast on CUDA (ignored on CPU)")
    num_workers: int = _f(0, "DataLoader worker processes for image decoding")
    engine: str = _f("auto", "what runs the frozen image tower to fill the feature cache: onnxruntime (CPU only), torch, "
                     "or auto (onnxruntime on the CPU, torch on GPUs)", ("auto", "torch", "onnxruntime"))
    cache_dir: str | None = _f(None, "frozen-feature cache (default: $MUMIC_CACHE or ~/.cache/mumic)")
    majority_n: int = _f(32, "number of most frequent training labels in the majority-label mAP")
    on_bad_image: str = _f("fail", "an unreadable image stops training (fail) or is left out and listed in RUN/skipped.csv (skip)",
                           ("fail", "skip"))

    def resolved_learn_tau(self, backbone_logit_scale: float | None) -> bool:
        """Whether tau learns: as set, else only where the backbone brings a logit scale."""
        return bool(backbone_logit_scale) if self.learn_tau is None else self.learn_tau

    def resolved_tau(self, backbone_logit_scale: float | None) -> float:
        if self.tau is not None:
            return float(self.tau)
        spec = loss_spec(self.loss)
        if spec.tau is not None:
            return spec.tau
        if backbone_logit_scale:
            return 1.0 / min(float(backbone_logit_scale), 100.0)
        return 0.07

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def group(self, name: str) -> dict[str, Any]:
        """The settings of one group of GROUPS, e.g. ``cfg.group("optimisation")``."""
        if name not in GROUPS:
            raise ConfigError(f"unknown settings group {name!r}; choose one of {', '.join(GROUPS)}")
        return {k: getattr(self, k) for k in GROUPS[name]}


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}

# what each setting is about; every field is in exactly one group
GROUPS: dict[str, tuple[str, ...]] = {
    "data": ("manifest", "val_manifest", "test_manifest", "labels_file", "allow_outside_paths", "allow_duplicate_rows", "allow_untagged",
             "templates", "unlisted", "on_bad_image"),
    "model": ("backbone", "image_size", "image_head", "image_tower", "text_tower", "loss", "tau", "learn_tau", "bias",
              "bias_init"),
    "optimisation": ("epochs", "max_steps", "batch_size", "grad_accum", "lr_tower", "lr_head", "lr_temp", "weight_decay",
                     "warmup_steps", "eval_every", "patience", "seed"),
    "runtime": ("out", "device", "amp", "num_workers", "engine", "cache_dir", "majority_n"),
}


def default_cache_dir() -> Path:
    """Where frozen features and exported graphs are cached: $MUMIC_CACHE or ~/.cache/mumic."""
    return Path(os.environ.get("MUMIC_CACHE") or Path.home() / ".cache" / "mumic")


def absolute_backbone(spec: str) -> str:
    """`hf:DIR` with DIR made absolute when it is a local directory, so that a run made in
    one folder loads from any other; hub names and 'lite' are returned unchanged."""
    if not spec.startswith("hf:"):
        return spec
    local = os.path.expanduser(spec[3:].strip())
    return "hf:" + os.path.abspath(local) if os.path.isdir(local) else spec


def check_type(name: str, value: Any, where: str) -> Any:
    """Coerce a YAML/CLI value to the field's type or raise a ConfigError naming the key."""
    f = FIELDS[name]
    key = f"key '{name}' (--{name.replace('_', '-')})" if where == "command line" else f"key '{name}'"
    hint = typing.get_type_hints(TrainConfig)[name]
    args = typing.get_args(hint)
    optional = type(None) in args
    base = next((a for a in args if a is not type(None)), hint) if args else hint
    if typing.get_origin(hint) is list:
        base = hint
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{where}: {key} must not be empty")
    if typing.get_origin(base) is list:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{where}: {key} must be a list of strings, got {shown(value)}")
        return list(value)
    if base is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise ConfigError(f"{where}: {key} must be true or false, got {shown(value)}")
    if base is int:
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise ConfigError(f"{where}: {key} must be an integer, got {shown(value)}")
        try:
            value = int(value)
        except ValueError:
            raise ConfigError(f"{where}: {key} must be an integer, got {shown(value)}") from None
    elif base is float:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ConfigError(f"{where}: {key} must be a number, got {shown(value)}")
        try:
            value = float(value)
        except ValueError:
            raise ConfigError(f"{where}: {key} must be a number, got {shown(value)}") from None
        if not math.isfinite(value):
            raise ConfigError(f"{where}: {key} must be a finite number, got {value}")
    elif base is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{where}: {key} must be a string, got {shown(value)}")
        value = str(value)
    choices = f.metadata.get("choices")
    if choices and value not in choices:
        raise ConfigError(f"{where}: {key} is {shown(value)}; choose one of {', '.join(choices)}")
    if base in (int, float) and name not in ("seed", "tau") and value is not None and value < 0:
        raise ConfigError(f"{where}: {key} must not be negative, got {shown(value)}")
    if name in ("batch_size", "grad_accum", "eval_every", "epochs", "max_steps") and value == 0:
        raise ConfigError(f"{where}: {key} must be at least 1")
    if name == "backbone" and not (value == "lite" or (value.startswith("hf:") and len(value) > 3)):
        raise ConfigError(f"{where}: {key} is {shown(value)}; use 'lite' or 'hf:<hub name or local dir>'")
    if name == "backbone":
        value = absolute_backbone(value)
    if name == "tau" and value is not None and value <= 0:
        raise ConfigError(f"{where}: {key} must be > 0, got {shown(value)}")
    return value


def unknown_key(key: Any, where: str) -> ConfigError:
    """The error for a key that is not a setting, with the closest setting as a hint."""
    key = cut(key) if isinstance(key, str) else shown(key)
    close = difflib.get_close_matches(key, FIELDS, n=1)
    hint = f"did you mean '{close[0]}'?" if close else "remove it; `mumic train --help` lists the keys"
    return ConfigError(f"{where}: unknown key '{key}' ({hint})")


def _read_yaml(p: Path) -> tuple[Any, dict[Any, int]]:
    """The YAML document of a config file and the line of each top-level key (used by mumic.ablate)."""
    return read_yaml(p, error=ConfigError)


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """Read a YAML config (optional), apply overrides (None values are ignored), validate.

    Errors name the file and line (or "command line") and the key, e.g.
    ``c.yaml line 3: key 'epochs' must be an integer, got 'many'``.
    """
    values: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {p} does not exist")
        data, key_lines = read_yaml(p, error=ConfigError)
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise ConfigError(f"{p}: a config must be a mapping of key: value (one 'key: value' per line), got {type(data).__name__}")
        for k, v in data.items():
            where = f"{p} line {key_lines[str(k)]}" if str(k) in key_lines else str(p)  # keys are YAML scalars
            if not isinstance(k, str) or k not in FIELDS:
                raise unknown_key(k, where)
            values[k] = check_type(k, v, where)
    for k, v in (overrides or {}).items():
        if v is None:
            continue
        if k not in FIELDS:
            raise unknown_key(k, "command line")
        values[k] = check_type(k, v, "command line")
    return TrainConfig(**values)


def save_config(cfg: TrainConfig, path: Path) -> None:
    atomic_write_text(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))

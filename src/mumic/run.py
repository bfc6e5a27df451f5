"""The run directory: what training writes and everything that reads it back.

    config.yaml  labels.json  model.safetensors  thresholds.json  class_embeddings.safetensors

`read_run` validates every file of a run before anything is built from it (each problem
is one `RunError` naming the file and the key); a run is read through safetensors and
JSON/YAML parsers only, never unpickled. `class_embeddings.safetensors` holds the class
embeddings v of the run's labels, so that scoring the run's own labels needs no text
tower; it is bound to the weights by their digest and ignored when they differ.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mumic.config import load_config
from mumic.data.labels import MAX_LABELS, LabelSpec, duplicates, normalize_label
from mumic.errors import MumicError, RunError
from mumic.io import (
    LOCK_NAME,
    atomic_write_json,
    files_digest,
    folder_lock,
    load_tensors,
    replace_folder,
    save_tensors,
    tensors_digest,
    writing,
)
from mumic.readers import read_json

if TYPE_CHECKING:
    import torch

    from mumic.config import TrainConfig

log = logging.getLogger(__name__)

FORMAT = "mumic-run-1"
REQUIRED = ("config.yaml", "labels.json", "model.safetensors")
CLASS_EMBEDDINGS = "class_embeddings.safetensors"
RUN_FILES = (  # every file mumic writes into a run folder (the plots are report.py's)
    "config.yaml", "labels.json", "model.safetensors", CLASS_EMBEDDINGS, "thresholds.json", "metrics.json",
    "log.csv", "report.md", "checkpoint.safetensors", "best.safetensors", "skipped.csv",
    "curve.png", "precision_recall.png", "examples.png",
)
STAGED = "staged.json"
"""Beside a run staged by `train --overwrite` (see staging_folder): which folder it is."""
PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".pkl", ".pickle", ".ckpt", ".joblib", ".npz")
BACKBONE_KEYS = ("spec", "image_size", "image_head", "seed")


@dataclass
class RunFiles:
    """The validated content of a run directory (weights not yet read)."""

    path: Path
    config: TrainConfig
    labels: list[LabelSpec]
    templates: list[str]
    backbone: dict[str, Any]
    tau: float
    thresholds: dict[str, Any]


def _malformed(path: Path, what: str) -> RunError:
    return RunError(f"{path} is malformed: {what}; restore it from the original run")


def _str_list(path: Path, value: Any, what: str) -> list[str] | None:
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(x, str) for x in value):
        raise _malformed(path, f"{what} must be a list of strings, got {value!r:.80}")
    return list(value)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _read_labels(path: Path) -> tuple[list[LabelSpec], list[str], dict[str, Any], float]:
    meta = read_json(path)
    if not isinstance(meta, dict):
        raise _malformed(path, f"expected a JSON object, got {type(meta).__name__}")
    if meta.get("format", FORMAT) != FORMAT:
        raise RunError(f"{path}: run format {meta.get('format')!r} is not {FORMAT!r}; it was written by another version of mumic")
    for key in ("labels", "templates", "model"):
        if key not in meta:
            raise _malformed(path, f"the key '{key}' is missing")
    if not isinstance(meta["labels"], list) or not meta["labels"]:
        raise _malformed(path, "'labels' must be a non-empty list")
    if len(meta["labels"]) > MAX_LABELS:
        raise RunError(f"{path} holds {len(meta['labels'])} labels; a run may hold at most {MAX_LABELS} "
                       "(a labels.json this large was not written by mumic train): restore it from the original run")
    specs = []
    for k, entry in enumerate(meta["labels"]):
        if not isinstance(entry, dict):
            raise _malformed(path, f"label #{k + 1} must be an object, got {type(entry).__name__}")
        name = entry.get("name")
        if not isinstance(name, str) or not normalize_label(name):
            raise _malformed(path, f"label #{k + 1} has no name (a non-empty string)")
        name = normalize_label(name)
        if not isinstance(entry.get("seen"), bool):
            raise _malformed(path, f"label {name!r}: 'seen' must be true or false, got {entry.get('seen')!r:.80}")
        description = entry.get("description")
        if description is not None and not isinstance(description, str):
            raise _malformed(path, f"label {name!r}: 'description' must be a string")
        specs.append(LabelSpec(name=name, prompts=_str_list(path, entry.get("prompts"), f"label {name!r}: 'prompts'"),
                               description=description, seen=entry["seen"]))
    dup = duplicates(s.name for s in specs)
    if dup:
        raise _malformed(path, f"duplicate label names ({', '.join(dup[:3])})")
    templates = _str_list(path, meta["templates"], "'templates'") or []
    model = meta["model"]
    if not isinstance(model, dict) or not isinstance(model.get("backbone"), dict):
        raise _malformed(path, "'model' must be an object with a 'backbone' object")
    backbone = model["backbone"]
    odd = sorted(set(backbone) - set(BACKBONE_KEYS))
    if odd or not isinstance(backbone.get("spec"), str):
        raise _malformed(path, f"'model.backbone' must have a string 'spec' and only the keys {', '.join(BACKBONE_KEYS)}"
                         + (f" (found {', '.join(odd)})" if odd else ""))
    if backbone.get("image_size") is not None and not _is_int(backbone["image_size"]):
        raise _malformed(path, "'model.backbone.image_size' must be an integer")
    if not _is_int(backbone.get("seed", 0)):
        raise _malformed(path, "'model.backbone.seed' must be an integer")
    if backbone.get("image_head") is not None and not isinstance(backbone["image_head"], str):
        raise _malformed(path, "'model.backbone.image_head' must be a string")
    tau = model.get("tau", 0.07)
    if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not math.isfinite(tau):
        raise _malformed(path, f"'model.tau' must be a finite number, got {tau!r:.80}")
    if tau <= 0:
        raise _malformed(path, f"'model.tau' must be > 0, got {tau}")
    return specs, templates, dict(backbone), float(tau)


def load_thresholds(run: Path, names: Sequence[str] = ()) -> dict[str, Any]:
    """thresholds.json ({"per_label": {name: t}, "default": t}); a missing file decides at 0.5."""
    path = Path(run) / "thresholds.json"
    if not path.is_file():
        log.warning("%s is missing; deciding at probability 0.5", path)
        return {"per_label": {}, "default": 0.5}
    data = read_json(path)
    if not isinstance(data, dict) or "per_label" not in data or "default" not in data:
        raise RunError(f"{path} is malformed: expected keys per_label and default")
    per_label, default = data["per_label"], data["default"]
    if not isinstance(per_label, dict) or not all(
        isinstance(k, str) and not isinstance(v, bool) and isinstance(v, (int, float)) and 0.0 <= v <= 1.0
        for k, v in per_label.items()
    ):
        raise RunError(f"{path} is malformed: 'per_label' must map label names to numbers in [0, 1]")
    if isinstance(default, bool) or not isinstance(default, (int, float)) or not 0.0 <= default <= 1.0:
        raise RunError(f"{path} is malformed: 'default' must be a number in [0, 1], got {default!r:.80}")
    data["per_label"] = {normalize_label(k): v for k, v in per_label.items()}  # keyed like the run's labels
    return data


def read_run(run_dir: str | Path) -> RunFiles:
    """Validate a finished run directory and return its settings (see the module docstring)."""

    run = Path(run_dir)
    if not run.is_dir():
        raise RunError(f"run directory {run} does not exist")
    # anything that could be unpickled is refused outright rather than ignored
    pickles = sorted(p.name for p in run.iterdir() if p.name.lower().endswith(PICKLE_SUFFIXES))
    if pickles:
        raise RunError(f"{run} holds pickle files ({', '.join(pickles)}); runs load safetensors only — remove them")
    for name in REQUIRED:
        if not (run / name).is_file():
            raise RunError(f"{run} is not a finished run: {name} is missing")
    cfg = load_config(run / "config.yaml")
    specs, templates, backbone, tau = _read_labels(run / "labels.json")
    thresholds = load_thresholds(run, [s.name for s in specs])
    return RunFiles(path=run, config=cfg, labels=specs, templates=templates, backbone=backbone, tau=tau, thresholds=thresholds)


def labels_meta(model: Any, train_counts: dict[str, int], backbone_config: dict[str, Any], tau0: float) -> dict[str, Any]:
    """The content of a run's labels.json."""
    return {
        "format": FORMAT,
        "labels": [
            {"name": s.name, "prompts": s.prompts, "description": s.description, "seen": s.seen,
             "train_positives": int(train_counts.get(s.name, 0))}
            for s in model.labels
        ],
        "templates": model.templates,
        "model": {"backbone": backbone_config, "tau": tau0},
    }


def run_fingerprint(run_dir: str | Path) -> str:
    """sha256 over the files of a run that decide its image embeddings: model.safetensors
    (the trained heads and tuned tower weights) and labels.json (the backbone's settings)."""
    run = Path(run_dir)
    for name in ("model.safetensors", "labels.json"):
        if not (run / name).is_file():
            raise RunError(f"{run} is not a finished run: {name} is missing")
    return files_digest([(name, run / name) for name in ("model.safetensors", "labels.json")])


def _prompt_key(model: Any, labels: Sequence[LabelSpec]) -> str:
    return json.dumps([[s.name, s.texts(model.templates)] for s in labels])


def write_class_embeddings(run: Path, model: Any) -> None:
    """Store v of every run label beside the weights, bound to them by their digest."""
    import torch


    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            v = model.class_embeddings(model.labels).float().cpu()
    finally:
        model.train(was_training)
    save_tensors(Path(run) / CLASS_EMBEDDINGS, {"v": v}, metadata={
        "weights": tensors_digest(model.trained_state()), "labels": _prompt_key(model, model.labels)})


def read_class_embeddings(run: Path, model: Any, weights: dict[str, torch.Tensor]) -> torch.Tensor | None:
    """The stored v of the run's labels, or None when the file is absent or was written
    for other weights or other prompts (then the text tower computes v as before)."""
    from safetensors import safe_open


    path = Path(run) / CLASS_EMBEDDINGS
    if not path.is_file():
        return None
    v = load_tensors(path).get("v")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if v is None or meta.get("weights") != tensors_digest(weights) or meta.get("labels") != _prompt_key(model, model.labels):
        log.warning("%s does not belong to these weights or labels; computing the class embeddings", path)
        return None
    if tuple(v.shape) != (len(model.labels), model.backbone.embed_dim):
        return None
    return v


def staging_folder(run: str | Path) -> Path:
    """Where `train --overwrite` trains the new run of RUN while RUN keeps the old one:
    PARENT/.NAME.overwrite/NAME (the same name, so the report names the run; the same file
    system, so the two folders can be swapped)."""
    real = Path(run).resolve()
    return real.parent / f".{real.name}.overwrite" / real.name


def _begin_staging(run: Path) -> Path:
    stage = staging_folder(run)
    stage.mkdir(parents=True)
    st = stage.stat()  # the folder's identity: after the swap this name holds the old run, another folder
    atomic_write_json(stage.parent / STAGED, {"run": str(Path(run).resolve()), "device": st.st_dev, "inode": st.st_ino})
    return stage


def pending_overwrite(run: str | Path) -> Path | None:
    """The new run of an interrupted `train --overwrite` of RUN, or None. What else is left
    in its place (the old run of a swap that was not cleaned up) is removed. Called only by
    the holder of RUN/.lock."""
    stage = staging_folder(run)
    if not stage.parent.exists():
        return None
    try:
        meta, st = read_json(stage.parent / STAGED), stage.stat()
        if isinstance(meta, dict) and (meta.get("device"), meta.get("inode")) == (st.st_dev, st.st_ino):
            return stage
    except (RunError, OSError):
        pass
    log.info("removing %s, left by a finished --overwrite of %s", stage.parent, run)
    shutil.rmtree(stage.parent)
    return None


def prepare_run_dir(run: Path, *, overwrite: bool) -> Path:
    """The folder a new run of RUN trains in (the caller holds RUN/.lock). A folder without
    results is trained in directly. A run's results are replaced only with `overwrite`, and
    never before the new run is complete: it trains in staging_folder(RUN), which
    install_staged swaps in at the end, so RUN holds the whole old run or the whole new one."""
    present = [f for f in RUN_FILES if (run / f).exists()]
    # a run that failed before its first checkpoint holds only its config: nothing to lose
    if present and present != ["config.yaml"] and not overwrite:
        raise RunError(f"{run} already holds a run ({', '.join(present[:3])}); pass --overwrite to replace it or --resume to continue it")
    if staging_folder(run).parent.exists():
        log.warning("removing %s, left by an interrupted --overwrite of %s (a new one starts over)", staging_folder(run).parent, run)
        shutil.rmtree(staging_folder(run).parent)
    if present in ([], ["config.yaml"]):
        for f in present:
            (run / f).unlink()
        run.mkdir(parents=True, exist_ok=True)
        return run
    return _begin_staging(run)


def _carry(src: Path, dst: Path) -> None:
    """Hard-link (else copy) a file or folder of the user's into the new run."""
    def link(a: str, b: str) -> None:
        try:
            os.link(a, b, follow_symlinks=False)
        except OSError:
            shutil.copy2(a, b, follow_symlinks=False)

    if src.is_dir() and not src.is_symlink():
        shutil.copytree(src, dst, symlinks=True, copy_function=link)
    else:
        link(str(src), str(dst))


def install_staged(stage: Path, run: Path) -> None:
    """Put the finished new run `stage` in place of RUN in one step (io.replace_folder), the
    user's own files of RUN carried over (mumic's outputs of the old run are not: they
    describe other weights), then remove the old run. Called by the holder of both locks."""
    real = Path(run).resolve()
    for tmp in stage.glob(".*.tmp"):  # a temporary file of a killed writer of the staged run (only this job writes it)
        if tmp.is_file():
            tmp.unlink()
    with writing(real):
        for entry in real.iterdir() if real.is_dir() else ():
            own = entry.name in RUN_FILES or entry.name == LOCK_NAME or (entry.name.startswith("eval-") and entry.name.endswith(".json"))
            if not own and not (stage / entry.name).exists():
                _carry(entry, stage / entry.name)
        replace_folder(stage, real)
    shutil.rmtree(stage.parent, ignore_errors=True)
    log.info("%s now holds the new run (the previous one is removed)", run)


def _resume_folder(run: Path) -> Path:
    stage = pending_overwrite(run)
    if stage is None:
        return run
    if not (stage / "checkpoint.safetensors").is_file() and not (stage / "model.safetensors").is_file():
        raise RunError(f"the interrupted --overwrite of {run} stopped before its first checkpoint; start it again with --overwrite "
                       f"({run} still holds the previous run)")
    log.info("continuing the interrupted --overwrite of %s (in %s); %s keeps the previous run until the new one is complete",
             run, stage, run)
    return stage


@contextlib.contextmanager
def run_writer(run: Path, *, overwrite: bool = False, resume: bool = False) -> Iterator[Path]:
    """The one writer of a run folder for the whole job: rank 0 holds RUN/.lock
    (io.folder_lock) and, for a staged run, the staging folder's lock too, so that RUN/.lock
    stays held across the swap; under torchrun every rank learns whether it got them (all
    stop together if not) and which folder to write. Yields that folder: RUN, or its
    staging folder (prepare_run_dir; with `resume`, an interrupted overwrite's), which rank
    0 swaps in when the block succeeds. A failed or killed job leaves RUN as it was."""
    from mumic import distributed as dist  # torch: not at import (`mumic --help` reads this module)

    with contextlib.ExitStack() as held:
        refused: BaseException | None = None
        folder = None
        if dist.is_main():
            try:
                held.enter_context(folder_lock(run))
                folder = _resume_folder(run) if resume else prepare_run_dir(run, overwrite=overwrite)
                if folder != run:
                    held.enter_context(folder_lock(folder))
            except MumicError as e:
                refused = e
        message, folder = dist.broadcast((str(refused) if refused else None, str(folder) if folder else None))
        if refused is not None:
            raise refused
        if message:
            raise RunError(message)
        try:
            yield Path(folder)
        except BaseException:
            if dist.is_main() and Path(folder) != run:
                log.warning("%s still holds the previous run; `mumic train --resume %s` continues the new one from its last "
                            "checkpoint, `--overwrite` starts it again", run, run)
            raise
        if dist.is_main() and Path(folder) != run:
            install_staged(Path(folder), run)


def save_checkpoint(path: Path, model: Any, opt: Any, sched: Any, state: dict[str, Any]) -> None:
    """checkpoint.safetensors: the trained weights, the optimizer's state, the scheduler,
    the torch RNG and the trainer's `state` (JSON), so a resumed run continues exactly."""
    import torch

    from mumic.io import save_tensors

    tensors = {"model." + k: v for k, v in model.trained_state().items()}
    osd = opt.state_dict()
    for idx, st in osd["state"].items():
        for name, v in st.items():
            tensors[f"opt.{idx}.{name}"] = v if torch.is_tensor(v) else torch.tensor(v)
    tensors["rng.torch"] = torch.get_rng_state()
    sd = {k: v for k, v in sched.state_dict().items() if k != "lr_lambdas"}
    meta = {"param_groups": json.dumps(osd["param_groups"]), "scheduler": json.dumps(sd), "state": json.dumps(state)}
    save_tensors(path, tensors, metadata=meta)


def load_checkpoint(path: Path, model: Any, opt: Any, sched: Any) -> dict[str, Any]:
    """Restore what save_checkpoint wrote into `model`, `opt`, `sched` and the torch RNG;
    returns the trainer's state."""
    import torch
    from safetensors import safe_open

    from mumic.io import load_tensors

    tensors = load_tensors(path)
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    model.load_trained_state({k[6:]: v for k, v in tensors.items() if k.startswith("model.")}, source=str(path))
    state: dict[int, dict[str, torch.Tensor]] = {}
    for k, v in tensors.items():
        if k.startswith("opt."):
            _, idx, name = k.split(".", 2)
            state.setdefault(int(idx), {})[name] = v
    opt.load_state_dict({"state": state, "param_groups": json.loads(meta["param_groups"])})
    sd = json.loads(meta["scheduler"])
    sd["lr_lambdas"] = [None] * len(opt.param_groups)
    sched.load_state_dict(sd)
    torch.set_rng_state(tensors["rng.torch"])
    return dict(json.loads(meta["state"]))

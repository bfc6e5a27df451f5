"""The training loop: AdamW with per-group learning rates, warmup + cosine, gradient
accumulation, validation GAP@10 for early stopping and best-checkpoint selection,
atomic safetensors checkpoints and exact resume.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from mumic import distributed as dist
from mumic import heads
from mumic.config import TrainConfig, save_config
from mumic.data.manifest import LabelSpec, Manifest, read_labels_file, read_manifest
from mumic.errors import ConfigError, ManifestError, RunError
from mumic.io import atomic_write_json, atomic_write_text, load_tensors, save_tensors
from mumic.losses import loss_spec
from mumic.model import MuMIC, labels_meta, resolve_device

log = logging.getLogger(__name__)

RUN_FILES = (
    "config.yaml", "labels.json", "model.safetensors", "thresholds.json", "metrics.json",
    "log.csv", "report.md", "checkpoint.safetensors", "best.safetensors",
)
VAL_SPLITS = ("val", "valid", "validation", "dev")


@dataclass
class Data:
    """One split: its manifest, targets over the seen labels, and cached features if frozen."""

    manifest: Manifest
    y: torch.Tensor
    known: torch.Tensor
    features: torch.Tensor | None = None

    @property
    def paths(self) -> list[Path]:
        return self.manifest.images


def _split_manifests(cfg: TrainConfig) -> tuple[Manifest, Manifest, Manifest | None]:
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
    if cfg.test_manifest:
        test = read_manifest(cfg.test_manifest, allow_outside=cfg.allow_outside_paths, allow_duplicates=cfg.allow_duplicate_rows)
    else:
        test = full.split("test") if "test" in splits else None
    return train, val, test


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


def _targets(m: Manifest, names: list[str], unlisted: str) -> tuple[torch.Tensor, torch.Tensor]:
    y, known = m.targets(names, unlisted=unlisted, ignore_unknown=True)
    return torch.from_numpy(np.asarray(y, np.float32)), torch.from_numpy(np.asarray(known, bool))


def _init_bias(model: MuMIC, data: Data, cfg: TrainConfig, device: torch.device) -> None:
    """Start b where the mean predicted probability matches the training label prior."""
    y, k = data.y, data.known
    prior = ((y * k).sum(0) / k.sum(0).clamp_min(1)).clamp(1e-4, 1 - 1e-4)
    if model.classifier is not None:
        with torch.no_grad():
            model.classifier.bias.copy_(heads.linear_prior_bias(prior))
        return
    if cfg.bias == "none" or cfg.bias_init == "zero" or not loss_spec(cfg.loss).prior_bias:
        return
    n = min(len(y), 512)
    with torch.no_grad():
        if data.features is not None:
            u = model.image_embeddings(features=data.features[:n].to(device))
        else:
            from mumic.data.dataset import ImageDataset

            ds = ImageDataset(data.paths[:n], model.backbone.image_size)
            u = model.image_embeddings(torch.stack([ds[i][1] for i in range(n)]).to(device))
        s = heads.tempered_logits(u, model.class_embeddings(model.seen), model.inv_tau, 0.0).float().cpu()
        model.bias.copy_(heads.prior_bias(s, prior, per_label=model.bias.numel() > 1).reshape(model.bias.shape))


def _optimizer(model: MuMIC, cfg: TrainConfig) -> torch.optim.Optimizer:
    lrs = {"image_tower": cfg.lr_tower, "text_tower": cfg.lr_tower, "heads": cfg.lr_head, "temperature": cfg.lr_temp}
    groups = []
    for name, params in model.param_groups().items():
        params = [p for p in params if p.requires_grad]
        decay = [p for p in params if p.ndim >= 2 and name != "temperature"]
        no_decay = [p for p in params if not (p.ndim >= 2 and name != "temperature")]
        if decay:
            groups.append({"params": decay, "lr": lrs[name], "weight_decay": cfg.weight_decay, "name": name})
        if no_decay:
            groups.append({"params": no_decay, "lr": lrs[name], "weight_decay": 0.0, "name": name + "_no_decay"})
    if not groups:
        raise ConfigError("nothing to train: every parameter is frozen")
    return torch.optim.AdamW(groups)


def _schedule(warmup: int, total: int) -> Callable[[int], float]:
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / max(1, warmup)
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return f


def _rank_slice(idx: torch.Tensor, rank: int, world: int) -> tuple[torch.Tensor, int]:
    """This rank's share of a micro-batch and its weight (images). A rank left without
    an image (a last batch smaller than the world) runs one image at weight 0, so that
    every rank takes part in the gradient all-reduce."""
    mine = idx[rank::world]
    if len(mine) == 0:
        return idx[:1], 0
    return mine, len(mine)


def _epoch_batches(n: int, batch_size: int, seed: int, epoch: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    perm = torch.randperm(n, generator=g)
    return list(perm.split(batch_size))


@torch.no_grad()
def score_data(model: MuMIC, data: Data, cfg: TrainConfig, device: torch.device, labels: list[LabelSpec] | None = None,
               gather: bool = True) -> np.ndarray:
    """Probabilities [N, C] for a split (seen labels by default). Under torchrun with
    `gather`, every rank scores a share and all ranks get the whole result."""
    from mumic.evaluate import manifest_embeddings

    model.eval()
    r, w = (dist.rank(), dist.world()) if gather else (0, 1)
    rows = list(range(r, len(data.paths), w))  # under torchrun each rank scores every w-th image
    feats = data.features[rows] if data.features is not None else None
    u = manifest_embeddings(model, [data.paths[i] for i in rows], features=feats, batch_size=cfg.batch_size, num_workers=cfg.num_workers, device=device)
    specs = model.seen if labels is None else labels
    out = [torch.sigmoid(model.logits(u[s : s + 4096].to(device), specs).float()).cpu() for s in range(0, len(u), 4096)]
    mine = torch.cat(out).numpy() if out else np.zeros((0, len(specs)), np.float32)
    if w == 1:
        return mine
    probs = np.zeros((len(data.paths), len(specs)), np.float32)
    for k, part in enumerate(dist.all_gather(mine)):
        probs[k::w] = part
    return probs


def _save_checkpoint(path: Path, model: MuMIC, opt: torch.optim.Optimizer, sched: Any, state: dict[str, Any]) -> None:
    tensors = {"model." + k: v for k, v in model.trained_state().items()}
    osd = opt.state_dict()
    for idx, st in osd["state"].items():
        for name, v in st.items():
            tensors[f"opt.{idx}.{name}"] = v if torch.is_tensor(v) else torch.tensor(v)
    tensors["rng.torch"] = torch.get_rng_state()
    sd = {k: v for k, v in sched.state_dict().items() if k != "lr_lambdas"}
    meta = {"param_groups": json.dumps(osd["param_groups"]), "scheduler": json.dumps(sd), "state": json.dumps(state)}
    save_tensors(path, tensors, metadata=meta)


def _load_checkpoint(path: Path, model: MuMIC, opt: torch.optim.Optimizer, sched: Any) -> dict[str, Any]:
    from safetensors import safe_open

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
    return json.loads(meta["state"])


def _write_log(path: Path, rows: list[dict[str, Any]]) -> None:
    if not rows:
        return
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=keys)
    w.writeheader()
    w.writerows(rows)
    atomic_write_text(path, buf.getvalue())


def prepare_run_dir(run: Path, *, overwrite: bool, resume: bool) -> None:
    """Refuse to overwrite a run's results unless asked; clear only mumic's own files."""
    present = [f for f in RUN_FILES if (run / f).exists()]
    if resume:
        return
    # a run that failed before its first checkpoint holds only its config: nothing to lose
    if present and present != ["config.yaml"] and not overwrite:
        raise RunError(f"{run} already holds a run ({', '.join(present[:3])}); pass --overwrite to replace it or --resume to continue it")
    for f in present:
        (run / f).unlink()
    run.mkdir(parents=True, exist_ok=True)


def fit(
    cfg: TrainConfig | str | Path | None = None,
    *,
    overwrite: bool = False,
    progress: bool = True,
    on_step: Callable[[int], None] | None = None,
    **overrides: Any,
) -> Path:
    """Train a MuMIC run; returns the run directory.

    `cfg` is a TrainConfig, a YAML config path or None; keyword arguments override its
    keys, as on the command line: `fit(manifest="photos.csv", out="runs/a", epochs=5)`.
    """
    from mumic.config import load_config

    if not isinstance(cfg, TrainConfig):
        cfg = load_config(cfg, overrides)
    elif overrides:
        cfg = load_config(None, {**cfg.to_dict(), **overrides})
    if not cfg.out:
        raise ConfigError("no run directory: give --out or 'out:' in the config")
    run = Path(cfg.out)
    inputs = _load_inputs(cfg)  # bad data fails here, before anything is written
    dist.init()
    if dist.is_main():
        prepare_run_dir(run, overwrite=overwrite, resume=False)
        save_config(cfg, run / "config.yaml")
    dist.barrier()
    return _train(cfg, run, inputs, resume=False, progress=progress, on_step=on_step)


def resume(run_dir: str | Path, *, progress: bool = True, on_step: Callable[[int], None] | None = None) -> Path:
    """Continue an interrupted run from its last checkpoint, with its saved config."""
    from mumic.config import load_config

    run = Path(run_dir)
    if not (run / "config.yaml").is_file():
        raise RunError(f"{run} is not a run directory (config.yaml is missing)")
    if (run / "model.safetensors").is_file() and not (run / "checkpoint.safetensors").is_file():
        raise RunError(f"{run} has already finished; nothing to resume")
    cfg = load_config(run / "config.yaml")
    dist.init()
    return _train(cfg, run, _load_inputs(cfg), resume=True, progress=progress, on_step=on_step)


def _load_inputs(cfg: TrainConfig) -> tuple:
    """Manifests of each split, the run's labels and templates, all checked."""
    train_m, val_m, test_m = _split_manifests(cfg)
    specs, templates = resolve_labels(cfg, [m for m in (train_m, val_m, test_m) if m is not None])
    if cfg.on_bad_image == "fail":
        for m in (train_m, val_m, test_m):
            if m is not None:
                m.check_images_exist()
    if not any(s.seen for s in specs):
        raise ManifestError("every label is marked unseen; at least one label must be trained")
    return train_m, val_m, test_m, specs, templates


def _train(cfg: TrainConfig, run: Path, inputs: tuple, *, resume: bool, progress: bool, on_step: Callable[[int], None] | None) -> Path:
    from mumic.backbones import load_backbone
    from mumic.evaluate import evaluate_probs
    from mumic.features import cached_features
    from mumic.metrics import fit_thresholds, gap

    t_start = time.time()
    torch.manual_seed(cfg.seed)
    device = resolve_device(dist.device_name(cfg.device))
    main = dist.is_main()
    progress = progress and main
    train_m, val_m, test_m, specs, templates = inputs
    seen_names = [s.name for s in specs if s.seen]

    backbone = load_backbone(cfg.backbone, image_size=cfg.image_size, image_head=cfg.image_head, device=str(device), seed=cfg.seed)
    backbone.set_trainable(image_tower=cfg.image_tower, text_tower=cfg.text_tower)
    tau0 = cfg.resolved_tau(backbone.logit_scale)
    model = MuMIC(backbone, specs, templates, loss=cfg.loss, tau=tau0, learn_tau=cfg.learn_tau, bias=cfg.bias).to(device)
    loss_fn = loss_spec(cfg.loss).fn

    skip = cfg.on_bad_image == "skip"
    skipped: dict[str, list[tuple[int, str]]] = {}
    feats: dict[str, torch.Tensor] = {}
    for name, m in (("train", train_m), ("val", val_m)):
        failures: list[tuple[int, str]] | None = [] if skip else None
        if cfg.image_tower == "frozen":
            # rank 0 fills the cache first; the other ranks then read it (and compute only
            # what they cannot find there, e.g. on a node without a shared cache folder)
            for turn in ("first", "rest"):
                if (turn == "first") == main:
                    feats[name] = cached_features(backbone, m.images, cache_dir=cfg.cache_dir, batch_size=max(cfg.batch_size, 32),
                                                  num_workers=cfg.num_workers, device=device, amp=cfg.amp, progress=progress,
                                                  failures=failures, engine=cfg.engine)
                dist.barrier()
        elif skip:
            from mumic.data.dataset import find_bad_images

            failures = find_bad_images(m.images, backbone.image_size, num_workers=cfg.num_workers)
        if failures:
            skipped[name] = [(m.lines[i] if m.lines else i, r) for i, r in failures]
            keep = np.setdiff1d(np.arange(len(m)), [i for i, _ in failures])
            if name == "train":
                train_m = m.select(keep)
            else:
                val_m = m.select(keep)
            if name in feats:
                feats[name] = feats[name][torch.from_numpy(keep)]
            log.warning("skipped %d unreadable %s images (listed in %s)", len(failures), name, run / "skipped.csv")
    train = Data(train_m, *_targets(train_m, seen_names, cfg.unlisted), features=feats.get("train"))
    val = Data(val_m, *_targets(val_m, seen_names, "negative"), features=feats.get("val"))
    if not bool(val.y.any()):
        raise ManifestError("the validation data has no positive for any trained label; early stopping needs some")
    train_counts = dict(zip(seen_names, (train.y * train.known).sum(0).long().tolist()))
    for name, c in train_counts.items():
        if c == 0:
            log.warning("label '%s' has no positive in the training data", name)
    _init_bias(model, train, cfg, device)

    n = len(train.manifest)
    micro = cfg.batch_size
    steps_per_epoch = math.ceil(math.ceil(n / micro) / cfg.grad_accum)
    total = cfg.max_steps or cfg.epochs * steps_per_epoch
    opt = _optimizer(model, cfg)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _schedule(min(cfg.warmup_steps, total // 2), total))
    rank, world = dist.rank(), dist.world()
    net: torch.nn.Module = model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        # every rank starts from rank 0's weights; the linear baseline leaves the text head unused
        net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                      find_unused_parameters=loss_spec(cfg.loss).head == "linear")

    state: dict[str, Any] = {"step": 0, "best": -1.0, "best_step": 0, "bad_evals": 0, "log": [], "stopped": False}
    if resume:
        ckpt = run / "checkpoint.safetensors"
        if not ckpt.is_file():
            raise RunError(f"{run} has no checkpoint yet to resume from; start it again with --overwrite")
        state = _load_checkpoint(ckpt, model, opt, sched)
        log.info("resuming %s at step %d", run, state["step"])

    use_amp = cfg.amp and device.type == "cuda"
    best_path = run / "best.safetensors"

    def evaluate_now(step: int, train_loss: float) -> None:
        probs = score_data(model, val, cfg, device)
        g10 = gap(val.y.numpy(), probs, k=10)
        row = {"step": step, "epoch": round(step / steps_per_epoch, 3), "train_loss": round(train_loss, 6), "val_gap10": round(g10, 6),
               "tau": round(model.tau, 6), "bias_mean": round(float(model.bias.detach().mean()), 6), "lr_head": opt.param_groups[0]["lr"],
               "elapsed_s": round(time.time() - t_start, 2)}
        state["log"].append(row)
        if g10 > state["best"] + 1e-9:
            state.update(best=g10, best_step=step, bad_evals=0)
            if main:
                save_tensors(best_path, model.trained_state())
        else:
            state["bad_evals"] += 1
        state["step"] = step
        if state["bad_evals"] >= cfg.patience:
            state["stopped"] = True
        if main:  # one writer; every rank holds the same state (validation scores are gathered)
            _save_checkpoint(run / "checkpoint.safetensors", model, opt, sched, state)
            _write_log(run / "log.csv", state["log"])
        dist.barrier()
        model.train()

    model.train()
    step = state["step"]
    bar = tqdm(total=total, initial=step, desc="train", unit="step", disable=not progress)
    running: list[float] = []
    while step < total and not state["stopped"]:
        epoch, in_epoch = divmod(step, steps_per_epoch)
        batches = _epoch_batches(n, micro, cfg.seed, epoch)
        groups = [batches[i : i + cfg.grad_accum] for i in range(0, len(batches), cfg.grad_accum)]
        loader = None
        if train.features is None:
            from torch.utils.data import DataLoader

            from mumic.data.dataset import ImageDataset

            ds = ImageDataset(train.paths, model.backbone.image_size, train=True, seed=cfg.seed, epoch=epoch)
            flat = [_rank_slice(b, rank, world)[0].tolist() for g in groups[in_epoch:] for b in g]
            loader = iter(DataLoader(ds, batch_sampler=flat, num_workers=cfg.num_workers, pin_memory=device.type == "cuda"))
        for group in groups[in_epoch:]:
            opt.zero_grad(set_to_none=True)
            weight_total = sum(len(b) for b in group)  # images in the whole (global) step
            loss_sum = 0.0
            for j, full_idx in enumerate(group):
                idx, weight = _rank_slice(full_idx, rank, world)
                # DDP averages gradients over ranks, so each rank's share is scaled by world
                scale = weight / weight_total * world
                sync = j == len(group) - 1 or world == 1
                with (net.no_sync() if not sync else contextlib.nullcontext()):  # type: ignore[operator]
                    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
                        if train.features is not None:
                            z = net(features=train.features[idx].to(device, non_blocking=True))
                        else:
                            _, px = next(loader)  # type: ignore[arg-type]
                            z = net(pixels=px)
                        loss = loss_fn(z.float(), train.y[idx].to(device), train.known[idx].to(device))
                    (loss * scale).backward()
                loss_sum += float(loss.detach()) * weight / weight_total * world
            if not math.isfinite(loss_sum):
                raise RunError(
                    f"training loss became {loss_sum} at step {step + 1}; lower the learning rates. "
                    f"The best weights so far are in {best_path}"
                )
            opt.step()
            sched.step()
            step += 1
            running.append(loss_sum)
            bar.update(1)
            bar.set_postfix(loss=f"{loss_sum:.4f}", tau=f"{model.tau:.3f}", best=f"{max(state['best'], 0):.3f}")
            if step % cfg.eval_every == 0 or step == total or step % steps_per_epoch == 0:
                evaluate_now(step, float(np.mean(running)) if running else float("nan"))
                running = []
            if on_step is not None:
                on_step(step)
            if state["stopped"] or step >= total:
                break
    bar.close()
    dist.barrier()
    if not main:  # rank 0 writes the run's results
        return run

    # final: best weights, thresholds, metrics, report
    model.load_trained_state(load_tensors(best_path), source=str(best_path))
    val_probs = score_data(model, val, cfg, device, gather=False)
    y_val = val.y.numpy()
    th = fit_thresholds(y_val, val_probs)
    default_th = float(fit_thresholds(y_val.reshape(-1, 1), val_probs.reshape(-1, 1))[0])
    thresholds = {"method": "max F1 on validation; labels with few positives use the global threshold",
                  "default": default_th, "per_label": {name: float(t) for name, t in zip(seen_names, th)}}
    atomic_write_json(run / "thresholds.json", thresholds)
    model.thresholds = thresholds
    meta = labels_meta(model, train_counts, backbone.config(), tau0)
    atomic_write_json(run / "labels.json", meta)
    metrics: dict[str, Any] = {
        "best_step": state["best_step"], "steps": step, "train_images": n, "tau": model.tau,
        "train_time_s": round(time.time() - t_start, 2),
        "val": evaluate_probs(model, val_m, val_probs, seen_only=True, train_counts=train_counts, majority_n=cfg.majority_n),
    }
    if test_m is not None:
        from mumic.evaluate import evaluate_model

        test_failures: list[tuple[int, str]] | None = [] if skip else None
        metrics["test"] = evaluate_model(model, test_m, train_counts=train_counts, majority_n=cfg.majority_n,
                                         batch_size=cfg.batch_size, num_workers=cfg.num_workers,
                                         use_cache=cfg.image_tower == "frozen", cache_dir=cfg.cache_dir, failures=test_failures,
                                         engine=cfg.engine)
        if test_failures:
            skipped["test"] = [(test_m.lines[i] if test_m.lines else i, r) for i, r in test_failures]
    if skipped:
        rows = [{"split": k, "line": line, "reason": reason} for k, v in skipped.items() for line, reason in v]
        _write_log(run / "skipped.csv", rows)
    metrics["skipped_images"] = {k: len(v) for k, v in skipped.items()}
    atomic_write_json(run / "metrics.json", metrics)
    save_tensors(run / "model.safetensors", model.trained_state(), metadata={"format": "mumic-run-1"})
    from mumic.evaluate import write_report

    write_report(run, metrics, state["log"])
    for f in ("checkpoint.safetensors", "best.safetensors"):
        (run / f).unlink(missing_ok=True)
    log.info("run %s finished: val GAP@10 %.4f at step %d", run, state["best"], state["best_step"])
    return run

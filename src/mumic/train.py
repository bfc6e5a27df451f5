"""The training loop: AdamW with per-group learning rates, warmup + cosine, gradient
accumulation, validation GAP@10 for early stopping and best-checkpoint selection,
atomic safetensors checkpoints and exact resume.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from mumic import distributed as dist
from mumic import heads
from mumic.backbones import load_backbone
from mumic.card import card_metrics, write_run_card
from mumic.config import TrainConfig, load_config, save_config
from mumic.data.dataset import ImageDataset, find_bad_images
from mumic.data.labels import LabelSpec
from mumic.data.manifest import Manifest
from mumic.data.training import resolve_labels, saved_config, split_manifests
from mumic.errors import ConfigError, ManifestError, RunError
from mumic.evaluate import evaluate_model_scores, evaluate_probs, manifest_embeddings
from mumic.features import cached_features
from mumic.io import atomic_write_csv, atomic_write_json, load_tensors, save_tensors
from mumic.losses import loss_spec
from mumic.metrics import fit_thresholds, gap, global_fallback
from mumic.model import MuMIC, resolve_device
from mumic.report import write_run_report
from mumic.run import labels_meta, load_checkpoint, run_writer, save_checkpoint, staging_folder, write_class_embeddings

log = logging.getLogger(__name__)



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
    model.eval()
    r, w = (dist.rank(), dist.world()) if gather else (0, 1)
    rows = list(range(r, len(data.paths), w))  # under torchrun each rank scores every w-th image
    feats = data.features[rows] if data.features is not None else None
    u = manifest_embeddings(model, [data.paths[i] for i in rows], features=feats, batch_size=cfg.batch_size,
                            num_workers=cfg.num_workers, device=device)
    specs = model.seen if labels is None else labels
    out = [torch.sigmoid(model.logits(u[s : s + 4096].to(device), specs).float()).cpu() for s in range(0, len(u), 4096)]
    mine = torch.cat(out).numpy() if out else np.zeros((0, len(specs)), np.float32)
    if w == 1:
        return mine
    probs = np.zeros((len(data.paths), len(specs)), np.float32)
    for k, part in enumerate(dist.all_gather(mine)):
        probs[k::w] = part
    return probs


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
    if not isinstance(cfg, TrainConfig):
        cfg = load_config(cfg, overrides)
    elif overrides:
        cfg = load_config(None, {**cfg.to_dict(), **overrides})
    if not cfg.out:
        raise ConfigError("no run directory: give --out or 'out:' in the config")
    run = Path(cfg.out)
    inputs = _load_inputs(cfg)  # bad data fails here, before anything is written
    cfg = saved_config(cfg, inputs.templates)  # what the run uses, as config.yaml records it
    dist.init()
    with run_writer(run, overwrite=overwrite) as folder:  # an old run is replaced only once the new one is complete
        if dist.is_main():
            save_config(cfg, folder / "config.yaml")
        dist.barrier()
        Trainer(cfg, folder, inputs, progress=progress, on_step=on_step).run(resume=False)
    return run


def resume(run_dir: str | Path, *, progress: bool = True, on_step: Callable[[int], None] | None = None) -> Path:
    """Continue an interrupted run from its last checkpoint, with its saved config; for an
    interrupted `--overwrite`, the new run (RUN keeps the old one until it is complete)."""
    run = Path(run_dir)
    if not (run / "config.yaml").is_file() and not staging_folder(run).parent.is_dir():
        raise RunError(f"{run} is not a run directory (config.yaml is missing)")
    dist.init()
    with run_writer(run, resume=True) as folder:  # checked under the lock: a writer that just finished is seen finished
        if (folder / "model.safetensors").is_file() and not (folder / "checkpoint.safetensors").is_file():
            if folder == run:
                raise RunError(f"{run} has already finished; nothing to resume")
            return run  # the new run was complete but not yet in place: run_writer swaps it in
        cfg = load_config(folder / "config.yaml")
        Trainer(cfg, folder, _load_inputs(cfg), progress=progress, on_step=on_step).run(resume=True)
    return run


class Inputs(NamedTuple):
    """What a run reads before anything is written: each split's manifest, labels, templates."""

    train: Manifest
    val: Manifest
    test: Manifest | None
    labels: list[LabelSpec]
    templates: list[str]


def _load_inputs(cfg: TrainConfig) -> Inputs:
    """Manifests of each split, the run's labels and templates, all checked."""
    train_m, val_m, test_m = split_manifests(cfg)
    specs, templates = resolve_labels(cfg, [m for m in (train_m, val_m, test_m) if m is not None])
    if cfg.on_bad_image == "fail":
        for m in (train_m, val_m, test_m):
            if m is not None:
                m.check_images_exist()
    if not any(s.seen for s in specs):
        raise ManifestError("every label is marked unseen; at least one label must be trained")
    return Inputs(train_m, val_m, test_m, specs, list(templates))


@dataclass
class TrainState:
    """What a checkpoint records besides the weights: where training is and how it went."""

    step: int = 0
    best: float = -1.0  # best validation GAP@10 so far
    best_step: int = 0
    bad_evals: int = 0  # evaluations since the best one
    log: list[dict[str, Any]] = field(default_factory=list)  # the rows of log.csv
    stopped: bool = False  # early stopping fired


def _group_lr(opt: torch.optim.Optimizer, name: str) -> float | None:
    """The current learning rate of a named parameter group (its decayed part or not)."""
    return next((g["lr"] for g in opt.param_groups if g["name"] in (name, name + "_no_decay")), None)


class Trainer:
    """One training run: `prepare` builds the model, data, optimizer and (on resume) the
    checkpointed state; `loop` runs the optimizer steps with periodic evaluation and
    checkpoints; `finalize` writes the run's results from the best weights."""

    def __init__(self, cfg: TrainConfig, run: Path, inputs: Inputs, *, progress: bool = True,
                 on_step: Callable[[int], None] | None = None) -> None:
        self.cfg, self.run_dir, self.inputs, self.on_step = cfg, run, inputs, on_step
        self.main = dist.is_main()
        self.progress = progress and self.main
        self.rank, self.world = dist.rank(), dist.world()
        self.best_path = run / "best.safetensors"
        self.state = TrainState()

    def run(self, *, resume: bool) -> Path:
        self.prepare(resume=resume)
        self.loop()
        dist.barrier()
        if self.main:  # rank 0 writes the run's results
            self.finalize()
        return self.run_dir

    # -- prepare ------------------------------------------------------------------------
    def prepare(self, *, resume: bool) -> None:
        cfg = self.cfg
        self.t_start = time.time()
        torch.manual_seed(cfg.seed)
        self.device = device = resolve_device(dist.device_name(cfg.device))
        train_m, val_m, self.test_m, specs, templates = self.inputs
        self.seen_names = [s.name for s in specs if s.seen]
        self.loss = loss_spec(cfg.loss)

        self.backbone = load_backbone(cfg.backbone, image_size=cfg.image_size, image_head=cfg.image_head, device=str(device),
                                      seed=cfg.seed)
        self.backbone.set_trainable(image_tower=cfg.image_tower, text_tower=cfg.text_tower)
        self.tau0 = cfg.resolved_tau(self.backbone.logit_scale)
        learn_tau = cfg.resolved_learn_tau(self.backbone.logit_scale)
        self.model = model = MuMIC(self.backbone, specs, templates, loss=cfg.loss, tau=self.tau0, learn_tau=learn_tau,
                                   bias=cfg.bias).to(device)

        self.skipped: dict[str, list[tuple[int, str]]] = {}
        train_m, train_f = self._readable("train", train_m)
        self.val_m, val_f = self._readable("val", val_m)
        self.train = Data(train_m, *_targets(train_m, self.seen_names, cfg.unlisted), features=train_f)
        self.val = Data(self.val_m, *_targets(self.val_m, self.seen_names, "negative"), features=val_f)
        if not bool(self.val.y.any()):
            raise ManifestError("the validation data has no positive for any trained label; early stopping needs some")
        self.train_counts = dict(zip(self.seen_names, (self.train.y * self.train.known).sum(0).long().tolist()))
        for name, c in self.train_counts.items():
            if c == 0:
                log.warning("label '%s' has no positive in the training data", name)
        _init_bias(model, self.train, cfg, device)

        self.steps_per_epoch = math.ceil(math.ceil(len(train_m) / cfg.batch_size) / cfg.grad_accum)
        self.total = cfg.max_steps or cfg.epochs * self.steps_per_epoch
        self.opt = _optimizer(model, cfg)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, _schedule(min(cfg.warmup_steps, self.total // 2), self.total))
        self.net: torch.nn.Module = model
        if self.world > 1:
            # every rank starts from rank 0's weights; the linear baseline leaves the text head unused
            self.net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                               find_unused_parameters=self.loss.head == "linear")
        if resume:
            ckpt = self.run_dir / "checkpoint.safetensors"
            if not ckpt.is_file():
                raise RunError(f"{self.run_dir} has no checkpoint yet to resume from; start it again with --overwrite")
            self.state = TrainState(**load_checkpoint(ckpt, model, self.opt, self.sched))
            log.info("resuming %s at step %d", self.run_dir, self.state.step)

    def _readable(self, name: str, m: Manifest) -> tuple[Manifest, torch.Tensor | None]:
        """A split without the images left out under on_bad_image=skip, and its cached
        features when the image tower is frozen."""
        cfg = self.cfg
        failures: list[tuple[int, str]] | None = [] if cfg.on_bad_image == "skip" else None
        feats = None
        if cfg.image_tower == "frozen":
            # rank 0 fills the cache first; the other ranks then read it (and compute only
            # what they cannot find there, e.g. on a node without a shared cache folder)
            for turn in ("first", "rest"):
                if (turn == "first") == self.main:
                    feats = cached_features(self.backbone, m.images, cache_dir=cfg.cache_dir, batch_size=max(cfg.batch_size, 32),
                                            num_workers=cfg.num_workers, device=self.device, amp=cfg.amp, progress=self.progress,
                                            failures=failures, engine=cfg.engine)
                dist.barrier()
        elif failures is not None:
            failures = find_bad_images(m.images, self.backbone.image_size, num_workers=cfg.num_workers)
        if failures:
            self.skipped[name] = [(m.lines[i] if m.lines else i, r) for i, r in failures]
            keep = np.setdiff1d(np.arange(len(m)), [i for i, _ in failures])
            m = m.select(keep)
            if feats is not None:
                feats = feats[torch.from_numpy(keep)]
            log.warning("skipped %d unreadable %s images (listed in %s)", len(failures), name, self.run_dir / "skipped.csv")
        return m, feats

    # -- loop ---------------------------------------------------------------------------
    def loop(self) -> None:
        cfg, st, train = self.cfg, self.state, self.train
        self.model.train()
        bar = tqdm(total=self.total, initial=st.step, desc="train", unit="step", disable=not self.progress)
        running: list[float] = []
        while st.step < self.total and not st.stopped:
            epoch, in_epoch = divmod(st.step, self.steps_per_epoch)
            batches = _epoch_batches(len(train.manifest), cfg.batch_size, cfg.seed, epoch)
            groups = [batches[i : i + cfg.grad_accum] for i in range(0, len(batches), cfg.grad_accum)][in_epoch:]
            loader = None
            if train.features is None:
                ds = ImageDataset(train.paths, self.model.backbone.image_size, train=True, seed=cfg.seed, epoch=epoch)
                flat = [_rank_slice(b, self.rank, self.world)[0].tolist() for g in groups for b in g]
                loader = iter(DataLoader(ds, batch_sampler=flat, num_workers=cfg.num_workers, pin_memory=self.device.type == "cuda"))
            for group in groups:
                loss = self.step(group, loader)
                running.append(loss)
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}", tau=f"{self.model.tau:.3f}", best=f"{max(st.best, 0):.3f}")
                if st.step % cfg.eval_every == 0 or st.step == self.total or st.step % self.steps_per_epoch == 0:
                    self.evaluate(float(np.mean(running)) if running else float("nan"))
                    running = []
                if self.on_step is not None:
                    self.on_step(st.step)
                if st.stopped or st.step >= self.total:
                    break
        bar.close()

    def step(self, group: list[torch.Tensor], loader: Any) -> float:
        """One optimizer step over a group of micro-batches; returns its mean training loss."""
        train, device, world = self.train, self.device, self.world
        self.opt.zero_grad(set_to_none=True)
        weight_total = sum(len(b) for b in group)  # images in the whole (global) step
        use_amp = self.cfg.amp and device.type == "cuda"
        loss_sum = 0.0
        for j, full_idx in enumerate(group):
            idx, weight = _rank_slice(full_idx, self.rank, world)
            # DDP averages gradients over ranks, so each rank's share is scaled by world
            scale = weight / weight_total * world
            sync = j == len(group) - 1 or world == 1
            with (self.net.no_sync() if not sync else contextlib.nullcontext()):  # type: ignore[operator]
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
                    if train.features is not None:
                        z = self.net(features=train.features[idx].to(device, non_blocking=True))
                    else:
                        _, px = next(loader)
                        z = self.net(pixels=px)
                    loss = self.loss.fn(z.float(), train.y[idx].to(device), train.known[idx].to(device))
                (loss * scale).backward()
            loss_sum += float(loss.detach()) * weight / weight_total * world
        if not math.isfinite(loss_sum):
            raise RunError(
                f"training loss became {loss_sum} at step {self.state.step + 1}; lower the learning rates. "
                f"The best weights so far are in {self.best_path}"
            )
        self.opt.step()
        self.sched.step()
        self.state.step += 1
        return loss_sum

    def evaluate(self, train_loss: float) -> None:
        """Validation GAP@10, the best weights so far, early stopping, the checkpoint and log.csv."""
        st, model = self.state, self.model
        probs = score_data(model, self.val, self.cfg, self.device)
        g10 = gap(self.val.y.numpy(), probs, k=10)
        st.log.append({"step": st.step, "epoch": round(st.step / self.steps_per_epoch, 3), "train_loss": round(train_loss, 6),
                       "val_gap10": round(g10, 6), "tau": round(model.tau, 6), "bias_mean": round(float(model.bias.detach().mean()), 6),
                       "lr_head": _group_lr(self.opt, "heads"), "elapsed_s": round(time.time() - self.t_start, 2)})
        if g10 > st.best + 1e-9:
            st.best, st.best_step, st.bad_evals = g10, st.step, 0
            if self.main:
                save_tensors(self.best_path, model.trained_state())
        else:
            st.bad_evals += 1
        if st.bad_evals >= self.cfg.patience:
            st.stopped = True
        if self.main:  # one writer; every rank holds the same state (validation scores are gathered)
            save_checkpoint(self.run_dir / "checkpoint.safetensors", model, self.opt, self.sched, dataclasses.asdict(st))
            atomic_write_csv(self.run_dir / "log.csv", st.log)
        dist.barrier()
        model.train()

    # -- finalize -----------------------------------------------------------------------
    def _detail(self, split: str, m: Manifest, probs: np.ndarray, specs: list[LabelSpec],
                thresholds: dict[str, Any]) -> dict[str, Any]:
        """What the report's per-label table, PR curve and example grid show for one split."""
        names = [s.name for s in specs]
        y, _ = m.targets(names, ignore_unknown=True)
        t = np.array([thresholds["per_label"].get(n, thresholds["default"]) for n in names], np.float32)
        return {"split": split, "names": names, "seen": [s.seen for s in specs], "y": np.asarray(y), "probs": probs,
                "decided": probs >= t, "images": m.images, "labels": m.labels, "thresholds": thresholds,
                "train_counts": dict(Counter(n for row in self.train.manifest.labels for n in row))}

    def finalize(self) -> None:
        """Thresholds, labels, metrics, the final weights and the report, from the best weights."""
        cfg, run, model, val, st = self.cfg, self.run_dir, self.model, self.val, self.state
        model.load_trained_state(load_tensors(self.best_path), source=str(self.best_path))
        val_probs = score_data(model, val, cfg, self.device, gather=False)
        y_val = val.y.numpy()
        th = fit_thresholds(y_val, val_probs)
        default_th = float(fit_thresholds(y_val.reshape(-1, 1), val_probs.reshape(-1, 1))[0])
        fallback = global_fallback(y_val)
        thresholds = {"method": "max F1 on validation; labels with few positives use the global threshold",
                      "default": default_th, "per_label": {name: float(t) for name, t in zip(self.seen_names, th)},
                      "global": [name for name, g in zip(self.seen_names, fallback) if g]}
        atomic_write_json(run / "thresholds.json", thresholds)
        model.thresholds = thresholds
        atomic_write_json(run / "labels.json", labels_meta(model, self.train_counts, self.backbone.config(), self.tau0))
        metrics: dict[str, Any] = {
            "best_step": st.best_step, "steps": st.step, "train_images": len(self.train.manifest), "tau": model.tau,
            "train_time_s": round(time.time() - self.t_start, 2),
            "val": evaluate_probs(model, self.val_m, val_probs, seen_only=True, train_counts=self.train_counts, majority_n=cfg.majority_n),
        }
        detail = self._detail("val", self.val_m, val_probs, list(model.seen), thresholds)
        test_m = self.test_m
        if test_m is not None:
            test_failures: list[tuple[int, str]] | None = [] if cfg.on_bad_image == "skip" else None
            metrics["test"], scored_m, test_probs, test_specs = evaluate_model_scores(
                model, test_m, train_counts=self.train_counts, majority_n=cfg.majority_n, batch_size=cfg.batch_size,
                num_workers=cfg.num_workers, use_cache=cfg.image_tower == "frozen", cache_dir=cfg.cache_dir,
                failures=test_failures, engine=cfg.engine)
            detail = self._detail("test", scored_m, test_probs, test_specs, thresholds)
            if test_failures:
                self.skipped["test"] = [(test_m.lines[i] if test_m.lines else i, r) for i, r in test_failures]
        if self.skipped:
            rows = [{"split": k, "line": line, "reason": reason} for k, v in self.skipped.items() for line, reason in v]
            atomic_write_csv(run / "skipped.csv", rows)
        metrics["skipped_images"] = {k: len(v) for k, v in self.skipped.items()}
        splits = {"train": self.train.manifest, "val": self.val_m, **({"test": test_m} if test_m is not None else {})}
        split_counts = {k: dict(Counter(n for row in m.labels for n in row)) for k, m in splits.items()}
        metrics.update(card_metrics(splits, split_counts, detail))  # what the model card reads
        atomic_write_json(run / "metrics.json", metrics)
        write_class_embeddings(run, model)
        save_tensors(run / "model.safetensors", model.trained_state(), metadata={"format": "mumic-run-1"})
        write_run_report(run, metrics, st.log, split_counts=split_counts, detail=detail)
        write_run_card(run)
        for f in ("checkpoint.safetensors", "best.safetensors"):
            (run / f).unlink(missing_ok=True)
        log.info("run %s finished: val GAP@10 %.4f at step %d", run, st.best, st.best_step)

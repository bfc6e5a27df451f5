"""Evaluation of a model on a manifest, predictions and embeddings for manifests, reports."""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from mumic.data.manifest import LabelSpec, Manifest, read_manifest
from mumic.errors import ConfigError, ManifestError
from mumic.io import atomic_write_json, atomic_write_text
from mumic.model import MuMIC

log = logging.getLogger(__name__)

# the paper's figures first, then the rest
HEADLINE = ("gap10", "gap", "map_macro", "map_majority", "zsl_map", "gzsl_map", "map_micro", "f1_micro_thr", "f1_macro_thr")


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
) -> torch.Tensor:
    """[N, D] unnormalised image embeddings P_img(f_img(x)), from cached features if given.

    With a `failures` list, unreadable images give NaN rows and a (row, reason) entry
    instead of an error."""
    from mumic.data.dataset import pixel_batches

    model.eval()
    device = device or model.device
    if features is not None:
        return torch.cat([model.image_embeddings(features=features[s : s + 4096].to(device)).float().cpu() for s in range(0, len(features), 4096)])
    skip = failures is not None
    batches = pixel_batches(list(paths), model.backbone.image_size, batch_size, device=device, num_workers=num_workers,
                            skip_bad=skip, decode=decode)
    out = []
    for idx, px, reasons in tqdm(batches, desc="images", unit="batch", disable=not progress, leave=False):
        u = model.image_embeddings(px).float().cpu()
        if reasons is not None:
            bad = [r for r, reason in enumerate(reasons) if reason]
            failures.extend((int(idx[r]), reasons[r]) for r in bad)  # type: ignore[union-attr]
            u[bad] = float("nan")
        out.append(u)
    return torch.cat(out) if out else torch.zeros((0, model.backbone.embed_dim))


def _scored_labels(model: MuMIC) -> list[LabelSpec]:
    # a linear head scores only its trained labels
    return list(model.seen) if model.classifier is not None else list(model.labels)


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
    from mumic.metrics import evaluate_scores

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
    return {k: (float(v) if isinstance(v, (int, float, np.floating, np.integer)) else v) for k, v in out.items()}


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
        from mumic.features import cached_features

        feats = cached_features(model.backbone, manifest.images, cache_dir=cache_dir, batch_size=batch_size,
                                num_workers=num_workers, device=model.device, progress=progress, failures=failures,
                                decode=decode, engine=engine)
    u = manifest_embeddings(model, manifest.images, features=feats, batch_size=batch_size, num_workers=num_workers,
                            progress=progress, failures=None if feats is not None else failures, decode=decode)
    specs = list(labels) if labels is not None else _scored_labels(model)
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
    known = {l.name for l in model.labels}
    for i, labels in enumerate(manifest.labels):
        bad = [l for l in labels if l not in known]
        if bad:
            raise ManifestError(f"{manifest.path}, line {manifest.lines[i]}: label '{bad[0]}' is not a label of this run")
    probs, specs = model_probs(model, manifest, **kw)
    if kw.get("failures"):
        ok = ~np.isnan(probs).any(1)
        manifest, probs = manifest.select(np.flatnonzero(ok)), probs[ok]
    return evaluate_probs(model, manifest, probs, labels=specs, train_counts=train_counts, majority_n=majority_n)


def evaluate_run(run_dir: str | Path, manifest_path: str | Path, *, split: str | None = None, out: str | Path | None = None,
                 batch_size: int = 64, num_workers: int = 0, device: str = "auto", progress: bool = True,
                 allow_outside: bool = False, allow_duplicates: bool = False, decode: str = "cpu",
                 engine: str = "torch") -> dict[str, float]:
    """`mumic evaluate`: metrics of a run on a manifest (or one split of it), written as JSON."""
    model = MuMIC.from_run(run_dir, device=device).set_engine(engine)
    manifest = read_manifest(manifest_path, allow_outside=allow_outside, allow_duplicates=allow_duplicates)
    if split:
        manifest = manifest.split(split)
    meta = json.loads((Path(run_dir) / "labels.json").read_text())
    counts = {l["name"]: l.get("train_positives", 0) for l in meta["labels"]}
    metrics = evaluate_model(model, manifest, train_counts=counts, majority_n=model.config.majority_n,
                             batch_size=batch_size, num_workers=num_workers, progress=progress, decode=decode)
    target = Path(out) if out else Path(run_dir) / f"eval-{Path(manifest_path).stem}{'-' + split if split else ''}.json"
    atomic_write_json(target, {"manifest": str(manifest_path), "split": split, "images": len(manifest), "metrics": metrics})
    return metrics


def format_metrics(metrics: dict[str, Any]) -> str:
    """Metrics as aligned text, the paper's figures first."""
    keys = [k for k in HEADLINE if k in metrics] + [k for k in metrics if k not in HEADLINE]
    lines = []
    for k in keys:
        v = metrics[k]
        lines.append(f"{k:>14}  {v:.4f}" if isinstance(v, float) else f"{k:>14}  {v}")
    return "\n".join(lines)


SHARD_ROWS = 4096


def _sharded(out: Path, n: int, fingerprint: dict[str, Any], shard_rows: int, suffix: str,
             write_part, progress: bool, desc: str) -> list[Path]:
    """Process rows [0, n) in shards, each written atomically to OUT.parts/part-K; shards
    already written by an interrupted call with the same fingerprint are kept, so a
    rerun resumes from the last completed shard. Memory is bounded by one shard.
    Under torchrun, rank r writes the shards K with K % world == r."""
    import shutil

    from mumic import distributed as dist
    from mumic.io import read_json

    parts_dir = out.with_name(out.name + ".parts")
    meta = parts_dir / "meta.json"
    if dist.is_main():
        if parts_dir.is_dir() and (not meta.is_file() or read_json(meta) != fingerprint):
            log.info("discarding parts of a different job in %s", parts_dir)
            shutil.rmtree(parts_dir)
        parts_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(meta, fingerprint)
    dist.barrier()
    rank, world = dist.rank(), dist.world()
    parts = []
    starts = list(range(0, n, shard_rows))
    done = sum((parts_dir / f"part-{k:05d}{suffix}").is_file() for k in range(len(starts)))
    if done:
        log.info("resuming: %d of %d shards already written in %s", done, len(starts), parts_dir)
    for k, start in enumerate(tqdm(starts, desc=desc, unit="shard", disable=not progress or len(starts) < 2 or rank != 0)):
        part = parts_dir / f"part-{k:05d}{suffix}"
        if k % world == rank and not part.is_file():
            write_part(start, min(n, start + shard_rows), part)
        parts.append(part)
    dist.barrier()
    return parts


def _fingerprint(model: MuMIC, manifest: Manifest, **extra: Any) -> dict[str, Any]:
    return {"run": str(getattr(model, "run_dir", "")), "manifest": str(manifest.path), "rows": len(manifest),
            "first": str(manifest.images[0]) if len(manifest) else "", "last": str(manifest.images[-1]) if len(manifest) else "", **extra}


def _records(manifest: Manifest, start: int, end: int) -> list[dict[str, Any]]:
    """The manifest's own columns of rows [start, end) as JSON-able dicts, image made absolute."""
    frame = manifest.frame.iloc[start:end]
    recs = json.loads(frame.to_json(orient="records", default_handler=str))
    for r, path in zip(recs, manifest.images[start:end]):
        r["image"] = str(path)
    return recs


def predict_manifest(
    model: MuMIC,
    manifest: Manifest,
    out_path: str | Path,
    *,
    labels: Sequence[str] | None = None,
    top_k: int | None = None,
    batch_size: int = 32,
    num_workers: int = 0,
    progress: bool = True,
    shard_rows: int = SHARD_ROWS,
    on_bad_image: str = "fail",
    decode: str = "cpu",
) -> int:
    """Per image: probabilities, calibrated decisions and the manifest's other columns.

    Writes JSON lines, or Parquet when out_path ends in .parquet (scores as a list aligned
    with the label names stored in the file's metadata). Streams in bounded memory and
    resumes an interrupted call from its last completed shard."""
    specs = model.resolve_labels(labels) if labels else _scored_labels(model)
    names = [s.name for s in specs]
    out = Path(out_path)
    parquet = out.suffix.lower() == ".parquet"

    def write_part(start: int, end: int, part: Path) -> None:
        failures = _failures(on_bad_image)
        u = manifest_embeddings(model, manifest.images[start:end], batch_size=batch_size, num_workers=num_workers, failures=failures,
                                 decode=decode)
        keep = _keep_rows(failures, start, end, part)
        u = u[keep]
        p = model.proba_from_embeddings(u, specs)
        decided = model.decide(p, specs)
        recs = [_records(manifest, start, end)[r] for r in keep]
        for r, rec in enumerate(recs):
            order = np.argsort(-p[r], kind="stable")
            rec["predicted"] = [names[j] for j in order if decided[r, j]]
            if parquet:
                rec["scores"] = p[r].astype(np.float32).tolist()
            else:
                rec["scores"] = {names[j]: round(float(p[r, j]), 6) for j in (order[:top_k] if top_k else order)}
        if parquet:
            import pyarrow as pa
            import pyarrow.parquet as pq

            table = pa.Table.from_pylist(recs)
            # explicit types: a shard where nothing is decided must not infer list<null>
            for col, typ in (("predicted", pa.list_(pa.string())), ("scores", pa.list_(pa.float32()))):
                table = table.set_column(table.schema.get_field_index(col), col, table.column(col).cast(typ))
            tmp = part.with_name(f".{part.name}.tmp")
            pq.write_table(table, tmp)
            tmp.replace(part)
        else:
            atomic_write_text(part, "".join(json.dumps(r, default=str) + "\n" for r in recs))

    fp = _fingerprint(model, manifest, kind="predict", labels=names, top_k=top_k, parquet=parquet, on_bad_image=on_bad_image,
                      **({"decode": decode} if decode != "cpu" else {}))
    parts = _sharded(out, len(manifest), fp, shard_rows, ".parquet" if parquet else ".jsonl", write_part, progress, "predict")
    return _merge(parts, out, parquet, metadata={"labels": json.dumps(names)})


def embed_manifest(model: MuMIC, manifest: Manifest, out_path: str | Path, *, batch_size: int = 32, num_workers: int = 0,
                   progress: bool = True, shard_rows: int = SHARD_ROWS, on_bad_image: str = "fail",
                   decode: str = "cpu") -> int:
    """Write a Parquet file: the manifest's columns plus a normalised `embedding` column.
    Streams in bounded memory and resumes an interrupted call from its last shard."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    def write_part(start: int, end: int, part: Path) -> None:
        failures = _failures(on_bad_image)
        emb = manifest_embeddings(model, manifest.images[start:end], batch_size=batch_size, num_workers=num_workers, failures=failures,
                                 decode=decode)
        keep = _keep_rows(failures, start, end, part)
        emb = F.normalize(emb[keep], dim=-1).numpy().astype(np.float32)
        frame = manifest.frame.iloc[start:end].reset_index(drop=True).iloc[keep].reset_index(drop=True).copy()
        frame["image"] = [str(manifest.images[start + r]) for r in keep]
        table = pa.Table.from_pandas(frame, preserve_index=False)
        table = table.append_column("embedding", pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1)), emb.shape[1]))
        tmp = part.with_name(f".{part.name}.tmp")
        pq.write_table(table, tmp)
        tmp.replace(part)

    out = Path(out_path)
    parts = _sharded(out, len(manifest), _fingerprint(model, manifest, kind="embed", on_bad_image=on_bad_image,
                                                          **({"decode": decode} if decode != "cpu" else {})), shard_rows, ".parquet", write_part, progress, "embed")
    return _merge(parts, out, parquet=True)


def _failures(on_bad_image: str) -> list[tuple[int, str]] | None:
    if on_bad_image not in ("fail", "skip"):
        raise ConfigError(f"on_bad_image is {on_bad_image!r}; choose fail or skip")
    return [] if on_bad_image == "skip" else None


def _keep_rows(failures: list[tuple[int, str]] | None, start: int, end: int, part: Path) -> list[int]:
    """Rows of a shard to write; skipped images go to the shard's .skipped.csv beside it."""
    bad = {r for r, _ in failures or []}
    if failures:
        import csv
        import io

        buf = io.StringIO()
        w = csv.writer(buf)
        for r, reason in sorted(failures):
            w.writerow([start + r, reason])
        atomic_write_text(part.with_name(part.name + ".skipped.csv"), buf.getvalue())
        log.warning("skipped %d unreadable images in rows %d-%d", len(bad), start, end - 1)
    return [r for r in range(end - start) if r not in bad]


def _merge(parts: list[Path], out: Path, parquet: bool, metadata: dict[str, str] | None = None) -> int:
    """Concatenate the shard files into `out` (atomically), write the skipped images to
    OUT.skipped.csv (row, image, reason) if any, remove the parts; returns rows written.
    Under torchrun only rank 0 merges (the others return 0)."""
    import shutil

    from mumic import distributed as dist

    if not dist.is_main():
        return 0

    skipped = []
    for part in parts:
        sk = part.with_name(part.name + ".skipped.csv")
        if sk.is_file():
            skipped.append(sk.read_text())
    skipped_path = out.with_name(out.name + ".skipped.csv")
    if skipped:
        atomic_write_text(skipped_path, "row,reason\n" + "".join(skipped))
    else:
        skipped_path.unlink(missing_ok=True)
    rows = 0

    tmp = out.with_name(f".{out.name}.tmp")
    out.parent.mkdir(parents=True, exist_ok=True)
    if parquet:
        import pyarrow.parquet as pq

        writer = None
        try:
            for part in parts:
                table = pq.read_table(part)
                if writer is None:
                    schema = table.schema.with_metadata({**(table.schema.metadata or {}), **{k.encode(): v.encode() for k, v in (metadata or {}).items()}})
                    writer = pq.ParquetWriter(tmp, schema)
                writer.write_table(table.cast(writer.schema))
                rows += table.num_rows
        finally:
            if writer is not None:
                writer.close()
        if writer is None:  # no rows
            import pyarrow as pa

            pq.write_table(pa.table({}), tmp)
    else:
        with open(tmp, "wb") as dst:
            for part in parts:
                with open(part, "rb") as src:
                    shutil.copyfileobj(src, dst)
                with open(part, "rb") as src:
                    rows += sum(1 for _ in src)
    tmp.replace(out)
    if parts:
        shutil.rmtree(parts[0].parent)
    return rows


def write_report(run: Path, metrics: dict[str, Any], log_rows: list[dict[str, Any]]) -> None:
    """report.md and a learning-curve plot for a finished run."""
    lines = [f"# Run {run.name}", ""]
    for split in ("val", "test"):
        if split in metrics:
            lines += [f"## {split}", "", "| metric | value |", "|---|---|"]
            m = metrics[split]
            for k in [k for k in HEADLINE if k in m] + [k for k in m if k not in HEADLINE]:
                v = m[k]
                lines.append(f"| {k} | {v:.4f} |" if isinstance(v, float) and not math.isnan(v) else f"| {k} | {v} |")
            lines.append("")
    lines += [f"best step {metrics.get('best_step')} of {metrics.get('steps')}, tau {metrics.get('tau', float('nan')):.4f}, "
              f"train time {metrics.get('train_time_s')} s", ""]
    if log_rows:
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt

            fig, ax = plt.subplots(figsize=(6, 3.5))
            steps = [r["step"] for r in log_rows]
            ax.plot(steps, [r["val_gap10"] for r in log_rows], marker="o", label="val GAP@10")
            ax2 = ax.twinx()
            ax2.plot(steps, [r["train_loss"] for r in log_rows], color="tab:red", alpha=0.6, label="train loss")
            ax.set_xlabel("step")
            ax.set_ylabel("val GAP@10")
            ax2.set_ylabel("train loss")
            fig.tight_layout()
            fig.savefig(run / "curve.png", dpi=100)
            plt.close(fig)
            lines += ["![learning curve](curve.png)", ""]
        except Exception as e:  # a report without a plot is still a report
            log.warning("could not draw the learning curve: %s", e)
    atomic_write_text(run / "report.md", "\n".join(lines))

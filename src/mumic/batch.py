"""Sharded, resumable jobs over a manifest: `predict` (probabilities and decisions) and
`embed` (normalised image embeddings), written as JSON lines or Parquet."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch.nn.functional as F
from tqdm.auto import tqdm

from mumic import distributed as dist
from mumic.data.inputs import InputsManifest
from mumic.data.manifest import Manifest
from mumic.errors import ConfigError
from mumic.evaluate import manifest_embeddings
from mumic.io import atomic_path, atomic_write_json, atomic_write_text, check_writable, tensors_digest
from mumic.predictor import Predictor
from mumic.readers import read_json
from mumic.run import RUN_FILES, run_fingerprint

log = logging.getLogger(__name__)

EMBEDDINGS_RUN_KEY = "mumic.run_fingerprint"
"""Parquet metadata key of an embeddings file: the fingerprint of the run that made it."""

SHARD_ROWS = 4096


def _sharded(out: Path, n: int, fingerprint: dict[str, Any], shard_rows: int, suffix: str,
             write_part: Callable[[int, int, Path, Callable[[int], Any]], None], progress: bool, desc: str) -> list[Path]:
    """Process rows [0, n) in shards, each written atomically to OUT.parts/part-K; shards
    already written by an interrupted call with the same fingerprint are kept, so a
    rerun resumes from the last completed shard. Memory is bounded by one shard.
    Under torchrun, rank r writes the shards K with K % world == r."""
    import shutil


    fingerprint = {**fingerprint, "shard_rows": shard_rows}
    parts_dir = out.with_name(out.name + ".parts")
    meta = parts_dir / "meta.json"
    if dist.is_main():
        if parts_dir.is_dir():
            old = read_json(meta) if meta.is_file() else {}
            changed = [k for k in fingerprint if not isinstance(old, dict) or old.get(k) != fingerprint[k]]
            if changed:
                log.warning("discarding the shards in %s: they were written by another job (its %s differ); starting over",
                            parts_dir, ", ".join(changed))
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
    # one bar over this rank's images (rank 0 shows it), moved batch by batch
    mine = [(start, min(n, start + shard_rows)) for k, start in enumerate(starts) if k % world == rank]
    with tqdm(total=sum(e - s for s, e in mine), desc=desc, unit="img", disable=not progress or rank != 0, leave=False) as bar:
        for k, start in enumerate(starts):
            part = parts_dir / f"part-{k:05d}{suffix}"
            if k % world == rank:
                end = min(n, start + shard_rows)
                if part.is_file():
                    bar.update(end - start)
                else:
                    write_part(start, end, part, bar.update)
            parts.append(part)
    dist.barrier()
    return parts


def check_output(out_path: str | Path, manifest: Manifest, *, run_dir: str | Path | None = None, overwrite: bool = False) -> None:
    """Refuse an output file that is one of the job's inputs (a manifest, an image, a file
    of the run), even with `overwrite`, a finished output unless `overwrite`, and a folder
    where no file can be written (OutputError). An
    interrupted job's shards (OUT.parts/) are no finished output: a rerun resumes them."""
    out = Path(out_path)
    if out.is_dir():
        raise ConfigError(f"--out {out} is a folder; give a file name")
    real = out.resolve()
    named = {str(real), os.path.normpath(out.absolute())}
    manifests = ({p for p, line in zip(manifest.sources, manifest.lines) if line} if isinstance(manifest, InputsManifest)
                 else {manifest.path})
    if any(p.resolve() == real for p in manifests):
        raise ConfigError(f"--out {out} is a manifest given as input; choose another output file (inputs are never replaced)")
    if named & {str(p) for p in manifest.images}:
        raise ConfigError(f"--out {out} is an image of the input; choose another output file (inputs are never replaced)")
    if run_dir is not None:
        run = Path(run_dir).resolve()
        if real == run or (real.parent == run and real.name in RUN_FILES):
            raise ConfigError(f"--out {out} is a file of the run {run_dir}; choose another output file (a run is never replaced)")
    if out.exists() and not overwrite:
        raise ConfigError(f"{out} already exists; pass --overwrite to replace it, or choose another --out")
    check_writable(out.parent)  # a read-only --out fails now, not after the work


def _model_digest(model: Predictor) -> str:
    """sha256 of what decides a job's rows, as loaded: the trained weights, the labels and
    their prompts, the templates, tau, the backbone's settings and the thresholds."""
    h = hashlib.sha256(tensors_digest(model.trained_state()).encode("ascii"))
    h.update(json.dumps({"labels": [[s.name, s.prompts, s.description, s.seen] for s in model.labels], "templates": model.templates,
                         "tau": model.tau, "backbone": model.backbone.config(), "thresholds": getattr(model, "thresholds", None)},
                        sort_keys=True, default=str).encode("utf-8"))
    return h.hexdigest()


def _manifest_digest(manifest: Manifest) -> str:
    """sha256 of a manifest's content (its images and every column), not of its path."""
    h = hashlib.sha256(json.dumps([str(p) for p in manifest.images]).encode("utf-8"))
    h.update(manifest.frame.to_json(orient="split", index=False, default_handler=str).encode("utf-8"))
    return h.hexdigest()


def _fingerprint(model: Predictor, manifest: Manifest, **extra: Any) -> dict[str, Any]:
    """What a job's shards depend on; shards written under another fingerprint are discarded."""
    run_dir = getattr(model, "run_dir", None)
    return {"run": str(Path(run_dir).resolve()) if run_dir else "", "model": _model_digest(model), "manifest": str(manifest.path),
            "manifest_sha256": _manifest_digest(manifest), "rows": len(manifest), **extra}


def _records(manifest: Manifest, start: int, end: int) -> list[dict[str, Any]]:
    """The manifest's own columns of rows [start, end) as JSON-able dicts, image made absolute."""
    frame = manifest.frame.iloc[start:end]
    recs = json.loads(frame.to_json(orient="records", default_handler=str))
    for r, path in zip(recs, manifest.images[start:end]):
        r["image"] = str(path)
    return recs


def predict_manifest(
    model: Predictor,
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
    overwrite: bool = False,
) -> int:
    """Per image: probabilities, calibrated decisions and the manifest's other columns;
    `top_k` keeps the k highest scores and the decided labels among them.

    Writes JSON lines, or Parquet when out_path ends in .parquet (scores as a list aligned
    with the label names stored in the file's metadata). Streams in bounded memory and
    resumes an interrupted call from its last completed shard. A finished out_path is
    replaced only with `overwrite`; an input is never replaced (check_output)."""
    check_output(out_path, manifest, run_dir=getattr(model, "run_dir", None), overwrite=overwrite)
    specs = model.resolve_labels(labels) if labels else model.scored_labels
    names = [s.name for s in specs]
    out = Path(out_path)
    parquet = out.suffix.lower() == ".parquet"

    def write_part(start: int, end: int, part: Path, on_batch: Callable[[int], Any]) -> None:
        failures = _failures(on_bad_image)
        u = manifest_embeddings(model, manifest.images[start:end], batch_size=batch_size, num_workers=num_workers, failures=failures,
                                 on_batch=on_batch,
                                 decode=decode)
        keep = _keep_rows(failures, start, end, part, manifest)
        u = u[keep]
        p = model.proba_from_embeddings(u, specs)
        decided = model.decide(p, specs)
        shard = _records(manifest, start, end)  # once per shard, not once per row
        recs = [shard[r] for r in keep]
        for r, rec in enumerate(recs):
            order = np.argsort(-p[r], kind="stable")
            kept = order[:top_k] if top_k else order  # top_k trims the decisions as it trims the scores, as /predict does
            rec["predicted"] = [names[j] for j in kept if decided[r, j]]
            if parquet:  # Parquet keeps every score, aligned with the label names in the file's metadata
                rec["scores"] = p[r].astype(np.float32).tolist()
            else:
                rec["scores"] = {names[j]: round(float(p[r, j]), 6) for j in kept}
        if parquet:
            import pyarrow as pa
            import pyarrow.parquet as pq

            table = pa.Table.from_pylist(recs)
            # explicit types: a shard where nothing is decided must not infer list<null>
            for col, typ in (("predicted", pa.list_(pa.string())), ("scores", pa.list_(pa.float32()))):
                table = table.set_column(table.schema.get_field_index(col), col, table.column(col).cast(typ))
            with atomic_path(part) as tmp:
                pq.write_table(table, tmp)
        else:
            atomic_write_text(part, "".join(json.dumps(r, default=str) + "\n" for r in recs))

    fp = _fingerprint(model, manifest, kind="predict", labels=names, top_k=top_k, parquet=parquet, on_bad_image=on_bad_image,
                      **({"decode": decode} if decode != "cpu" else {}))
    parts = _sharded(out, len(manifest), fp, shard_rows, ".parquet" if parquet else ".jsonl", write_part, progress, "predict")
    return _merge(parts, out, parquet, metadata={"labels": json.dumps(names)})


def predict_preannotations(model: Predictor, manifest: Manifest, out_path: str | Path, fmt: str, *, images_root: str | Path | None = None,
                           url_prefix: str | None = None, from_name: str = "choice", to_name: str = "image",
                           labels: Sequence[str] | None = None, overwrite: bool = False, **options: Any) -> int:
    """`predict_manifest`, then its records written for a labelling tool (Label Studio tasks
    or image-level COCO results, see mumic.data.importers.preannotate) with the run's
    fingerprint as model_version. The records stream through OUT.predictions.jsonl (its
    shards resume an interrupted job), removed once OUT is complete."""
    from mumic.data.importers.preannotate import FORMATS, LOCAL_FILES, write_preannotations

    if fmt not in FORMATS:
        raise ConfigError(f"--format {fmt!r}: choose one of {', '.join(FORMATS)}")
    check_output(out_path, manifest, run_dir=getattr(model, "run_dir", None), overwrite=overwrite)
    out = Path(out_path)
    records = out.with_name(out.name + ".predictions.jsonl")
    n = predict_manifest(model, manifest, records, labels=labels, overwrite=True, **options)
    if not dist.is_main():
        return 0
    run_dir = getattr(model, "run_dir", None)
    names = [s.name for s in (model.resolve_labels(labels) if labels else model.scored_labels)]
    write_preannotations(records, out, fmt, label_names=names, model_version=run_fingerprint(run_dir) if run_dir else "",
                         images_root=Path(images_root) if images_root is not None else None,
                         url_prefix=LOCAL_FILES if url_prefix is None else url_prefix, from_name=from_name, to_name=to_name)
    skipped = records.with_name(records.name + ".skipped.csv")
    if skipped.is_file():
        os.replace(skipped, out.with_name(out.name + ".skipped.csv"))
    records.unlink()
    return n


def embed_manifest(model: Predictor, manifest: Manifest, out_path: str | Path, *, batch_size: int = 32, num_workers: int = 0,
                   progress: bool = True, shard_rows: int = SHARD_ROWS, on_bad_image: str = "fail",
                   decode: str = "cpu", overwrite: bool = False) -> int:
    """Write a Parquet file: the manifest's columns plus a normalised `embedding` column.
    Streams in bounded memory and resumes an interrupted call from its last shard. A
    finished out_path is replaced only with `overwrite`; an input never (check_output)."""
    check_output(out_path, manifest, run_dir=getattr(model, "run_dir", None), overwrite=overwrite)
    import pyarrow as pa
    import pyarrow.parquet as pq

    def write_part(start: int, end: int, part: Path, on_batch: Callable[[int], Any]) -> None:
        failures = _failures(on_bad_image)
        raw = manifest_embeddings(model, manifest.images[start:end], batch_size=batch_size, num_workers=num_workers, failures=failures,
                                 on_batch=on_batch,
                                 decode=decode)
        keep = _keep_rows(failures, start, end, part, manifest)
        emb = F.normalize(raw[keep], dim=-1).numpy().astype(np.float32)
        frame = manifest.frame.iloc[start:end].reset_index(drop=True).iloc[keep].reset_index(drop=True).copy()
        frame["image"] = [str(manifest.images[start + r]) for r in keep]
        table = pa.Table.from_pandas(frame, preserve_index=False)
        table = table.append_column("embedding", pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1)), emb.shape[1]))
        with atomic_path(part) as tmp:
            pq.write_table(table, tmp)

    out = Path(out_path)
    fingerprint = _fingerprint(model, manifest, kind="embed", on_bad_image=on_bad_image,
                               **({"decode": decode} if decode != "cpu" else {}))
    parts = _sharded(out, len(manifest), fingerprint, shard_rows, ".parquet", write_part, progress, "embed")
    # which run made the embeddings: `mumic index --from-embeddings` refuses another run's
    run_dir = getattr(model, "run_dir", None)
    meta = {EMBEDDINGS_RUN_KEY: run_fingerprint(run_dir)} if run_dir else None
    return _merge(parts, out, parquet=True, metadata=meta)


def _failures(on_bad_image: str) -> list[tuple[int, str]] | None:
    if on_bad_image not in ("fail", "skip"):
        raise ConfigError(f"on_bad_image is {on_bad_image!r}; choose fail or skip")
    return [] if on_bad_image == "skip" else None


def _keep_rows(failures: list[tuple[int, str]] | None, start: int, end: int, part: Path, manifest: Manifest) -> list[int]:
    """Rows of a shard to write; skipped images go to the shard's .skipped.csv beside it, by
    the line of their manifest (as training's skipped.csv), or their place among the inputs."""
    bad = {r for r, _ in failures or []}
    if failures:
        import csv
        import io

        buf = io.StringIO()
        w = csv.writer(buf)
        for r, reason in sorted(failures):
            row = start + r
            line = manifest.lines[row] if manifest.lines and manifest.lines[row] else row + 1
            w.writerow([line, str(manifest.images[row]), reason])
        atomic_write_text(part.with_name(part.name + ".skipped.csv"), buf.getvalue())
        log.warning("skipped %d unreadable images in rows %d-%d", len(bad), start, end - 1)
    return [r for r in range(end - start) if r not in bad]


def _merge(parts: list[Path], out: Path, parquet: bool, metadata: dict[str, str] | None = None) -> int:
    """Concatenate the shard files into `out` (atomically), write the skipped images to
    OUT.skipped.csv (line, image, reason) if any, remove the parts; returns rows written.
    Under torchrun only rank 0 merges (the others return 0)."""
    import shutil


    if not dist.is_main():
        return 0

    skipped = []
    for part in parts:
        sk = part.with_name(part.name + ".skipped.csv")
        if sk.is_file():
            skipped.append(sk.read_text())
    skipped_path = out.with_name(out.name + ".skipped.csv")
    if skipped:
        atomic_write_text(skipped_path, "line,image,reason\n" + "".join(skipped))
    else:
        skipped_path.unlink(missing_ok=True)
    rows = 0

    with atomic_path(out) as tmp:  # a failed merge (a full disk) leaves no temporary file behind
        if parquet:
            import pyarrow.parquet as pq

            writer = None
            try:
                for part in parts:
                    table = pq.read_table(part)
                    if writer is None:
                        extra = {k.encode(): v.encode() for k, v in (metadata or {}).items()}
                        schema = table.schema.with_metadata({**(table.schema.metadata or {}), **extra})
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
    if parts:
        shutil.rmtree(parts[0].parent)
    return rows



"""Nearest-image search over a run's normalised image embeddings.

`mumic index RUN MANIFEST --out INDEX` embeds every image of a manifest with the run and
writes an index folder:

    INDEX/
      index.json       format, run path and fingerprint, count, dim, metric, backend, parameters
      embeddings.npy   float32 [N, D], L2-normalised rows: the exact-search reference
      items.parquet    row i describes embeddings[i]: `image` (absolute path) and the
                       manifest's other columns
      ann.faiss        HNSW graph over the same vectors (inner product), ids 0..N-1
                       (absent for backend "exact")

index.json binds the other files to it: `file_digests` records each one's size and sha256
(of the whole file up to FULL_DIGEST_BYTES, else of io.sampled_sha256's sample, so that
loading a large index stays fast), checked on load, so that a file copied in from another
index (or truncated, or regenerated) is refused with an error naming it.

The metric is cosine similarity, computed as the inner product of normalised vectors.
Exact search (one numpy matrix product) is the reference; the HNSW graph answers the same
question approximately and much faster on large collections. Embeddings of one run are
only comparable with queries embedded by the same run: an index records the run's
fingerprint, and loading it with another run is refused.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mumic.errors import ConfigError, IndexFolderError, MumicError, RunError
from mumic.io import atomic_folder, check_output_folder, file_sha256, sampled_sha256
from mumic.run import run_fingerprint

log = logging.getLogger(__name__)

FORMAT = "mumic-index-1"
METRIC = "cosine"
BACKENDS = ("faiss", "exact")
ANN_FILE = "ann.faiss"
#: HNSW parameters: M=32 links per node and efConstruction=200 build a graph whose recall@10
#: at efSearch=128 is above 0.95 on real embeddings; raise ef_search for more recall.
HNSW_M = 32
HNSW_EF_CONSTRUCTION = 200
HNSW_EF_SEARCH = 128
RESULT_FIELDS = ("rank", "score", "id")
#: files up to this size are bound to index.json by the sha256 of all their bytes, larger
#: ones by a sampled sha256 (about 3 MB read): size and sample catch a file of another index
FULL_DIGEST_BYTES = 16 * 2**20


def _file_record(path: Path) -> dict[str, Any]:
    size = path.stat().st_size
    if size <= FULL_DIGEST_BYTES:
        return {"bytes": size, "sha256": file_sha256(path)}
    return {"bytes": size, "sampled_sha256": sampled_sha256(path)}


def _check_bound(folder: Path, meta: dict[str, Any], name: str) -> None:
    """Refuse FOLDER/name when it is not the file index.json recorded at write time."""
    records = meta.get("file_digests")
    path = folder / name
    if records is None or not path.is_file():
        return  # an index of an older version (warned about on load); a missing file is named by its reader
    entry = records.get(name) if isinstance(records, dict) else None
    if not isinstance(entry, dict) or not isinstance(entry.get("bytes"), int):
        raise IndexFolderError(f"{folder / 'index.json'} records no size and digest for {name}; rebuild the index")
    size = path.stat().st_size
    what: str | None
    if size != entry["bytes"]:
        what = f"it has {size} bytes, index.json recorded {entry['bytes']}"
    elif "sha256" in entry:
        what = None if file_sha256(path) == entry["sha256"] else "its sha256 differs from the one index.json recorded"
    else:
        what = None if sampled_sha256(path) == entry.get("sampled_sha256") else "its content differs from the digest index.json recorded"
    if what:
        raise IndexFolderError(f"{path} is not the file this index was written with ({what}): it was replaced (e.g. by "
                               f"another index's) or changed; rebuild the index with `mumic index RUN MANIFEST --out {folder}`")


def _faiss():
    # faiss logs each CPU-feature build it tries at INFO; only its problems matter here
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)
    try:
        import faiss
    except ImportError:
        raise ConfigError("the 'faiss' index backend needs the package faiss-cpu: pip install faiss-cpu, or use --backend exact") from None
    return faiss


def _json_safe(value: Any) -> Any:
    """A manifest cell as plain JSON: numpy scalars and arrays unwrapped, missing as null."""
    import numpy as np
    import pandas as pd

    if isinstance(value, np.ndarray):
        return [_json_safe(v) for v in value.tolist()]
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if value is None or isinstance(value, (str, bool)):
        return value
    try:
        if pd.isna(value):
            return None
    except (TypeError, ValueError):
        pass
    if hasattr(value, "item"):
        try:
            value = value.item()
        except (ValueError, TypeError):
            return str(value)
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, (int, float, bool)):
        return value
    return str(value)


def _is_missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _parquet_safe(frame: Any) -> Any:
    """Object columns that mix types (e.g. text and lists) become JSON text, so that
    Parquet can store them; missing cells stay missing."""
    frame = frame.copy()
    for col in frame.columns:
        if frame[col].dtype != object:
            continue
        kinds = {type(v) for v in frame[col] if not _is_missing(v)}
        if len(kinds) > 1:
            frame[col] = [v if _is_missing(v) or isinstance(v, str) else json.dumps(_json_safe(v)) for v in frame[col]]
    return frame


@dataclass
class Index:
    """A loaded index folder: vectors, their items, and optionally the HNSW graph."""

    path: Path
    meta: dict[str, Any]
    embeddings: Any  # np.ndarray [N, D] float32, normalised rows
    items: Any  # pandas DataFrame, row i describes embeddings[i]
    ann: Any = None
    ef_search: int = HNSW_EF_SEARCH
    _lock: Any = field(default=None, repr=False)

    @property
    def count(self) -> int:
        return int(self.embeddings.shape[0])

    @property
    def dim(self) -> int:
        return int(self.embeddings.shape[1])

    @property
    def run(self) -> str:
        return str(self.meta["run"])

    @classmethod
    def load(cls, path: str | Path, *, use_ann: bool = True) -> Index:
        """Read an index folder written by build_index; the graph only when use_ann."""
        import numpy as np
        import pandas as pd

        folder = Path(path)
        meta_path = folder / "index.json"
        if not meta_path.is_file():
            raise IndexFolderError(f"{folder} is not an index folder (index.json is missing); "
                                   f"build one with `mumic index RUN MANIFEST --out {folder}`")
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise IndexFolderError(f"{meta_path} is not readable JSON ({e}); rebuild the index") from None
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise IndexFolderError(f"{meta_path}: not a {FORMAT} index; rebuild it with this version of mumic")
        for key in ("run", "run_fingerprint", "dim", "count", "backend"):
            if key not in meta:
                raise IndexFolderError(f"{meta_path} lacks '{key}'; rebuild the index")
        if "file_digests" not in meta:
            log.warning("%s records no file digests (written by an older mumic), so a file swapped in from another "
                        "index would go unnoticed; rebuild the index to have its files checked", meta_path)
        _check_bound(folder, meta, "embeddings.npy")
        try:
            emb = np.load(folder / "embeddings.npy", allow_pickle=False)
        except (OSError, ValueError) as e:
            raise IndexFolderError(f"{folder / 'embeddings.npy'} is missing or unreadable ({e}); rebuild the index") from None
        if emb.ndim != 2 or emb.shape != (int(meta["count"]), int(meta["dim"])) or emb.dtype != np.float32:
            raise IndexFolderError(
                f"{folder / 'embeddings.npy'} has shape {emb.shape} ({emb.dtype}); index.json says "
                f"{meta['count']} x {meta['dim']} float32: rebuild the index"
            )
        _check_bound(folder, meta, "items.parquet")
        try:
            frame = pd.read_parquet(folder / "items.parquet")
        except Exception as e:  # pyarrow raises several types for a missing or damaged file
            raise IndexFolderError(f"{folder / 'items.parquet'} is missing or unreadable ({e}); rebuild the index") from None
        if len(frame) != len(emb):
            raise IndexFolderError(f"{folder}: items.parquet has {len(frame)} rows for {len(emb)} embeddings; rebuild the index")
        ann = None
        if use_ann and meta["backend"] == "faiss":
            faiss = _faiss()
            ann_path = folder / ANN_FILE
            if not ann_path.is_file():
                raise IndexFolderError(f"{ann_path} is missing; rebuild the index, or search with --exact")
            _check_bound(folder, meta, ANN_FILE)
            try:
                ann = faiss.read_index(str(ann_path))
            except RuntimeError as e:
                raise IndexFolderError(f"{ann_path} is not a readable faiss index ({str(e).splitlines()[0]}); rebuild the index") from None
            if ann.ntotal != len(emb) or ann.d != emb.shape[1]:
                raise IndexFolderError(f"{ann_path} holds {ann.ntotal} x {ann.d} vectors, the embeddings {emb.shape}; rebuild the index")
        ef = int(meta.get("hnsw", {}).get("ef_search", HNSW_EF_SEARCH))
        import threading

        return cls(path=folder, meta=meta, embeddings=emb, items=frame, ann=ann, ef_search=ef, _lock=threading.Lock())

    def check_run(self, run_dir: str | Path) -> None:
        """Refuse a run whose embeddings live in another space than this index's."""
        fp = run_fingerprint(run_dir)
        if fp != self.meta["run_fingerprint"]:
            raise IndexFolderError(
                f"index {self.path} was built with the run {self.meta['run']}, whose weights differ from "
                f"{run_dir}; its embeddings are not comparable: rebuild it with `mumic index {run_dir} MANIFEST --out ...`"
            )

    def search(self, queries: Any, k: int = 10, *, exact: bool = False) -> tuple[Any, Any]:
        """(scores, ids), each [Q, min(k, N)], best first, for normalised query rows [Q, D].

        Exact search is one matrix product; otherwise the HNSW graph answers (falling back
        to exact where the index has none).
        """
        import numpy as np

        q = np.ascontiguousarray(np.atleast_2d(np.asarray(queries, dtype=np.float32)))
        if q.shape[1] != self.dim:
            raise MumicError(f"query vectors have dimension {q.shape[1]}, the index {self.dim}")
        k = max(0, min(int(k), self.count))
        if k == 0:
            return np.zeros((len(q), 0), np.float32), np.zeros((len(q), 0), np.int64)
        if exact or self.ann is None:
            return exact_search(self.embeddings, q, k)
        with self._lock:  # efSearch is a property of the shared graph object
            self.ann.hnsw.efSearch = max(self.ef_search, k)
            scores, ids = self.ann.search(q, k)
        return scores, ids.astype(np.int64)

    def item(self, i: int) -> dict[str, Any]:
        """Row i of the items (image path and manifest columns) as plain JSON values; a
        manifest column named like a result field (rank, score, id) gets a `manifest_` prefix."""
        row = self.items.iloc[int(i)]
        return {(f"manifest_{k}" if k in RESULT_FIELDS else str(k)): _json_safe(v) for k, v in row.items()}

    def results(self, scores: Any, ids: Any) -> list[dict[str, Any]]:
        """One query's hits as records: rank, score, id, then the item's columns."""
        out = []
        for rank, (s, i) in enumerate(zip(scores.tolist(), ids.tolist()), start=1):
            if i < 0:  # the graph found fewer than k
                continue
            out.append({"rank": rank, "score": round(float(s), 6), "id": int(i), **self.item(i)})
        return out


def exact_search(embeddings: Any, queries: Any, k: int) -> tuple[Any, Any]:
    """Exact top-k by inner product: (scores, ids), each [Q, k], best first, ties by id."""
    import numpy as np

    s = queries @ embeddings.T
    k = min(k, s.shape[1])
    part = np.argpartition(-s, k - 1, axis=1)[:, :k] if k < s.shape[1] else np.broadcast_to(np.arange(s.shape[1]), s.shape).copy()
    top = np.take_along_axis(s, part, 1)
    order = np.lexsort((part, -top), axis=1)  # best first, ties by id
    ids = np.take_along_axis(part, order, 1).astype(np.int64)
    return np.take_along_axis(s, ids, 1).astype(np.float32), ids


def build_hnsw(embeddings: Any, *, m: int = HNSW_M, ef_construction: int = HNSW_EF_CONSTRUCTION) -> Any:
    """A faiss HNSW graph (inner product) over normalised rows, built on one thread so the
    same vectors always give the same graph."""
    faiss = _faiss()
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        index = faiss.IndexHNSWFlat(int(embeddings.shape[1]), int(m), faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = int(ef_construction)
        if len(embeddings):
            index.add(embeddings)
    finally:
        faiss.omp_set_num_threads(threads)
    return index


def write_index(
    out: str | Path,
    embeddings: Any,
    frame: Any,
    *,
    run_dir: str | Path,
    manifest: str | Path | None = None,
    backend: str = "faiss",
    overwrite: bool = False,
    hnsw_m: int = HNSW_M,
    ef_construction: int = HNSW_EF_CONSTRUCTION,
    ef_search: int = HNSW_EF_SEARCH,
) -> Path:
    """Write an index folder from normalised embeddings [N, D] and their items (a DataFrame
    with an `image` column). The folder appears complete or not at all."""
    import numpy as np

    if backend not in BACKENDS:
        raise ConfigError(f"unknown index backend {backend!r}; use one of {', '.join(BACKENDS)}")
    out = Path(out)
    check_output_folder(out, overwrite, marker="index.json", what="an index")
    emb = np.ascontiguousarray(np.asarray(embeddings, dtype=np.float32))
    if emb.ndim != 2 or len(emb) != len(frame):
        raise MumicError(f"embeddings {emb.shape} do not match {len(frame)} items")
    with atomic_folder(out) as tmp:
        np.save(tmp / "embeddings.npy", emb, allow_pickle=False)
        _parquet_safe(frame.reset_index(drop=True)).to_parquet(tmp / "items.parquet", index=False)
        meta: dict[str, Any] = {
            "format": FORMAT,
            "run": str(Path(run_dir).resolve()),
            "run_fingerprint": run_fingerprint(run_dir),
            "manifest": str(Path(manifest).resolve()) if manifest else None,
            "count": int(len(emb)),
            "dim": int(emb.shape[1]),
            "metric": METRIC,
            "normalized": True,
            "backend": backend,
            "files": {"embeddings": "embeddings.npy", "items": "items.parquet"},
        }
        if backend == "faiss":
            t0 = time.perf_counter()
            graph = build_hnsw(emb, m=hnsw_m, ef_construction=ef_construction)
            _faiss().write_index(graph, str(tmp / ANN_FILE))
            meta["files"]["ann"] = ANN_FILE
            meta["hnsw"] = {"library": "faiss", "M": hnsw_m, "ef_construction": ef_construction, "ef_search": ef_search}
            log.info("built an HNSW graph over %d vectors in %.1f s", len(emb), time.perf_counter() - t0)
        meta["file_digests"] = {name: _file_record(tmp / name) for name in meta["files"].values()}
        (tmp / "index.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return out


def build_index(
    run_dir: str | Path,
    inputs: str | Path | Sequence[str | Path],
    out: str | Path,
    *,
    backend: str = "faiss",
    overwrite: bool = False,
    batch_size: int = 64,
    num_workers: int = 0,
    device: str = "auto",
    progress: bool = True,
    allow_outside: bool = False,
    allow_duplicates: bool = False,
    engine: str = "auto",
) -> Path:
    """`mumic index`: embed the images of `inputs` (a manifest, or a list of image files,
    folders of images, manifests and patterns, as `mumic predict` takes) with a run and
    write an index folder (`engine` runs the image tower, as in Predictor.set_engine)."""
    import torch.nn.functional as F

    from mumic.data.inputs import InputsManifest, inputs_manifest
    from mumic.evaluate import manifest_embeddings
    from mumic.predictor import Predictor

    if backend not in BACKENDS:
        raise ConfigError(f"unknown index backend {backend!r}; use one of {', '.join(BACKENDS)}")
    if backend == "faiss":
        _faiss()  # fail before the slow part
    check_output_folder(Path(out), overwrite, marker="index.json", what="an index")
    given = [inputs] if isinstance(inputs, (str, Path)) else list(inputs)
    manifest = inputs_manifest(given, allow_outside=allow_outside, allow_duplicates=allow_duplicates)
    manifest.check_images_exist()
    manifest_path = None if isinstance(manifest, InputsManifest) else manifest.path  # recorded when one manifest is indexed
    model = Predictor.from_run(run_dir, device=device).set_engine(engine)
    raw = manifest_embeddings(model, manifest.images, batch_size=batch_size, num_workers=num_workers, progress=progress)
    emb = F.normalize(raw.float(), dim=-1).numpy()
    frame = manifest.frame.reset_index(drop=True).copy()
    frame["image"] = [str(p) for p in manifest.images]
    path = write_index(out, emb, frame, run_dir=run_dir, manifest=manifest_path, backend=backend, overwrite=overwrite)
    log.info("indexed %d images of %s into %s", len(emb), manifest_path or f"{len(given)} inputs", path)
    return path


def index_from_embeddings(run_dir: str | Path, embeddings: str | Path, out: str | Path, *, backend: str = "faiss",
                          overwrite: bool = False) -> Path:
    """`mumic index RUN --from-embeddings FILE.parquet`: an index over the embeddings that
    `mumic embed` wrote, without embedding again. The file records the run that made it; a
    file of another run (or of other weights of this one) is refused."""
    import numpy as np
    import pyarrow.parquet as pq

    from mumic.batch import EMBEDDINGS_RUN_KEY

    path = Path(embeddings)
    if not path.is_file():
        raise ConfigError(f"--from-embeddings {path} does not exist; write it with `mumic embed RUN INPUTS --out {path.name}`")
    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises several unrelated types for bad files
        raise ConfigError(f"--from-embeddings {path} is not a readable Parquet file: {e}") from None
    recorded = (table.schema.metadata or {}).get(EMBEDDINGS_RUN_KEY.encode(), b"").decode()
    if not recorded:
        raise RunError(f"{path} does not say which run made it (no {EMBEDDINGS_RUN_KEY}); embed again with `mumic embed`")
    if recorded != run_fingerprint(run_dir):
        raise RunError(f"{path} was embedded with another run (or other weights of {run_dir}); embed again with this run")
    if "embedding" not in table.column_names or table.num_rows == 0:
        raise ConfigError(f"{path} has no embeddings (an 'embedding' column with at least one row)")
    emb = np.stack(table.column("embedding").to_numpy(zero_copy_only=False)).astype(np.float32)
    frame = table.drop(["embedding"]).to_pandas()
    written = write_index(out, emb, frame, run_dir=run_dir, manifest=None, backend=backend, overwrite=overwrite)
    log.info("indexed %d embeddings of %s into %s", len(emb), path, written)
    return written


def query_embedding(model: Any, *, text: str | None = None, image: str | Path | None = None) -> Any:
    """[1, D] normalised query: a text embedded in the image space, or an image file."""
    if (text is None) == (image is None):
        raise MumicError("give exactly one query: a text or an image")
    if text is not None:
        if not text.strip():
            raise MumicError("the query text is empty")
        emb = model.embed_texts([text])
        model.clear_text_cache()
        return emb
    from mumic.data.images import load_image

    assert image is not None  # exactly one of text / image, checked above
    img = load_image(Path(image), size_hint=model.backbone.image_size)
    return model.embed_images([img])


def search_index(
    index_dir: str | Path,
    *,
    text: str | None = None,
    image: str | Path | None = None,
    k: int = 10,
    exact: bool = False,
    run_dir: str | Path | None = None,
    device: str = "auto",
    engine: str = "auto",
) -> list[dict[str, Any]]:
    """`mumic search`: the k nearest indexed images of a text or image query, best first.
    `engine` runs the towers, as in Predictor.set_engine (on CPUs, onnxruntime)."""
    from mumic.predictor import Predictor

    if k < 1:
        raise ConfigError(f"-k must be at least 1, got {k}")
    index = Index.load(index_dir, use_ann=not exact)
    run = Path(run_dir) if run_dir else Path(index.run)
    if not run.is_dir():
        raise RunError(f"the index's run {run} does not exist; pass --run with the run that built {index_dir}")
    index.check_run(run)
    model = Predictor.from_run(run, device=device).set_engine(engine)
    q = query_embedding(model, text=text, image=image)
    scores, ids = index.search(q, k, exact=exact)
    return index.results(scores[0], ids[0])


def recall_at_k(approx_ids: Sequence[Sequence[int]], exact_ids: Sequence[Sequence[int]], k: int) -> float:
    """Mean fraction of each query's exact top-k that the approximate top-k found."""
    total = 0.0
    for a, e in zip(approx_ids, exact_ids):
        e = list(e)[:k]
        total += len(set(list(a)[:k]) & set(e)) / max(1, len(e))
    return total / max(1, len(approx_ids))

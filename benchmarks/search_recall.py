"""Nearest-neighbour search on a run's real image embeddings: HNSW (faiss, the shipped
settings) vs. exact search, both in this process: recall@10 and per-query latency.

    python benchmarks/search_recall.py [--run runs/demo/mumic] [--manifest data/emoji/manifest.csv] [--quick]

Queries: every label's prompt embedding (text -> image search) and a sample of the
images themselves (image -> image). Ends with `ratio=<exact p50 latency / HNSW p50>`.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch.nn.functional as F

from mumic.data.manifest import read_manifest
from mumic.evaluate import manifest_embeddings
from mumic.predictor import Predictor
from mumic.search import HNSW_EF_SEARCH, build_hnsw, exact_search, recall_at_k


def timed(fn, queries):
    lat, out = [], []
    for q in queries:
        t = time.perf_counter()
        out.append(fn(q[None]))
        lat.append((time.perf_counter() - t) * 1000)
    return np.array(lat), out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", default="runs/demo/mumic")
    ap.add_argument("--manifest", default="data/emoji/manifest.csv")
    ap.add_argument("--quick", action="store_true", help="embed at most 1,000 images")
    ap.add_argument("-k", type=int, default=10)
    a = ap.parse_args()
    model = Predictor.from_run(a.run, device="cpu")
    m = read_manifest(a.manifest, require_labels=False, allow_outside=True)
    if a.quick:
        m = m.select(np.arange(min(1000, len(m))))
    from mumic.features import cached_features

    feats = cached_features(model.backbone, m.images, cache_dir=model.config.cache_dir, progress=False) \
        if model.config.image_tower == "frozen" else None
    emb = F.normalize(manifest_embeddings(model, m.images, features=feats), dim=-1).numpy().astype(np.float32)
    text_q = model.embed_texts([t for l in model.labels for t in l.texts(model.templates)[:1]]).astype(np.float32)
    rng = np.random.default_rng(0)
    img_q = emb[rng.choice(len(emb), size=min(200, len(emb)), replace=False)]
    t = time.perf_counter()
    index = build_hnsw(emb)
    build_s = time.perf_counter() - t
    index.hnsw.efSearch = HNSW_EF_SEARCH
    print(f"{len(emb)} image embeddings (dim {emb.shape[1]}) from {a.run}; HNSW build {build_s:.2f} s, efSearch {HNSW_EF_SEARCH}")
    print(f"{'queries':>14} {'n':>5} {f'recall@{a.k}':>10} {'exact p50/p99 ms':>18} {'HNSW p50/p99 ms':>17}")
    ratios = []
    for name, qs in (("text->image", text_q), ("image->image", img_q)):
        lat_e, ex = timed(lambda q: exact_search(emb, q, a.k)[1][0], qs)
        lat_h, ap_ = timed(lambda q: index.search(q, a.k)[1][0], qs)
        r = recall_at_k(ap_, ex, a.k)
        print(f"{name:>14} {len(qs):>5} {r:>10.4f} {np.percentile(lat_e, 50):>8.3f}/{np.percentile(lat_e, 99):<8.3f} "
              f"{np.percentile(lat_h, 50):>8.3f}/{np.percentile(lat_h, 99):<8.3f}")
        ratios.append(np.percentile(lat_e, 50) / np.percentile(lat_h, 50))
    print(f"ratio={ratios[0]:.2f}")


if __name__ == "__main__":
    main()

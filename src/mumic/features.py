"""Frozen image-tower features, computed once and cached on disk.

When the image tower is frozen, f_img(x) never changes during training, so it is computed
once per image and reused by every epoch and every later run. The cache is keyed by the
backbone (its spec, resolution and a hash of the tower's weights) and by each image
file's content, so renamed files hit and edited files miss. Each call that computes new
features writes one safetensors shard atomically; shards are never rewritten.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm.auto import tqdm

from mumic.backbones.base import TEXT_TOWER, Backbone
from mumic.backbones.onnx import OnnxImageTower, resolve_engine
from mumic.config import default_cache_dir
from mumic.data.dataset import file_digest, pixel_batches
from mumic.errors import ImageError, RunError
from mumic.io import load_tensors, save_tensors

log = logging.getLogger(__name__)


def backbone_key(backbone: Backbone) -> str:
    """A key for the image tower's exact function: config plus a hash of its frozen weights
    (the text tower's are not part of it: they do not change image features, and a
    predictor may not have loaded them)."""
    h = hashlib.blake2b(digest_size=12)
    cfg = {k: v for k, v in backbone.config().items() if k not in ("seed", "image_head")}
    h.update(json.dumps(cfg, sort_keys=True).encode())
    h.update(str(backbone.image_size).encode())
    prefixes = backbone.tuned_prefixes()
    for name, t in sorted(backbone.state_dict().items()):
        if any(name.startswith(p) for p in prefixes) or name.startswith(TEXT_TOWER + "."):
            continue  # heads and tuned parts are trained; the key covers frozen weights only
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class FeatureCache:
    """digest -> feature vector, stored as safetensors shards under cache_dir/key/.

    A shard is read through io.load_tensors, so one whose tensors no longer match the
    digest recorded when it was written (an edited or corrupted file) is never used: its
    features count as missing (see :meth:`check`), are computed again and written anew."""

    def __init__(self, root: Path, key: str) -> None:
        self.dir = Path(root) / key
        self.index: dict[str, tuple[Path, int]] = {}
        self._loaded: dict[Path, torch.Tensor] = {}
        self._bad: set[Path] = set()
        self._rows: dict[Path, int] = {}
        if self.dir.is_dir():
            for shard in sorted(self.dir.glob("shard-*.safetensors")):
                try:
                    with safe_open(str(shard), framework="pt") as f:
                        digests = json.loads(f.metadata()["digests"])
                except Exception as e:  # a broken shard is skipped, never trusted
                    log.warning("ignoring unreadable feature shard %s (%s)", shard, e)
                    continue
                self._rows[shard] = len(digests)
                for i, d in enumerate(digests):
                    self.index[d] = (shard, i)

    def _features(self, shard: Path) -> torch.Tensor | None:
        """The [rows, F] features of a shard, verified against its digest; None (and the
        shard's entries dropped from the index, with a warning) when they fail."""
        if shard in self._loaded:
            return self._loaded[shard]
        rows = self._rows.get(shard, 0)
        try:
            feats = load_tensors(shard).get("features")
            if feats is None or feats.dim() != 2 or len(feats) != rows or not feats.is_floating_point():
                raise RunError(f"{shard} holds no [rows, F] float 'features' tensor")
        except RunError as e:
            log.warning("feature cache shard %s is damaged (%s); computing its %d features again", shard, e, rows)
            self.index = {d: v for d, v in self.index.items() if v[0] != shard}
            self._bad.add(shard)
            return None
        self._loaded[shard] = feats
        return feats

    def check(self, digests: list[str | None]) -> None:
        """Verify every shard holding one of ``digests``: a damaged shard's features leave
        the index, so the caller computes them again."""
        for shard in {self.index[d][0] for d in digests if d is not None and d in self.index}:
            self._features(shard)

    def get(self, digests: list[str]) -> torch.Tensor:
        by_shard: dict[Path, list[tuple[int, int]]] = {}
        for pos, d in enumerate(digests):
            shard, row = self.index[d]
            by_shard.setdefault(shard, []).append((pos, row))
        out: torch.Tensor | None = None
        for shard, pairs in by_shard.items():
            feats = self._features(shard)
            if feats is None:
                raise RunError(f"feature cache shard {shard} is damaged; run the command again to compute its features anew")
            if out is None:
                out = torch.empty((len(digests), feats.shape[1]), dtype=feats.dtype)
            at = torch.tensor([p for p, _ in pairs])
            rows = torch.tensor([r for _, r in pairs])
            out[at] = feats[rows]
        assert out is not None
        return out

    def put(self, digests: list[str], feats: torch.Tensor) -> None:
        name = hashlib.blake2b("".join(digests).encode(), digest_size=8).hexdigest()
        shard = self.dir / f"shard-{name}.safetensors"
        save_tensors(shard, {"features": feats.float()}, metadata={"digests": json.dumps(digests)})
        self._loaded.pop(shard, None)
        self._rows[shard] = len(digests)
        for i, d in enumerate(digests):
            self.index[d] = (shard, i)
        for bad in self._bad - {shard}:  # left the index when found damaged; their features are computed anew
            bad.unlink(missing_ok=True)
        self._bad.clear()


Failure = tuple[int, str]  # (row in the paths given, reason)


@torch.inference_mode()
def extract_features(
    backbone: Backbone,
    paths: list[Path],
    *,
    batch_size: int = 64,
    num_workers: int = 0,
    device: torch.device | str = "cpu",
    amp: bool = True,
    progress: bool = True,
    failures: list[Failure] | None = None,
    decode: str = "cpu",
    engine: str = "torch",
    onnx_cache_dir: Path | None = None,
) -> torch.Tensor:
    """[N, F] tower features of the images, without any cache.

    With a `failures` list, unreadable images do not stop the job: their rows are NaN
    and (row, reason) is appended to the list. ``engine`` "onnxruntime" (or "auto" on
    the CPU) runs the tower in onnxruntime (its graph cached under ``onnx_cache_dir``)."""
    device = torch.device(device)
    tower: Callable[[torch.Tensor], torch.Tensor] = backbone.image_features
    if resolve_engine(engine, device) == "onnxruntime":
        tower = OnnxImageTower(backbone, cache_dir=onnx_cache_dir)
    skip = failures is not None
    batches = pixel_batches(list(paths), backbone.image_size, batch_size, device=device, num_workers=num_workers,
                            skip_bad=skip, decode=decode)
    out = []
    use_amp = amp and device.type == "cuda"
    for idx, px, reasons in tqdm(batches, desc="image features", unit="batch", disable=not progress, leave=False):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
            f = tower(px).float().cpu()
        if reasons is not None:
            bad = [r for r, reason in enumerate(reasons) if reason]
            for r in bad:
                failures.append((int(idx[r]), reasons[r]))  # type: ignore[union-attr]
            f[bad] = float("nan")
        out.append(f)
    if not out:
        return torch.zeros((0, backbone.image_feature_dim))
    return torch.cat(out)


def cached_features(
    backbone: Backbone,
    paths: list[Path],
    cache_dir: str | Path | None = None,
    failures: list[Failure] | None = None,
    **kw,
) -> torch.Tensor:
    """Tower features of the images, computing only those not yet in the cache.

    With a `failures` list, unreadable images (including missing files) give NaN rows
    and a (row, reason) entry instead of an error; they are never cached."""
    root = Path(cache_dir) if cache_dir else default_cache_dir()
    digests: list[str | None] = []
    for i, p in enumerate(paths):
        try:
            digests.append(file_digest(p))
        except ImageError as e:
            if failures is None:
                raise
            failures.append((i, str(e)))
            digests.append(None)
    cache = FeatureCache(root, backbone_key(backbone))
    cache.check(digests)
    missing: dict[str, Path] = {}
    for d, p in zip(digests, paths):
        if d is not None and d not in cache.index and d not in missing:
            missing[d] = p
    if missing:
        log.info("computing image features for %d of %d images (cache: %s)", len(missing), len(paths), cache.dir)
        bad: list[Failure] | None = [] if failures is not None else None
        feats = extract_features(backbone, list(missing.values()), failures=bad, onnx_cache_dir=root, **kw)
        keys = list(missing)
        if bad:
            bad_rows = {r for r, _ in bad}
            bad_digests = {keys[r]: reason for r, reason in bad}
            good = [r for r in range(len(keys)) if r not in bad_rows]
            if good:
                cache.put([keys[r] for r in good], feats[good])
            for i, d in enumerate(digests):
                if d in bad_digests:
                    failures.append((i, bad_digests[d]))  # type: ignore[union-attr]
                    digests[i] = None
        else:
            cache.put(keys, feats)
    else:
        found = sum(d is not None for d in digests)
        unreadable = f" ({len(paths) - found} unreadable)" if found < len(paths) else ""
        log.info("%d of %d image features found in the cache %s%s", found, len(paths), cache.dir, unreadable)
    ok = [i for i, d in enumerate(digests) if d is not None]
    out = torch.full((len(paths), backbone.image_feature_dim), float("nan"))
    if ok:
        out[ok] = cache.get([digests[i] for i in ok])  # type: ignore[misc]
    if failures:
        failures.sort()
    return out

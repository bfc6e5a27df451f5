"""--on-bad-image: `fail` stops with the file and reason; `skip` goes on and lists every
skipped file with its reason. Never a silent drop."""

import csv
import json
import shutil

import pandas as pd
import pytest

import mumic.batch as ev
from mumic.data.manifest import read_manifest
from mumic.data.synthetic import make_shapes
from mumic.errors import ImageError
from mumic.predictor import Predictor
from mumic.train import fit


@pytest.fixture(scope="module")
def dirty(tmp_path_factory):
    """A shapes manifest where some train, val and test rows point at broken files."""
    root = make_shapes(tmp_path_factory.mktemp("dirty"), n=90, size=48, seed=5).parent
    df = pd.read_csv(root / "manifest.csv", dtype=str, keep_default_na=False)
    broken = {}
    for split, kind in (("train", "empty"), ("train", "text"), ("val", "truncated"), ("test", "missing")):
        i = df.index[df["split"] == split][len([k for k in broken.values() if k[0] == split])]
        path = root / df.at[i, "image"]
        if kind == "empty":
            path.write_bytes(b"")
        elif kind == "text":
            path.write_text("not an image")
        elif kind == "truncated":
            data = path.read_bytes()
            path.write_bytes(data[: len(data) // 2])
        else:
            path.unlink()
        broken[i] = (split, kind, str(path))
    return root, broken


def _cfg(root, out, tiny, **kw):
    return dict(manifest=str(root / "manifest.csv"), labels_file=str(root / "labels.yaml"), out=str(out), backbone=f"hf:{tiny}",
                max_steps=4, eval_every=2, cache_dir=str(out) + "-cache", progress=False, **kw)


@pytest.mark.parametrize("image_tower", ["frozen", "last"])
def test_training_fails_on_a_bad_image_naming_it(dirty, tmp_path, tiny_clip_dir, image_tower):
    root, broken = dirty
    # make the missing-file check pass so the decoding error is what stops the run
    missing = [p for s, k, p in broken.values() if k == "missing"][0]
    shutil.copy(root / "labels.yaml", missing)  # a file that exists but is not an image
    try:
        with pytest.raises(ImageError) as e:
            fit(**_cfg(root, tmp_path / "run", tiny_clip_dir, image_tower=image_tower))
        assert any(p in str(e.value) for _, _, p in broken.values())
    finally:
        (root / missing).unlink()


@pytest.mark.parametrize("image_tower", ["frozen", "last"])
def test_training_skips_bad_images_and_lists_them(dirty, tmp_path, tiny_clip_dir, image_tower):
    root, broken = dirty
    run = fit(**_cfg(root, tmp_path / "run", tiny_clip_dir, image_tower=image_tower, on_bad_image="skip"))
    with open(run / "skipped.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert sorted((r["split"], int(r["line"])) for r in rows) == sorted((s, i + 2) for i, (s, _, _) in broken.items())
    for r in rows:
        assert r["reason"]
    m = json.loads((run / "metrics.json").read_text())
    assert m["skipped_images"] == {"train": 2, "val": 1, "test": 1}
    assert m["train_images"] == sum(1 for s in read_manifest(root / "manifest.csv").splits if s == "train") - 2


def test_predict_and_embed_skip_and_list(dirty, tmp_path, tiny_clip_dir):
    root, broken = dirty
    run = fit(**_cfg(root, tmp_path / "run", tiny_clip_dir, on_bad_image="skip"))
    model = Predictor.from_run(run, device="cpu")
    m = read_manifest(root / "manifest.csv")
    with pytest.raises(ImageError):
        ev.predict_manifest(model, m, tmp_path / "p.jsonl", progress=False)
    n = ev.predict_manifest(model, m, tmp_path / "p.jsonl", progress=False, on_bad_image="skip", shard_rows=30)
    assert n == len(m) - len(broken)
    preds = [json.loads(l)["image"] for l in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert all(p not in preds for _, _, p in broken.values())
    skipped = pd.read_csv(tmp_path / "p.jsonl.skipped.csv")
    # counted as training counts them: manifest lines (the header is line 1), with the image
    assert sorted(skipped["line"]) == sorted(i + 2 for i in broken)
    assert sorted(skipped["image"]) == sorted(str(m.images[i]) for i in broken)
    n = ev.embed_manifest(model, m, tmp_path / "e.parquet", progress=False, on_bad_image="skip", shard_rows=30)
    assert n == len(m) - len(broken)
    assert sorted(pd.read_csv(tmp_path / "e.parquet.skipped.csv")["line"]) == sorted(i + 2 for i in broken)

"""Pre-annotations: `predict --format labelstudio|coco`, and the round trip back through `data import`."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from mumic.batch import predict_manifest, predict_preannotations
from mumic.cli import main
from mumic.data.manifest import read_manifest
from mumic.data.synthetic import make_shapes
from mumic.errors import ConfigError
from mumic.predictor import Predictor
from mumic.run import run_fingerprint
from mumic.train import fit


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, tiny_clip_dir):
    """A run trained for two steps on shapes, its thresholds set between the middle two
    scores of each label so that about half the images get each label (and some none)."""
    tmp = tmp_path_factory.mktemp("pre")
    manifest = make_shapes(tmp / "shapes", n=24, size=40, seed=3)
    run = Path(fit(manifest=str(manifest), labels_file=str(manifest.parent / "labels.yaml"), out=str(tmp / "run"),
                   backbone=f"hf:{tiny_clip_dir}", max_steps=2, eval_every=2, cache_dir=str(tmp / "cache"), engine="torch", progress=False))
    model = Predictor.from_run(run, device="cpu")
    m = read_manifest(manifest)
    probe = tmp / "probe.jsonl"
    predict_manifest(model, m, probe, progress=False)
    recs = [json.loads(line) for line in probe.read_text().splitlines()]
    per_label = {}
    for name in recs[0]["scores"]:
        s = sorted(r["scores"][name] for r in recs)
        per_label[name] = (s[len(s) // 2 - 1] + s[len(s) // 2]) / 2
    (run / "thresholds.json").write_text(json.dumps({"per_label": per_label, "default": 0.5}))
    model = Predictor.from_run(run, device="cpu")
    ref = tmp / "ref.jsonl"
    predict_manifest(model, m, ref, progress=False)
    reference = {r["image"]: r for r in map(json.loads, ref.read_text().splitlines())}
    assert any(not r["predicted"] for r in reference.values()) and any(len(r["predicted"]) > 1 for r in reference.values())
    return run, manifest, model, m, reference


def by_score(rec):
    return sorted(rec["predicted"], key=lambda n: -rec["scores"][n])


def test_labelstudio_tasks_round_trip(tiny_run, tmp_path, capsys):
    run, manifest, _, m, reference = tiny_run
    images_root = manifest.parent / "images"
    tasks_path = tmp_path / "tasks.json"
    assert main(["predict", str(run), str(manifest), "--format", "labelstudio", "--out", str(tasks_path), "--engine", "torch"]) == 0
    assert f"wrote labelstudio pre-annotations of {len(m)} images to {tasks_path}" in capsys.readouterr().err
    assert not (tmp_path / "tasks.json.predictions.jsonl").exists()  # the records were a step, not an output
    tasks = json.loads(tasks_path.read_text())
    fingerprint = run_fingerprint(run)
    assert len(tasks) == len(m)
    for task, image in zip(tasks, m.images):
        rec = reference[str(image)]
        assert task["data"]["image"] == "/data/local-files/?d=" + os.path.relpath(image, images_root)
        [pred] = task["predictions"]
        assert pred["model_version"] == fingerprint
        [result] = pred["result"]
        assert (result["type"], result["from_name"], result["to_name"]) == ("choices", "choice", "image")
        assert result["value"]["choices"] == by_score(rec)
        assert task["data"]["mumic_scores"] == {n: rec["scores"][n] for n in by_score(rec)}
        expected = min(rec["scores"][n] for n in rec["predicted"]) if rec["predicted"] else 1 - max(rec["scores"].values())
        assert pred["score"] == pytest.approx(expected, abs=1e-6)

    # unreviewed, the tasks load back to the same decisions (an image with none: an untagged row)
    back = manifest.parent / "ls-back.csv"  # beside the images, as a user keeps a manifest
    assert main(["data", "import", "labelstudio", str(tasks_path), "--images-root", str(images_root), "--use-predictions",
                 "--out", str(back)]) == 0
    got = read_manifest(back)
    assert [str(p) for p in got.images] == [str(p) for p in m.images]
    assert got.labels == [by_score(reference[str(p)]) for p in m.images]

    # a reviewer corrects one task: its annotation wins over the prediction; without
    # --use-predictions only the reviewed task comes back
    tasks[2]["annotations"] = [{"id": 1, "result": [{"type": "choices", "from_name": "choice", "to_name": "image",
                                                      "value": {"choices": ["red", "many"]}}], "was_cancelled": False}]
    tasks_path.write_text(json.dumps(tasks))
    assert main(["data", "import", "labelstudio", str(tasks_path), "--images-root", str(images_root), "--use-predictions",
                 "--out", str(back), "--overwrite"]) == 0
    assert read_manifest(back).labels[2] == ["red", "many"]
    reviewed = manifest.parent / "ls-reviewed.csv"
    assert main(["data", "import", "labelstudio", str(tasks_path), "--images-root", str(images_root), "--out", str(reviewed)]) == 0
    r = read_manifest(reviewed)
    assert [str(p) for p in r.images] == [str(m.images[2])] and r.labels == [["red", "many"]]


def test_coco_results_layout_and_round_trip(tiny_run, tmp_path):
    run, manifest, model, m, reference = tiny_run
    out = tmp_path / "results.json"
    n = predict_preannotations(model, m, out, "coco", images_root=manifest.parent, progress=False)
    doc = json.loads(out.read_text())
    names = [s.name for s in model.scored_labels]
    assert n == len(m)
    assert doc["info"] == {"description": "mumic predictions", "model_version": run_fingerprint(run)}
    assert doc["categories"] == [{"id": c, "name": name} for c, name in enumerate(names, start=1)]
    assert doc["images"] == [{"id": i, "file_name": os.path.relpath(p, manifest.parent)} for i, p in enumerate(m.images, start=1)]
    expected = [(i, names.index(name) + 1, reference[str(p)]["scores"][name])
                for i, p in enumerate(m.images, start=1) for name in by_score(reference[str(p)])]
    assert [(a["image_id"], a["category_id"], a["score"]) for a in doc["annotations"]] == expected
    assert [a["id"] for a in doc["annotations"]] == list(range(1, len(expected) + 1))

    back = manifest.parent / "coco-back.jsonl"
    main(["data", "import", "coco", str(out), "--images-root", str(manifest.parent), "--out", str(back)])
    got = read_manifest(back)
    assert [str(p) for p in got.images] == [str(p) for p in m.images]
    assert got.labels == [by_score(reference[str(p)]) for p in m.images]
    assert np.array_equal(got.targets(names)[0], np.array([[n in reference[str(p)]["predicted"] for n in names] for p in m.images]))


def test_preannotation_options_are_checked(tiny_run, tmp_path, capsys):
    run, manifest, model, m, _ = tiny_run
    assert main(["predict", str(run), str(manifest), "--format", "coco"]) == 2
    assert "mumic: error: --format coco needs --out" in capsys.readouterr().err
    assert main(["predict", str(run), str(manifest), "--images-root", str(tmp_path), "--out", str(tmp_path / "p.jsonl")]) == 2
    assert "--images-root and --url-prefix shape pre-annotations" in capsys.readouterr().err
    with pytest.raises(ConfigError, match=r"is outside --images-root .*; give an images root that holds every input"):
        predict_preannotations(model, m, tmp_path / "t.json", "labelstudio", images_root=tmp_path, progress=False)
    assert not (tmp_path / "t.json").exists()
    (tmp_path / "t.json").write_text("[]")
    with pytest.raises(ConfigError, match="already exists; pass --overwrite"):
        predict_preannotations(model, m, tmp_path / "t.json", "labelstudio", progress=False)

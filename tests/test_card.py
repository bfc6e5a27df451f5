"""The model card: every finished run (and every export) has README.md in the Hugging Face
layout, written from the run's files; its figures are the run's (checked against metrics.json
and an AP recomputed from the run's scores); `mumic card RUN` rewrites it, and never replaces a
README.md someone else wrote without --overwrite."""

import itertools
import json
import shutil

import numpy as np
import pytest
import yaml
from sklearn.metrics import average_precision_score

from mumic.card import MARKER, write_card, write_run_card
from mumic.cli import main
from mumic.config import load_config
from mumic.data.manifest import read_manifest
from mumic.data.synthetic import make_shapes
from mumic.errors import RunError
from mumic.export import export_onnx
from mumic.predictor import Predictor
from mumic.train import fit

SECTIONS = ["## Intended use", "## Training data", "## Training settings", "## Evaluation", "## Calibrated thresholds",
            "## Zero-shot labels", "## Limitations and known biases", "## How to load it"]


@pytest.fixture(scope="module")
def card_run(tmp_path_factory, tiny_clip_dir):
    out = tmp_path_factory.mktemp("card")
    shapes = make_shapes(out / "shapes", n=40, size=64, seed=6).parent
    cfg = {"manifest": str(shapes / "manifest.csv"), "labels_file": str(shapes / "labels.yaml"), "out": str(out / "run"),
           "cache_dir": str(out / "cache"), "batch_size": 16, "eval_every": 2, "max_steps": 2, "warmup_steps": 1,
           "patience": 100, "majority_n": 3, "backbone": f"hf:{tiny_clip_dir}"}
    return fit(load_config(overrides=cfg), progress=False), shapes


def _split(text):
    assert text.startswith("---\n")
    front, body = text[4:].split("\n---\n", 1)
    return yaml.safe_load(front), body


def _table(text, after):
    """The rows of the first Markdown table after the text `after`, as dicts by column."""
    lines = text.split(after, 1)[1].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    block = list(itertools.takewhile(lambda line: line.startswith("|"), lines[start:]))
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in block]
    return [dict(zip(cells[0], r)) for r in cells[2:]]


def test_a_finished_run_has_a_model_card_of_its_own_figures(card_run):
    run, shapes = card_run
    text = (run / "README.md").read_text()
    front, body = _split(text)
    metrics = json.loads((run / "metrics.json").read_text())
    assert front["library_name"] == "mumic" and "mumic" in front["tags"] and "base_model" not in front  # a local base
    result = front["model-index"][0]["results"][0]
    assert result["dataset"]["split"] == "test"
    got = {m["type"]: m["value"] for m in result["metrics"]}
    assert set(got) == set(front["metrics"]) and "gap10" in got
    for k, v in got.items():
        assert v == pytest.approx(metrics["test"][k], abs=1e-6)
    assert body.startswith(MARKER)
    positions = [body.index(s) for s in SECTIONS]
    assert positions == sorted(positions)

    # training data: images per split and the positives of each label, counted from the manifest here
    m = read_manifest(shapes / "manifest.csv")
    images = {r["split"]: int(r["images"]) for r in _table(body, "## Training data")}
    assert images == {s: len(m.split(s)) for s in ("train", "val", "test")}
    counts = {r["label"]: r for r in _table(body, "Positives per label and split:")}
    test_m = m.split("test")
    assert {n: int(r["test"]) for n, r in counts.items()} == {n: sum(n in row for row in test_m.labels) for n in counts}

    # the per-label table: each AP is the run's AP on the test split, recomputed here from its scores
    rows = {r["label"]: r for r in _table(body, "### Per label (test)")}
    model = Predictor.from_run(run, device="cpu")
    names = [l.name for l in model.labels]
    assert set(rows) == set(names)
    probs = model.predict_proba(test_m.images)
    y, _ = test_m.targets(names)
    y = np.asarray(y)
    for j, name in enumerate(names):
        if y[:, j].any():
            assert float(rows[name]["ap"]) == pytest.approx(average_precision_score(y[:, j], probs[:, j]), abs=1.5e-3)
    th = json.loads((run / "thresholds.json").read_text())
    for r in _table(body, "## Calibrated thresholds"):
        assert float(r["threshold"]) == pytest.approx(th["per_label"][r["label"]], abs=1e-4)
    unseen = [l.name for l in model.labels if not l.seen]
    assert unseen and all(n in body.split("## Zero-shot labels", 1)[1].split("##", 1)[0] for n in unseen)
    assert f'Predictor.from_run("{run.name}")' in body


def test_mumic_card_regenerates_it_and_keeps_a_readme_it_did_not_write(card_run, tmp_path, caplog):
    run, _ = card_run
    copy = tmp_path / run.name
    shutil.copytree(run, copy)
    written = (copy / "README.md").read_text()
    (copy / "README.md").unlink()
    assert main(["card", str(copy)]) == 0
    assert (copy / "README.md").read_text() == written  # the same files give the same card

    (copy / "README.md").write_text("# our notes\n")
    assert main(["card", str(copy)]) == 2
    with pytest.raises(RunError, match=r"README.md was not written by mumic .*pass --overwrite"):
        write_card(copy)
    write_run_card(copy)  # at the end of training: a warning, the file kept
    assert (copy / "README.md").read_text() == "# our notes\n"
    assert "model card not written" in caplog.text
    assert main(["card", str(copy), "--overwrite"]) == 0
    assert (copy / "README.md").read_text() == written

    # a run from before metrics.json held the card's figures still gets a card, which says what is missing
    metrics = json.loads((copy / "metrics.json").read_text())
    del metrics["per_label"], metrics["data"]
    (copy / "metrics.json").write_text(json.dumps(metrics))
    assert main(["card", str(copy)]) == 0
    assert "No per-label table was recorded" in (copy / "README.md").read_text()


def test_an_onnx_export_has_the_card_too(card_run, tmp_path):
    run, _ = card_run
    out = tmp_path / "tiny-onnx"
    export_onnx(run, out, verify=False)
    front, body = _split((out / "README.md").read_text())
    assert front["library_name"] == "mumic" and "### Per label (test)" in body
    assert "python tiny-onnx/predict.py photo.jpg" in body

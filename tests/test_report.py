"""A run explains itself: report.md's label counts, per-label AP and thresholds, plots."""

import json
import re

import numpy as np
import pytest
from sklearn.metrics import average_precision_score

from mumic.config import load_config
from mumic.data.manifest import read_manifest
from mumic.data.synthetic import make_shapes
from mumic.predictor import Predictor
from mumic.report import per_label_markdown, per_label_rows
from mumic.train import fit


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_clip_dir):
    root = tmp_path_factory.mktemp("report")
    shapes = make_shapes(root / "shapes", n=90, size=48, seed=4).parent
    cfg = load_config(overrides={
        "manifest": str(shapes / "manifest.csv"), "labels_file": str(shapes / "labels.yaml"), "out": str(root / "run"),
        "cache_dir": str(root / "cache"), "backbone": f"hf:{tiny_clip_dir}", "max_steps": 6,
        "eval_every": 3, "batch_size": 16, "majority_n": 3,
    })
    return fit(cfg, progress=False), shapes


def _table(report: str, heading: str) -> list[list[str]]:
    part = report.split(heading, 1)[1].split("\n## ", 1)[0]
    return [[c.strip() for c in line.strip("|").split("|")] for line in part.splitlines() if line.startswith("| ")]


def test_report_counts_labels_per_split_and_lists_each_label(run):
    run_dir, shapes = run
    report = (run_dir / "report.md").read_text()
    m = read_manifest(shapes / "manifest.csv")
    counts = _table(report, "## labels per split")
    header, rows = counts[0], {r[0]: r[1:] for r in counts[1:]}
    assert header[1:] == ["train", "val", "test"]
    for j, split in enumerate(header[1:]):
        part = m.split(split)
        for name, row in rows.items():
            assert int(row[j]) == sum(name in labels for labels in part.labels), (name, split)
    # the per-label table: AP as scikit-learn computes it, thresholds as the run stores them
    table = _table(report, "## per label (test)")
    assert table[0] == ["label", "seen", "train", "positives", "ap", "threshold", "global threshold"]
    model = Predictor.from_run(run_dir, device="cpu")
    test = m.split("test")
    names = [s.name for s in model.scored_labels]
    probs = model.predict_proba(test.images, labels=names)
    y, _ = test.targets(names, ignore_unknown=True)
    th = json.loads((run_dir / "thresholds.json").read_text())
    by_name = {r[0]: r for r in table[1:]}
    assert set(by_name) == set(names)
    for j, name in enumerate(names):
        r = by_name[name]
        assert int(r[3]) == int(y[:, j].sum())
        if y[:, j].any():
            assert float(r[4]) == pytest.approx(average_precision_score(y[:, j], probs[:, j]), abs=2e-3)
        assert r[6] == ("yes" if name in th["global"] or name not in th["per_label"] else "no")
    n_global = len(th["global"])
    assert re.search(rf"{n_global} of \d+ trained labels use the global threshold", report)
    for png in ("precision_recall.png", "examples.png", "curve.png"):
        assert (run_dir / png).stat().st_size > 1000 and f"]({png})" in report


def test_thresholds_record_which_labels_fell_back_and_metrics_keep_integers(run):
    run_dir, shapes = run
    th = json.loads((run_dir / "thresholds.json").read_text())
    val = read_manifest(shapes / "manifest.csv").split("val")
    positives = {n: sum(n in labels for labels in val.labels) for n in th["per_label"]}
    assert sorted(th["global"]) == sorted(n for n, k in positives.items() if k < 10)
    assert all(th["per_label"][n] == th["per_label"][th["global"][0]] for n in th["global"])
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert isinstance(metrics["test"]["majority_n"], int) and isinstance(metrics["best_step"], int)


def test_per_label_table_by_hand():
    y = np.array([[1, 0], [0, 1], [1, 0], [0, 0]])
    p = np.array([[0.9, 0.2], [0.3, 0.1], [0.6, 0.4], [0.1, 0.3]])
    rows = per_label_rows(["cat", "dog"], [True, False], y, p, {"per_label": {"cat": 0.5}, "default": 0.4, "global": []}, {"cat": 7})
    assert rows[0] == {"label": "cat", "seen": True, "train": 7, "positives": 2, "ap": 1.0, "threshold": 0.5, "global threshold": False}
    # dog: its one positive has the lowest of the 4 scores (0.1) -> precision 1/4 at it; no threshold of its own
    assert rows[1]["ap"] == pytest.approx(1 / 4) and rows[1]["threshold"] == 0.4 and rows[1]["global threshold"] is True
    lines = per_label_markdown(rows)
    assert lines[2].startswith("| cat | yes | 7 | 2 | 1.000 | 0.500 | no |")


def test_evaluate_per_label_prints_and_writes_the_rows(run, capsys, tmp_path):
    from mumic.cli import main

    run_dir, shapes = run
    out = tmp_path / "eval.json"
    assert main(["evaluate", str(run_dir), "--manifest", str(shapes / "manifest.csv"), "--split", "test", "--per-label",
                 "--out", str(out), "--device", "cpu", "--engine", "torch"]) == 0
    printed = capsys.readouterr().out
    rows = json.loads(out.read_text())["per_label"]
    table = _table(printed, "map_macro")  # the per-label table follows the metrics
    assert table[0][0] == "label" and {r[0] for r in table[1:]} == {r["label"] for r in rows}
    report_rows = {r[0]: r for r in _table((run_dir / "report.md").read_text(), "## per label (test)")[1:]}
    for r in rows:  # the same figures as the run's own report on the same split
        assert report_rows[r["label"]][3] == str(r["positives"])
        assert report_rows[r["label"]][4] == ("n/a" if r["ap"] is None else f"{r['ap']:.3f}")

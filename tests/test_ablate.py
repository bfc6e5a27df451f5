"""`mumic ablate`: a two-cell grid on the Shapes set with the tiny CLIP model."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import yaml

from mumic.data.manifest import read_manifest
from mumic.data.synthetic import make_shapes
from mumic.errors import ConfigError
from mumic.study import (
    CSV_COLUMNS,
    add_label_noise,
    load_ablation,
    run_ablation,
)


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return make_shapes(tmp_path_factory.mktemp("shapes"), n=120, size=32, seed=0)


def _write(path, doc):
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def _grid(tmp_path, shapes, tiny_clip_dir):
    return _write(tmp_path / "tiny.yaml", {
        "base": {
            "manifest": str(shapes), "labels_file": str(shapes.parent / "labels.yaml"), "backbone": f"hf:{tiny_clip_dir}",
            "batch_size": 16, "max_steps": 4, "eval_every": 2, "majority_n": 3, "cache_dir": str(tmp_path / "cache"),
            "device": "cpu",
        },
        "seeds": 1,
        "cells": [
            {"name": "mumic", "group": "loss", "overrides": {"loss": "tempered_sigmoid"}},
            {"name": "baseline_noisy", "group": "noisy", "overrides": {"loss": "linear_bce"},
             "noisy": {"drop_positives": 0.3, "add_false_positives": 0.05}},
        ],
    })


def test_grid_reports_resumes_and_adds_noise_to_training_rows_only(tmp_path, shapes, tiny_clip_dir):
    config = _grid(tmp_path, shapes, tiny_clip_dir)
    out = tmp_path / "out"
    res = run_ablation(config, out=out, progress=False)
    assert not res["failed"] and sorted(res["trained"]) == ["baseline_noisy-s0", "mumic-s0"]

    with open(out / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2
    assert set(CSV_COLUMNS) <= set(rows[0])
    for col in ("name", "loss", "gap10", "gap", "map_macro", "map_majority", "zsl_map", "gzsl_map", "noisy",
                "map_micro", "f1_micro_thr", "train_time_s", "gap10_std"):
        assert col in rows[0]
    by_name = {r["name"]: r for r in rows}
    assert by_name["mumic"]["loss"] == "tempered_sigmoid" and by_name["mumic"]["noisy"] == "0"
    assert by_name["baseline_noisy"]["loss"] == "linear_bce" and by_name["baseline_noisy"]["noisy"] == "1"
    assert 0 <= float(by_name["mumic"]["gap10"]) <= 1
    assert by_name["mumic"]["zsl_map"] != "" and by_name["baseline_noisy"]["zsl_map"] == ""  # no text classifier
    md = (out / "results.md").read_text()
    assert "**" in md and "✓" in md and "Best on validation" in md
    assert (out / "gap10.png").stat().st_size > 1000

    # a second call trains nothing: every cell's run is reused as it was
    runs = sorted((out / "runs").iterdir())
    before = {p: p.stat().st_mtime_ns for r in runs for p in r.iterdir()}
    res = run_ablation(config, out=out, progress=False)
    assert res["trained"] == [] and sorted(res["reused"]) == ["baseline_noisy-s0", "mumic-s0"]
    assert {p: p.stat().st_mtime_ns for r in runs for p in r.iterdir()} == before

    # the noisy cell trained on a derived manifest: training rows changed, about at the requested rates
    cfg = yaml.safe_load((out / "runs" / "baseline_noisy-s0" / "config.yaml").read_text())
    noisy = read_manifest(cfg["manifest"])
    clean = read_manifest(shapes)
    assert cfg["manifest"].startswith(str(out / "data"))
    assert [p.resolve() for p in noisy.images] == [p.resolve() for p in clean.images]
    assert noisy.splits == clean.splits
    dropped = added = positives = 0
    for split, a, b in zip(clean.splits, clean.labels, noisy.labels):
        if split != "train":
            assert a == b
            continue
        positives += len(a)
        dropped += len(set(a) - set(b))
        added += len(set(b) - set(a))
        assert b  # every row keeps a label
    assert abs(dropped / positives - 0.3) < 0.02 and abs(added / positives - 0.05) < 0.02
    stats = json.loads(next((out / "data").glob("*-noisy-*.json")).read_text())
    assert stats["dropped"] == dropped and stats["added"] == added


def test_label_noise_is_deterministic_given_the_seed():
    labels = [["a", "b", "c"], ["a"], ["b", "c"], ["c", "a"]] * 25
    rows = np.array([True, True, True, False] * 25)
    one, s1 = add_label_noise(labels, None, ["a", "b", "c", "d"], rows, 0.3, 0.05, seed=4)
    two, _ = add_label_noise(labels, None, ["a", "b", "c", "d"], rows, 0.3, 0.05, seed=4)
    three, _ = add_label_noise(labels, None, ["a", "b", "c", "d"], rows, 0.3, 0.05, seed=5)
    assert one == two != three
    assert all(one[i] == labels[i] for i in range(len(labels)) if not rows[i])
    assert s1["dropped"] == round(0.3 * s1["positives"])


def test_verified_negatives_are_true_negatives_of_training_rows():
    vocab = [f"l{j}" for j in range(20)]
    rng = np.random.default_rng(0)
    labels = [sorted(rng.choice(vocab, size=int(rng.integers(1, 5)), replace=False).tolist()) for _ in range(60)]
    rows = np.arange(60) % 4 != 3
    plain, _ = add_label_noise(labels, None, vocab, rows, 0.3, 0.05, seed=2)
    noisy, stats = add_label_noise(labels, None, vocab, rows, 0.3, 0.05, seed=2, verified_negatives=0.5)
    assert noisy == plain  # listing negatives does not change the noisy labels
    negs = stats["negatives"]
    for i in range(60):
        if not rows[i]:
            assert negs[i] == []
            continue
        true_negatives = [l for l in vocab if l not in labels[i] and l not in noisy[i]]
        assert set(negs[i]) <= set(true_negatives)  # never a true positive, never a false positive
        assert len(negs[i]) == round(0.5 * len(true_negatives))
    assert stats["verified_negatives_listed"] == sum(len(n) for n in negs)


@pytest.mark.parametrize("change, words", [
    (lambda d: d["cells"][0]["overrides"].update(lossy="asl"), ["line", "unknown key 'lossy'", "did you mean 'loss'"]),
    (lambda d: d["base"].update(epochs="many"), ["line", "'epochs' must be an integer"]),
    (lambda d: d.update(sweep=1), ["line", "unknown key 'sweep'"]),
    (lambda d: d["cells"][1].update(noisy={"drop": 0.3}), ["line", "unknown key 'drop'"]),
    (lambda d: d["cells"][1].update(name="mumic"), ["already used"]),
    (lambda d: d["cells"][0]["overrides"].update(seed=3), ["set by the grid"]),
])
def test_bad_ablation_file_names_file_and_key(tmp_path, shapes, tiny_clip_dir, change, words):
    doc = yaml.safe_load(_grid(tmp_path, shapes, tiny_clip_dir).read_text())
    change(doc)
    bad = _write(tmp_path / "bad.yaml", doc)
    with pytest.raises(ConfigError) as e:
        load_ablation(bad)
    msg = str(e.value)
    assert str(bad) in msg and all(w in msg for w in words), msg


def test_cross_style_without_style_column_fails_before_training(tmp_path, shapes, tiny_clip_dir):
    doc = yaml.safe_load(_grid(tmp_path, shapes, tiny_clip_dir).read_text())
    doc["cells"][1]["cross_style"] = True
    config = _write(tmp_path / "cross.yaml", doc)
    with pytest.raises(ConfigError, match="style"):
        run_ablation(config, out=tmp_path / "out", progress=False)
    assert not (tmp_path / "out" / "runs").exists()


def test_command_line_lists_cells(tmp_path, shapes, tiny_clip_dir, capsys):
    from mumic.cli import main

    assert main(["ablate", str(_grid(tmp_path, shapes, tiny_clip_dir)), "--list", "--out", str(tmp_path / "o")]) == 0
    out = capsys.readouterr().out
    assert "mumic" in out and "baseline_noisy" in out and "0/1 finished" in out


def test_grid_without_test_split_fails_before_training(tmp_path, shapes, tiny_clip_dir):
    rows = shapes.read_text().splitlines()
    no_test = shapes.parent / "no_test.csv"
    no_test.write_text("\n".join([rows[0], *[r for r in rows[1:] if not r.endswith(",test")]]) + "\n")
    doc = yaml.safe_load(_grid(tmp_path, shapes, tiny_clip_dir).read_text())
    doc["base"]["manifest"] = str(no_test)
    with pytest.raises(ConfigError, match="split 'test'"):
        run_ablation(_write(tmp_path / "nt.yaml", doc), out=tmp_path / "out", progress=False)
    assert not (tmp_path / "out" / "runs").exists()


def test_committed_results_table_renders_from_its_csv(monkeypatch):
    """docs/results/emojitags/results.md is what the report writer makes of the rows of the
    results.csv beside it (the runs themselves are not committed)."""
    from pathlib import Path

    from mumic.study import read_results_csv, render_results
    from mumic.study.report import results_csv

    root = Path(__file__).resolve().parent.parent
    monkeypatch.chdir(root)  # the report names the grid by the path the command was given
    abl = load_ablation(Path("ablations/emojitags.yaml"))
    out = Path("docs/results/emojitags")
    rows = read_results_csv(out / "results.csv", abl)
    assert [r["name"] for r in rows] == [c.name for c in abl.cells]
    assert results_csv(rows) == (out / "results.csv").read_text(encoding="utf-8")
    md = render_results(abl, rows, out, plots=["gap10.png", "map_macro.png"])
    assert md == (out / "results.md").read_text(encoding="utf-8")


def test_ablation_file_giving_a_key_twice_is_refused(tmp_path):
    bad = tmp_path / "twice.yaml"
    bad.write_text("seeds: 1\ncells:\n  - name: a\n    overrides: {loss: asl}\n    name: b\n")
    with pytest.raises(ConfigError, match=r"line 5.*'name' is given twice \(first on line 3\)") as e:
        load_ablation(bad)
    assert str(bad) in str(e.value)

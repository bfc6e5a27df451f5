"""`mumic audit`: out-of-fold suspects on the Shapes set with the tiny CLIP model."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import yaml

from mumic.audit import OOF, audited_rows, corrected_manifest, fold_of, read_fixes, run_audit, score_cells, suspects
from mumic.audit.scores import listed_cells
from mumic.cli import main
from mumic.config import load_config
from mumic.data.manifest import read_manifest
from mumic.errors import ManifestError

COLOURS = {"red": (220, 30, 30), "green": (30, 170, 50), "blue": (40, 60, 220)}


@pytest.fixture(scope="module")
def colours(tmp_path_factory):
    """Solid-colour images (jittered) tagged with their colour; one wrong tag planted:
    'red' also listed on a blue training image."""
    from PIL import Image

    root = tmp_path_factory.mktemp("colours")
    (root / "images").mkdir()
    rng = np.random.default_rng(0)
    rows = []
    for i in range(60):
        name = list(COLOURS)[i % 3]
        px = np.clip(np.array(COLOURS[name]) + rng.integers(-25, 26, size=(32, 32, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(px).save(root / "images" / f"c{i:02d}.png")
        rows.append([f"images/c{i:02d}.png", name, "train" if i < 42 else "val"])
    planted = 2  # a blue training image
    rows[planted][1] = "blue|red"
    (root / "manifest.csv").write_text("image,labels,split\n" + "".join(",".join(r) + "\n" for r in rows))
    (root / "labels.yaml").write_text(yaml.safe_dump({"labels": {n: {"seen": True} for n in COLOURS}}))
    return root / "manifest.csv", str((root / rows[planted][0]).absolute())


def _config(tmp_path, manifest, tiny_clip_dir):
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump({
        "manifest": str(manifest), "labels_file": str(manifest.parent / "labels.yaml"), "backbone": f"hf:{tiny_clip_dir}",
        "batch_size": 16, "max_steps": 15, "eval_every": 15, "lr_head": 0.01, "tau": 0.1, "learn_tau": False, "majority_n": 3,
        "cache_dir": str(tmp_path / "cache"), "device": "cpu"}))
    return path


def _neighbours_by_brute_force(oof, r, c, k):
    """-E(r, c) of the neighbours rule with explicit loops (mumic.audit.scores docstring)."""
    lg = lambda p: float(np.log(p / (1 - p)))  # noqa: E731
    listed, _ = listed_cells(oof)
    n, labels = listed.shape
    z = np.log(np.clip(oof.probs, 1e-6, 1 - 1e-6) / (1 - np.clip(oof.probs, 1e-6, 1 - 1e-6)))
    mean, std = z.mean(0), z.std(0)
    cos = lambda a, b: float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b))) if np.linalg.norm(a) * np.linalg.norm(b) else 0.0  # noqa: E731
    zs = [(z[i] - mean) / (std + 1e-6) for i in range(n)]
    sims = [(0.5 * cos(zs[r], zs[j]) + 0.5 * cos(listed[r].astype(float), listed[j].astype(float)), -j) for j in range(n) if j != r]
    near = [-j for _, j in sorted(sims, reverse=True)[:k]]
    prior = listed[:, c].mean()
    v = (sum(int(listed[j, c]) for j in near) + prior) / (k + 1)
    return -(float(z[r, c]) + 0.5 * (lg(v) - lg(prior)))


def test_planted_wrong_tag_ranks_first_and_the_audit_resumes(tmp_path, colours, tiny_clip_dir):
    manifest, planted = colours
    config = _config(tmp_path, manifest, tiny_clip_dir)
    out = tmp_path / "audit"
    res = run_audit(config, out, folds=3, progress=False, fix_top=1)
    oof: OOF = res["oof"]
    m = read_manifest(manifest)
    assert len(oof.rows) == sum(s == "train" for s in m.splits) and np.isfinite(oof.probs).all()
    with open(out / "suspects.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert list(table[0])[:6] == ["image", "label", "kind", "score", "oof_probability", "rank"]
    wrong = [r for r in table if r["kind"] == "wrong"]
    assert (wrong[0]["image"], wrong[0]["label"], wrong[0]["rank"]) == (planted, "red", "1")
    # the score is the stated neighbours rule, recomputed here by brute force for the planted cell
    r = int(np.flatnonzero([str(m.images[i]) == planted for i in oof.rows])[0])
    c = oof.names.index("red")
    assert float(wrong[0]["score"]) == pytest.approx(_neighbours_by_brute_force(oof, r, c, k=10), abs=1e-3)
    p, t = float(oof.probs[r, c]), float(oof.thresholds[r, c])
    assert float(wrong[0]["oof_probability"]) == pytest.approx(p, abs=1e-4)
    # the margin rule: logit(threshold) - logit(p) of the fold that scored the row
    assert score_cells(oof, "margin").wrong[r, c] == pytest.approx(np.log(t / (1 - t)) - np.log(p / (1 - p)), abs=1e-3)
    assert (out / "report.md").read_text().count("![top") >= 1 and (out / "top_wrong.png").stat().st_size > 500

    # --fix-top 1 removed the planted tag in a new manifest; the original is unchanged
    fixed = read_manifest(res["corrected"])
    k = [str(p.resolve()) for p in fixed.images].index(str(m.images[int(oof.rows[r])].resolve()))
    assert "red" not in fixed.labels[k] and "red" in read_manifest(manifest).labels[int(oof.rows[r])]
    assert len(fixed) == len(m)

    # a second call trains no fold: every fold's out-of-fold file is reused
    before = {p: p.stat().st_mtime_ns for p in (out / "folds").rglob("*") if p.is_file()}
    again = run_audit(config, out, folds=3, progress=False)
    assert np.array_equal(again["oof"].probs, oof.probs)
    assert {p: p.stat().st_mtime_ns for p in (out / "folds").rglob("*") if p.is_file()} == before


def test_folds_partition_the_training_rows():
    f = fold_of(10, 3, seed=1)
    assert sorted(np.bincount(f).tolist()) == [3, 3, 4]
    assert np.array_equal(f, fold_of(10, 3, seed=1)) and not np.array_equal(f, fold_of(10, 3, seed=2))


def _oof(listed, probs, thresholds, tmp_path):
    names = [f"l{j}" for j in range(len(probs[0]))]
    rows = "\n".join(f"x{i}.png,{'|'.join(n for j, n in enumerate(names) if listed[i][j])}" for i in range(len(probs)))
    (tmp_path / "m.csv").write_text("image,labels\n" + rows + "\n")
    m = read_manifest(tmp_path / "m.csv")
    return OOF(manifest=m, rows=audited_rows(m), names=names, probs=np.asarray(probs, np.float32),
               thresholds=np.asarray(thresholds, np.float32), fold=np.zeros(len(probs), int), config=load_config(None, {}))


def test_scores_by_hand(tmp_path):
    # label l0 has threshold 0.5, l1 threshold 0.2: p=0.4 is below l0's and above l1's
    listed = [[1, 0], [0, 1], [1, 1]]
    probs = [[0.1, 0.4], [0.4, 0.9], [0.8, 0.05]]
    oof = _oof(listed, probs, [[0.5, 0.2]] * 3, tmp_path)
    s = score_cells(oof, "margin")
    lg = lambda p: np.log(p / (1 - p))  # noqa: E731
    assert s.wrong[0, 0] == pytest.approx(lg(0.5) - lg(0.1), abs=1e-5)
    assert s.missing[0, 1] == pytest.approx(lg(0.4) - lg(0.2), abs=1e-5)
    assert np.isnan(s.missing[0, 0]) and np.isnan(s.wrong[0, 1])
    table = suspects(oof, s)
    kinds = {(r["image"].split("/")[-1], r["label"], r["kind"]) for r in table}
    # row 0: its only tag l0 is below threshold and l1 above: a swapped tag set
    assert kinds == {("x0.png", "l0", "wrong"), ("x0.png", "l1", "missing"), ("x2.png", "l1", "wrong"), ("x0.png", "l0", "swapped")}
    wrong = [r for r in table if r["kind"] == "wrong"]
    # lg(0.5) - lg(0.1) = 2.197 ranks above lg(0.2) - lg(0.05) = 1.558
    assert [(r["image"].split("/")[-1], r["score"], r["rank"]) for r in wrong] == [("x0.png", 2.1972, 1), ("x2.png", 1.5581, 2)]
    swapped = next(r for r in table if r["kind"] == "swapped")
    assert swapped["score"] == pytest.approx(np.log(4 / 6) - np.log(2 / 8), abs=1e-4) and swapped["suggested"] == "l1"


def test_neighbours_rule_by_hand(tmp_path):
    # every row has the same probabilities, so only the tag sets tell rows apart: sim = 1/2 cos(y_i, y_j)
    # A [l0], B [l0], C [l0, l1], D [l1]; k = 1: A -> B, B -> A, C -> A (tied with B and D: the first row), D -> C
    listed = [[1, 0], [1, 0], [1, 1], [0, 1]]
    oof = _oof(listed, [[0.8, 0.3]] * 4, [[0.5, 0.5]] * 4, tmp_path)
    s = score_cells(oof, k=1)
    lg = lambda p: np.log(p / (1 - p))  # noqa: E731
    prior = np.array([3 / 4, 2 / 4])
    # v = (the neighbour's vote + prior) / 2;  E = logit(p) + 1/2 (logit(v) - logit(prior))
    e = lambda p, vote, c: lg(p) + 0.5 * (lg((vote + prior[c]) / 2) - lg(prior[c]))  # noqa: E731
    assert s.missing[0, 1] == pytest.approx(e(0.3, 0, 1), abs=1e-5)  # A's neighbour B does not list l1
    assert s.missing[3, 0] == pytest.approx(e(0.8, 1, 0), abs=1e-5)  # D's neighbour C lists l0
    assert s.wrong[2, 1] == pytest.approx(-e(0.3, 0, 1), abs=1e-5)  # C's neighbour A does not list l1
    assert s.wrong[2, 0] == pytest.approx(-e(0.8, 1, 0), abs=1e-5)
    assert s.wrong[0, 0] == pytest.approx(-e(0.8, 1, 0), abs=1e-5) and np.isnan(s.missing[0, 0])
    # a look-alike's vote moves the score: D's missing l0 is more suspect than A's missing l1 by the votes and the logits
    assert s.missing[3, 0] > s.missing[0, 1]


def test_fixes_file_and_corrected_manifest_never_replace_the_original(tmp_path):
    (tmp_path / "m.csv").write_text("image,labels\na.png,x|y\nb.png,y\n")
    m = read_manifest(tmp_path / "m.csv")
    (tmp_path / "fixes.csv").write_text("image,label,kind\na.png,y,wrong\nb.png,x,missing\nb.png,z,swapped\n")
    fixes = read_fixes(tmp_path / "fixes.csv")
    assert fixes == [("a.png", "y", "remove"), ("b.png", "x", "add")]
    counts = corrected_manifest(m, tmp_path / "out" / "fixed.csv", fixes=fixes, drop=[])
    fixed = read_manifest(tmp_path / "out" / "fixed.csv")
    assert fixed.labels == [["x"], ["y", "x"]] and counts == {"rows": 2, "added": 1, "removed": 1, "dropped_rows": 0}
    assert [p.resolve() for p in fixed.images] == [p.resolve() for p in m.images]
    corrected_manifest(m, tmp_path / "out" / "dropped.csv", drop=["b.png"])
    assert read_manifest(tmp_path / "out" / "dropped.csv").labels == [["x", "y"]]
    with pytest.raises(ManifestError, match="is the audited manifest itself"):
        corrected_manifest(m, tmp_path / "m.csv", fixes=fixes)
    (tmp_path / "bad.csv").write_text("image,label,action\na.png,y,flip\n")
    with pytest.raises(ManifestError, match=r"bad.csv line 2: action is 'flip'; use add or remove"):
        read_fixes(tmp_path / "bad.csv")


def test_command_line_names_a_missing_source(tmp_path, capsys):
    assert main(["audit", str(tmp_path / "nope"), "--out", str(tmp_path / "a")]) == 2
    assert "is neither a run directory nor a config file" in capsys.readouterr().err


def test_detection_figures_by_hand():
    from mumic.study.noise_audit import detection

    # candidates ranked 0.9, 0.8, 0.7, 0.1 (NaN is no candidate); errors at 0.9 and 0.1, and one outside the candidates
    score = np.array([[0.9, np.nan], [0.8, 0.7], [0.1, np.nan]])
    truth = np.array([[True, True], [False, False], [True, False]])
    d = detection(score, truth)
    assert d["ap"] == pytest.approx((1 / 1 + 2 / 4) / 2) and d["errors"] == 3 and d["candidates"] == 4
    assert d["p@100"] == pytest.approx(2 / 100) and d["r@100"] == pytest.approx(2 / 3)

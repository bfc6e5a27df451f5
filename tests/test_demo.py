"""The demo end to end on the real EmojiTags data, with a small training budget."""

import json
import shutil

import pytest

from mumic.demo import RUNS, run_demo


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("npm") is None, reason="npm is needed to fetch the EmojiTags sources")
def test_demo_builds_trains_and_reports(tmp_path):
    small = {"image_size": 64, "max_steps": 12, "eval_every": 6, "batch_size": 64}
    report = run_demo(tmp_path / "demo", tmp_path / "emoji", progress=False, settings=small)
    text = report.read_text()
    for png in ("per_label_ap.png", "precision_recall.png", "examples.png"):
        assert (tmp_path / "demo" / png).stat().st_size > 1000
        assert png in text
    for name in RUNS:
        m = json.loads((tmp_path / "demo" / name / "metrics.json").read_text())
        assert 0 < m["test"]["gap10"] <= 1
    cross = (tmp_path / "demo" / "cross_style_manifest.csv").read_text().splitlines()
    assert all((",test,openmoji," in l) or (",test," not in l) for l in cross[1:])
    assert "| GAP@10 (seen labels) |" in text and "ZSL mAP" in text
    # a second call reuses the finished runs: nothing in a run folder is written again
    before = _files(tmp_path / "demo", RUNS)
    assert any(p.name == "metrics.json" for p in before)
    run_demo(tmp_path / "demo", tmp_path / "emoji", progress=False, settings=small)
    assert _files(tmp_path / "demo", RUNS) == before


def _files(out, runs):
    """Every file of the run folders, with its size and modification time."""
    return {p: (p.stat().st_size, p.stat().st_mtime_ns) for name in runs for p in sorted((out / name).rglob("*")) if p.is_file()}

"""The `mumic` command as a user runs it: real processes, exit codes, files written."""

import json
import os
import re
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest

from mumic.config import FIELDS
from mumic.data.synthetic import make_shapes


def mumic(*args, cwd=None, check=True):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    p = subprocess.run([sys.executable, "-m", "mumic", *map(str, args)], capture_output=True, text=True, cwd=cwd, env=env, timeout=600)
    if check and p.returncode != 0:
        raise AssertionError(f"mumic {args} exited {p.returncode}\n{p.stdout}\n{p.stderr}")
    return p


VERBS = ("train", "evaluate", "predict", "embed", "data", "demo", "ablate", "serve", "index", "search", "export", "card", "audit",
         "noise-study")


def _listed_verbs(help_text):
    """The verbs `mumic --help` lists under VERB (one per line, indented four spaces)."""
    section = help_text.split("positional arguments:", 1)[1].split("\n\n", 1)[0]
    return [m.group(1) for m in re.finditer(r"^ {4}(\S+)", section, re.M)]


def _listed_options(help_text):
    """Every option string declared in a verb's --help (`  --a-b A_B`, `  --x, --no-x`)."""
    return {flag for line in help_text.splitlines() if re.match(r"^ {2}-", line)
            for flag in re.findall(r"(?<![\w-])--?[a-z][\w-]*", line.split("  ", 2)[1])}


def test_help_lists_verbs_and_every_train_option():
    listed = _listed_verbs(mumic("--help").stdout)
    assert sorted(listed) == sorted(VERBS), listed
    train_help = mumic("train", "--help").stdout
    assert train_help.startswith("usage: mumic train ")
    flags = _listed_options(train_help)
    for name in FIELDS:
        assert "--" + name.replace("_", "-") in flags, name
    assert {"--resume", "--overwrite", "--no-progress"} <= flags


def test_every_verb_parses_and_every_train_option_sets_its_setting(capsys):
    import typing

    from mumic.cli import build_parser, main
    from mumic.config import TrainConfig

    for verb in VERBS:
        with pytest.raises(SystemExit) as exit_:
            main([verb, "--help"])
        assert exit_.value.code == 0 and capsys.readouterr().out.startswith(f"usage: mumic {verb} "), verb
    parser = build_parser()
    hints = typing.get_type_hints(TrainConfig)
    for name, f in FIELDS.items():
        flag = "--" + name.replace("_", "-")
        hint = str(hints[name])
        if "bool" in hint:
            argv, value = [flag], True
        elif f.metadata.get("choices"):
            argv, value = [flag, f.metadata["choices"][-1]], f.metadata["choices"][-1]
        elif "list" in hint:
            argv, value = [flag, "a {}", "an {}"], ["a {}", "an {}"]
        else:
            argv, value = [flag, "7"], "7"
        a = parser.parse_args(["train", *argv])
        assert getattr(a, name) == value, (name, argv)
        assert all(getattr(a, other) is None for other in FIELDS if other != name), (name, argv)


def _one_line_error(p, *needles):
    assert p.returncode == 2, (p.returncode, p.stderr)
    assert "Traceback" not in p.stderr
    lines = [l for l in p.stderr.splitlines() if l.startswith("mumic: error:")]
    assert len(lines) == 1, p.stderr
    for n in needles:
        assert n in lines[0], (n, lines[0])


def test_bad_inputs_give_one_line_and_exit_2(tmp_path):
    _one_line_error(mumic("train", "--manifest", tmp_path / "nope.csv", "--out", tmp_path / "r", check=False), "nope.csv")
    bad = tmp_path / "bad.yaml"
    bad.write_text("epochz: 3\n")
    _one_line_error(mumic("train", bad, check=False), "bad.yaml", "epochz", "epochs")
    m = tmp_path / "m.csv"
    m.write_text("image,labels\na.png,cat\nb.png,\n")
    _one_line_error(mumic("train", "--manifest", m, "--out", tmp_path / "r", "--no-allow-untagged", check=False), "m.csv", "line 3",
                    "empty label list")
    m.write_text("picture,labels\na.png,cat\n")
    _one_line_error(mumic("train", "--manifest", m, "--out", tmp_path / "r", check=False), "image")
    _one_line_error(mumic("predict", tmp_path / "no-run", "x.png", check=False), "no-run")
    m.write_text("image,labels,split\na.png,cat,train\nb.png,cat,val\n")
    _one_line_error(mumic("train", "--manifest", m, "--out", tmp_path / "r", check=False), "a.png", "line 2")
    (tmp_path / "a.png").write_bytes(b"")
    (tmp_path / "b.png").write_bytes(b"")
    _one_line_error(mumic("train", "--manifest", m, "--backbone", "resnet", "--out", tmp_path / "r", check=False), "resnet")
    assert not (tmp_path / "r").exists()  # nothing written for a run that could not start
    no_model = ["train", "--manifest", m, "--backbone", f"hf:{tmp_path / 'no-model'}", "--out", tmp_path / "r"]
    _one_line_error(mumic(*no_model, check=False), "no-model")
    # a run that failed before its first checkpoint does not block the next attempt
    _one_line_error(mumic(*no_model, check=False), "no-model")



def test_shapes_with_no_images_is_a_one_line_error(tmp_path):
    p = mumic("data", "shapes", "-n", "0", "--out", tmp_path / "shapes", check=False)
    _one_line_error(p, "-n", "at least 1", "got 0")
    assert not (tmp_path / "shapes" / "manifest.csv").exists()


@pytest.mark.slow
def test_train_evaluate_predict_embed(tmp_path, tiny_clip_dir):
    root = make_shapes(tmp_path / "shapes", n=90, size=48, seed=2).parent
    run = tmp_path / "run"
    args = ["train", "--manifest", root / "manifest.csv", "--labels-file", root / "labels.yaml", "--out", run,
            "--backbone", f"hf:{tiny_clip_dir}", "--max-steps", 6, "--eval-every", 3, "--batch-size", 16,
            "--cache-dir", tmp_path / "cache", "--no-progress", "--no-learn-tau"]
    out = mumic(*args).stdout
    assert "gap10" in out
    # a second train into the same folder is refused, the run is untouched
    before = (run / "model.safetensors").read_bytes()
    _one_line_error(mumic(*args, check=False), "already holds a run", "--overwrite")
    assert (run / "model.safetensors").read_bytes() == before

    out = mumic("evaluate", run, "--manifest", root / "manifest.csv", "--split", "test").stdout
    assert out.splitlines()[0].split()[0] == "gap10"
    assert (run / "eval-manifest-test.json").is_file()

    pred = tmp_path / "pred.jsonl"
    mumic("predict", run, root / "manifest.csv", "--labels", "red", "yellow", "purple star", "--top-k", 2, "--out", pred)
    rows = [json.loads(l) for l in pred.read_text().splitlines()]
    assert len(rows) == 90
    assert all(len(r["scores"]) == 2 and set(r["scores"]) <= {"red", "yellow", "purple star"} for r in rows)
    assert all("split" in r and "labels" in r for r in rows)  # manifest columns kept
    one = mumic("predict", run, rows[0]["image"]).stdout
    assert json.loads(one)["image"] == rows[0]["image"]

    emb = tmp_path / "emb.parquet"
    mumic("embed", run, root / "manifest.csv", "--out", emb)
    t = pq.read_table(emb)
    assert t.num_rows == 90 and {"image", "labels", "split", "embedding"} <= set(t.column_names)
    e = np.stack(t.column("embedding").to_numpy(zero_copy_only=False))
    np.testing.assert_allclose(np.linalg.norm(e, axis=1), 1.0, atol=1e-5)

    # a finished output is not replaced by accident; a folder of images is an input like a manifest
    _one_line_error(mumic("embed", run, root / "images", "--out", emb, check=False), str(emb), "already exists", "--overwrite")
    assert pq.read_table(emb).num_rows == 90
    mumic("embed", run, root / "images", "--out", emb, "--overwrite")
    by_folder = pq.read_table(emb)
    assert by_folder.column("image").to_pylist() == sorted(t.column("image").to_pylist())
    folder_rows = [json.loads(l) for l in mumic("predict", run, root / "images").stdout.splitlines()]
    assert [r["image"] for r in folder_rows] == by_folder.column("image").to_pylist()
    # a missing image among paths is reported against itself
    gone = root / "images" / "hill_sunset.jpg"
    _one_line_error(mumic("predict", run, rows[0]["image"], gone, check=False), f"image not found: {gone} (1 of 2")

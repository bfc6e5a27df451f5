"""What the command line and the logs tell a user: no default said twice, no line about a
setting nobody set, cache counts that add up."""

import logging
import re
import subprocess
import sys

from PIL import Image

from mumic.backbones import load_backbone
from mumic.features import cached_features


def test_train_help_says_each_default_once():
    out = subprocess.run([sys.executable, "-m", "mumic", "train", "--help"], capture_output=True, text=True, check=True).stdout
    entries = re.split(r"\n  (?=-)", out)
    twice = [e.split()[0] for e in entries if e.count("(default:") > 1]
    assert twice == []
    assert "input resolution in pixels (default: the backbone's)" in " ".join(out.split())


def test_hf_backbone_says_nothing_at_info_about_the_lite_only_image_head(tiny_clip_dir, caplog):
    with caplog.at_level(logging.INFO, logger="mumic"):
        load_backbone(f"hf:{tiny_clip_dir}", image_head="mlp")  # the config's default, which nobody set
    assert not [r for r in caplog.records if "image_head" in r.getMessage() and r.levelno >= logging.INFO]


def test_cache_counts_leave_out_unreadable_images(tiny_clip_dir, tmp_path, caplog):
    bb = load_backbone(f"hf:{tiny_clip_dir}")
    paths = []
    for i in range(2):
        paths.append(tmp_path / f"{i}.png")
        Image.new("RGB", (40, 40), (40 * i, 90, 10)).save(paths[-1])
    paths.append(tmp_path / "missing.png")
    cached_features(bb, paths, cache_dir=tmp_path / "cache", failures=[])
    with caplog.at_level(logging.INFO, logger="mumic.features"):
        cached_features(bb, paths, cache_dir=tmp_path / "cache", failures=[])
    lines = [r.getMessage() for r in caplog.records if "found in the cache" in r.getMessage()]
    assert len(lines) == 1 and lines[0].startswith("2 of 3 image features found in the cache") and "(1 unreadable)" in lines[0]


def test_every_option_of_every_verb_is_documented():
    from mumic.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "verb")
    undocumented = []
    todo = list(sub.choices.items())
    while todo:
        name, p = todo.pop()
        for action in p._actions:
            if action.choices and isinstance(action.choices, dict):  # a nested verb group (mumic data ...)
                todo += [(f"{name} {k}", v) for k, v in action.choices.items()]
            elif action.option_strings and action.dest != "help" and not action.help:
                undocumented.append(f"{name} {action.option_strings[0]}")
    assert undocumented == []

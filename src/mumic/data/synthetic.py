"""Shapes: a small, real multi-label image set the package can draw by itself.

Each PNG shows 1-3 non-overlapping shapes on white; every shape has a colour (red,
green, blue, yellow) and a kind (circle, square, triangle). An image's labels are the
colours and kinds present, plus ``many`` when it has three shapes. ``yellow`` is marked
unseen in ``labels.yaml`` so the set also exercises zero-shot prediction.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import numbers
import os
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from PIL import Image, ImageDraw

from mumic.errors import ConfigError
from mumic.io import atomic_path, atomic_write_text

log = logging.getLogger(__name__)

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "green": (35, 155, 55),
    "blue": (40, 70, 215),
    "yellow": (240, 205, 25),
}
KINDS = ("circle", "square", "triangle")
MANY = "many"
UNSEEN = ("yellow",)
TEMPLATES = ["a drawing of a {}.", "a simple picture with a {} in it."]
SPLITS = (("train", 0.70), ("val", 0.15), ("test", 0.15))
_VERSION = 1


def _label_specs() -> list[dict]:
    specs: list[dict] = []
    for colour in COLOURS:
        spec: dict[str, Any] = {
            "name": colour,
            "prompts": [f"a drawing of a {colour} shape.", f"a simple picture with something {colour} in it."],
            "description": f"at least one {colour} shape",
        }
        if colour in UNSEEN:
            spec["seen"] = False
        specs.append(spec)
    for kind in KINDS:
        specs.append({"name": kind, "description": f"at least one {kind}"})  # uses the templates
    specs.append(
        {
            "name": MANY,
            "prompts": ["a drawing of many shapes.", "a simple picture with three shapes in it."],
            "description": "three shapes",
        }
    )
    return specs


def _draw(rng: np.random.Generator, size: int) -> tuple[Image.Image, list[str]]:
    """One image and its labels (colours and kinds in drawing order, then ``many``)."""
    img = Image.new("RGB", (size, size), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    boxes: list[tuple[int, int, int, int]] = []
    labels: list[str] = []
    wanted = int(rng.integers(1, 4))
    colours = list(COLOURS)
    margin = max(1, size // 32)
    for _ in range(wanted):
        for _attempt in range(50):
            side = int(rng.integers(max(4, int(size * 0.2)), max(5, int(size * 0.4)) + 1))
            x0 = int(rng.integers(margin, size - side - margin + 1))
            y0 = int(rng.integers(margin, size - side - margin + 1))
            box = (x0, y0, x0 + side, y0 + side)
            gap = margin
            if all(
                box[2] + gap <= b[0] or b[2] + gap <= box[0] or box[3] + gap <= b[1] or b[3] + gap <= box[1]
                for b in boxes
            ):
                break
        else:
            continue  # no room left: draw fewer shapes
        colour = colours[int(rng.integers(len(colours)))]
        kind = KINDS[int(rng.integers(len(KINDS)))]
        jitter = rng.integers(-15, 16, size=3)
        fill = tuple(int(v) for v in np.clip(np.array(COLOURS[colour]) + jitter, 0, 255))
        x1, y1 = box[2] - 1, box[3] - 1
        if kind == "circle":
            draw.ellipse((x0, y0, x1, y1), fill=fill)
        elif kind == "square":
            draw.rectangle((x0, y0, x1, y1), fill=fill)
        else:
            draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=fill)
        boxes.append(box)
        for name in (colour, kind):
            if name not in labels:
                labels.append(name)
    if len(boxes) == 3:
        labels.append(MANY)
    return img, labels


def _split_names(n: int, rng: np.random.Generator) -> list[str]:
    order = rng.permutation(n)
    n_train = int(round(SPLITS[0][1] * n))
    n_val = int(round(SPLITS[1][1] * n))
    names = [""] * n
    for rank, i in enumerate(order):
        names[i] = "train" if rank < n_train else "val" if rank < n_train + n_val else "test"
    return names


def make_shapes(out_dir: str | os.PathLike[str], n: int = 300, size: int = 64, seed: int = 0, *, overwrite: bool = True) -> Path:
    """Write the Shapes set to ``out_dir`` (images/, manifest.csv, labels.yaml, params.json)
    and return the manifest path. Deterministic given ``seed``; returns at once when
    ``out_dir`` already holds a set made with the same parameters."""
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1:
        raise ConfigError(f"n (the number of images, -n) must be a whole number of at least 1; got {n!r}")
    if isinstance(size, bool) or not isinstance(size, numbers.Integral) or size < 16:
        raise ConfigError(f"size must be a whole number of pixels, at least 16; got {size!r}")
    out = Path(out_dir)
    manifest_path = out / "manifest.csv"
    params_path = out / "params.json"
    params = {"n": int(n), "size": int(size), "seed": int(seed), "version": _VERSION}
    if manifest_path.is_file() and params_path.is_file():
        try:
            old = json.loads(params_path.read_text(encoding="utf-8"))
            if old == params:
                log.debug("shapes set in %s is up to date", out)
                return manifest_path
            if not overwrite:
                raise ConfigError(f"{out} holds a Shapes set made with other settings ({old}); pass --overwrite to "
                                  "replace it, or choose another --out")
        except (OSError, ValueError):
            pass
    params_path.unlink(missing_ok=True)  # mark incomplete until everything is written

    image_dir = out / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    for old in (*image_dir.glob("shape_*.png"), *image_dir.glob(".shape_*.tmp")):
        old.unlink()
    rng = np.random.default_rng(seed)
    rows: list[tuple[str, str]] = []
    width = max(5, len(str(n - 1)))
    for i in range(n):
        img, labels = _draw(rng, size)
        name = f"images/shape_{i:0{width}d}.png"
        with atomic_path(out / name) as tmp:
            img.save(tmp, format="PNG", optimize=False)
        rows.append((name, "|".join(labels)))
    splits = _split_names(n, np.random.default_rng([seed, 1]))

    buf = io.StringIO(newline="")
    writer = csv.writer(buf)
    writer.writerow(["image", "labels", "split"])
    for (image, labels), split in zip(rows, splits):
        writer.writerow([image, labels, split])
    atomic_write_text(manifest_path, buf.getvalue())

    labels_doc = {"labels": _label_specs(), "templates": list(TEMPLATES)}
    atomic_write_text(out / "labels.yaml", yaml.safe_dump(labels_doc, sort_keys=False))
    atomic_write_text(params_path, json.dumps(params))  # last: the set is complete
    log.info("wrote %d shape images to %s", n, out)
    return manifest_path

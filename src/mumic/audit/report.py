"""AUDIT/report.md and its image grids (Pillow): the top suspects of each kind."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from mumic.io import atomic_path, atomic_write_text

MEANING = {
    "missing": "an unlisted label the score rule finds more likely than not (score > 0: add it?)",
    "wrong": "a listed label the score rule finds less likely than not (score > 0: remove it?)",
    "swapped": "every listed label looks wrong and another label looks right (the whole tag set may belong to another image)",
    "outlier": "a listed label whose score is far below the label's other images (robust z < -3)",
}
CELL = 128
CAPTION = 40


def image_grid(path: Path, rows: list[dict[str, Any]], *, columns: int = 4) -> None:
    """A grid of the suspects' images, each with its label, score and probability."""
    from PIL import Image, ImageDraw

    n = len(rows)
    lines = (n + columns - 1) // columns
    grid = Image.new("RGB", (columns * CELL, max(lines, 1) * (CELL + CAPTION)), "white")
    draw = ImageDraw.Draw(grid)
    for k, r in enumerate(rows):
        x, y = (k % columns) * CELL, (k // columns) * (CELL + CAPTION)
        try:
            with Image.open(r["image"]) as img:
                thumb = img.convert("RGB")
                thumb.thumbnail((CELL - 8, CELL - 8))
            grid.paste(thumb, (x + (CELL - thumb.width) // 2, y + (CELL - thumb.height) // 2))
        except OSError:
            draw.text((x + 4, y + CELL // 2), "(unreadable)", fill="red")
        label = str(r["label"])
        draw.text((x + 4, y + CELL), f"#{r['rank']} {label[:20]}", fill="black")
        draw.text((x + 4, y + CELL + 13), f"s={r['score']:.2f} p={r['oof_probability']:.2f}", fill="gray")
        if r.get("suggested"):
            draw.text((x + 4, y + CELL + 26), f"-> {str(r['suggested'])[:18]}", fill="darkgreen")
    with atomic_path(path) as tmp:
        grid.save(tmp, format="PNG")


def write_report(out: Path, table: list[dict[str, Any]], info: dict[str, Any], *, top: int = 12) -> Path:
    """report.md: what was audited, how many suspects of each kind, and their top images."""
    counts = Counter(r["kind"] for r in table)
    lines = [
        "# Label audit",
        "",
        f"Manifest `{info['manifest']}`: {info['rows']} training rows, {info['labels']} labels, "
        f"{info['folds']}-fold cross-fitting with the configuration of `{info['source']}` (loss {info['loss']}, "
        f"backbone {info['backbone']}). Score rule: `{info['method']}` (see `mumic.audit.scores`).",
        "",
        "| kind | suspects | meaning |",
        "|---|---|---|",
    ]
    lines += [f"| {k} | {counts.get(k, 0)} | {MEANING[k]} |" for k in MEANING]
    lines += ["", "Every suspect, ranked, is in `suspects.csv` (image, label, kind, score, oof_probability, rank). "
              "Write a corrected manifest with `mumic audit ... --apply fixes.csv` (a copy of suspects.csv keeping the rows to "
              "apply) or `--drop-top K`; the original is never changed.", ""]
    for kind in MEANING:
        rows = [r for r in table if r["kind"] == kind][:top]
        if not rows:
            continue
        image_grid(out / f"top_{kind}.png", rows)
        lines += [f"## Top {kind} suspects", "", f"![top {kind}](top_{kind}.png)", "",
                  "| rank | image | label | score | p (out of fold) | threshold |", "|---|---|---|---|---|---|"]
        lines += [f"| {r['rank']} | {Path(r['image']).name} | {r['label']}{' → ' + r['suggested'] if r.get('suggested') else ''} "
                  f"| {r['score']:.3f} | {r['oof_probability']:.3f} | {r['threshold']:.3f} |" for r in rows]
        lines.append("")
    path = out / "report.md"
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path

"""Score image files with an ONNX export of a mumic run, as `mumic predict` scores them.

    python predict.py IMAGE [IMAGE ...]

`mumic export RUN --format onnx --out DIR` writes this file as DIR/predict.py; it reads
the export from its own folder and needs only numpy, Pillow and onnxruntime (this module
imports nothing of mumic but the preprocessing, which the export inlines). It prints one
JSON line per image, in the order given: the image's absolute path, the labels decided
with the run's calibrated per-label thresholds (scoring.json; best first) and every
label's probability (best first, 6 decimals). An unreadable image stops it with exit
status 1.

The preprocessing is mumic's own (the source of mumic.data.preprocess, copied verbatim):
JPEGs decode at a reduced scale (Pillow's draft mode), EXIF orientation is applied,
transparency is composited onto white, and the central square is resampled to the graph's
size in one bicubic pass with reducing_gap. It is the reference implementation: another
resizer gives other pixels, and near a threshold other decisions.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from mumic.data.preprocess import decode_rgb, resize_center_crop

BATCH_SIZE = 32


def load_pixels(path: str | Path, size: int) -> np.ndarray:
    """An image file -> uint8 [3, size, size], decoded and resampled exactly as mumic does."""
    with Image.open(path) as img:
        return resize_center_crop(decode_rgb(img, size), size)


def load_export(folder: str | Path) -> dict[str, Any]:
    """The image graph's session and the scoring of an export folder: labels, v [C, D],
    b [C], thresholds [C], tau and the graph's image size."""
    import onnxruntime as ort

    folder = Path(folder)
    scoring = json.loads((folder / "scoring.json").read_text(encoding="utf-8"))
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    session = ort.InferenceSession(str(folder / "image_encoder.onnx"), sess_options=opts, providers=["CPUExecutionProvider"])
    labels = scoring["labels"]
    return {
        "session": session,
        "size": int(session.get_inputs()[0].shape[2]),
        "names": [l["name"] for l in labels],
        "v": np.load(folder / "label_embeddings.npy", allow_pickle=False).astype(np.float32),
        "b": np.array([l["bias"] for l in labels], dtype=np.float32),
        "thresholds": np.array([l["threshold"] for l in labels], dtype=np.float32),
        "tau": float(scoring["tau"]),
    }


def probabilities(export: dict[str, Any], pixels: np.ndarray) -> np.ndarray:
    """uint8 pixels [N, 3, S, S] -> probabilities [N, C]: sigmoid(u . v_c / tau + b_c)."""
    u = export["session"].run(None, {"pixels": np.ascontiguousarray(pixels, dtype=np.uint8)})[0].astype(np.float32)
    z = (u @ export["v"].T) / np.float32(export["tau"]) + export["b"]
    return (1.0 / (1.0 + np.exp(-z.astype(np.float64)))).astype(np.float32)


def score_images(folder: str | Path, images: Sequence[str | Path], batch_size: int = BATCH_SIZE) -> tuple[dict[str, Any], np.ndarray]:
    """(the export, probabilities [N, C]) of image files, in the order given. An unreadable
    file raises ValueError naming it (a plain one: this file runs without mumic)."""
    export = load_export(folder)
    out = [np.zeros((0, len(export["names"])), np.float32)]
    for s in range(0, len(images), batch_size):
        pixels = []
        for path in images[s : s + batch_size]:
            try:
                pixels.append(load_pixels(path, export["size"]))
            except (OSError, ValueError, SyntaxError, EOFError) as e:  # what Pillow raises for a bad file
                raise ValueError(f"{path}: cannot read the image ({e.__class__.__name__}: {e})") from None
        out.append(probabilities(export, np.stack(pixels)))
    return export, np.concatenate(out)


def predict_images(folder: str | Path, images: Sequence[str | Path], batch_size: int = BATCH_SIZE) -> list[dict[str, Any]]:
    """One record per image, as `mumic predict` writes it: image, predicted, scores."""
    export, p = score_images(folder, images, batch_size)
    names = export["names"]
    records = []
    for path, row in zip(images, p):
        order = np.argsort(-row, kind="stable")
        decided = row >= export["thresholds"]
        records.append({
            "image": str(Path(path).resolve()),
            "predicted": [names[j] for j in order if decided[j]],
            "scores": {names[j]: round(float(row[j]), 6) for j in order},
        })
    return records


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        sys.stderr.write("usage: python predict.py IMAGE [IMAGE ...]\n")
        return 0 if args else 2
    folder = Path(__file__).resolve().parent
    try:
        records = predict_images(folder, args)
    except ValueError as e:
        sys.stderr.write(f"predict.py: {e}\n")
        return 1
    sys.stdout.write("".join(json.dumps(r) + "\n" for r in records))
    return 0


if __name__ == "__main__":
    sys.exit(main())

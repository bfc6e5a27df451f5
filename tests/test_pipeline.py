"""The input pipeline against the plain reference preprocessing.

ImageDataset decodes JPEGs in draft mode (a reduced DCT scale, via
load_image(size_hint=...)) for speed. Its pixels must stay close to the plain path
(Image.open(...).convert("RGB"), full decode, then the same resize_center_crop), and a
model must not tell the two apart. PNGs have no draft mode and must match exactly.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from mumic.backbones import load_backbone
from mumic.data.dataset import ImageDataset, make_loader
from mumic.data.images import load_image, resize_center_crop


def _photo(seed: int, width: int, height: int) -> Image.Image:
    """Photo-like content: smooth colour field, shapes with hard edges, sensor-like noise."""
    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize((width, height), Image.BICUBIC)
    draw = ImageDraw.Draw(img)
    for _ in range(6):
        x0, y0 = int(rng.integers(0, width - 40)), int(rng.integers(0, height - 40))
        x1, y1 = x0 + int(rng.integers(20, width // 2)), y0 + int(rng.integers(20, height // 2))
        fill = tuple(int(c) for c in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)((x0, y0, x1, y1), fill=fill)
    arr = np.asarray(img, dtype=np.float32) + 6.0 * rng.standard_normal((height, width, 1), dtype=np.float32)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[Path]]:
    folder = tmp_path_factory.mktemp("pipeline")
    jpegs, pngs = [], []
    for i, (w, h) in enumerate([(640, 480), (640, 480), (640, 480), (480, 640)]):
        p = folder / f"photo_{i}.jpg"
        _photo(i, w, h).save(p, format="JPEG", quality=90)
        jpegs.append(p)
    for i, (w, h) in enumerate([(640, 480), (480, 640)]):
        p = folder / f"drawing_{i}.png"
        _photo(10 + i, w, h).save(p, format="PNG")
        pngs.append(p)
    return {"jpeg": jpegs, "png": pngs}


def _reference(path: Path, size: int) -> np.ndarray:
    """The plain path: full decode with Pillow, then the same resize + center crop."""
    with Image.open(path) as img:
        return resize_center_crop(img.convert("RGB"), size)


def _pair(paths: list[Path], size: int) -> tuple[torch.Tensor, torch.Tensor]:
    ds = ImageDataset(paths, size)
    ours = torch.stack([ds[i][1] for i in range(len(ds))])
    ref = torch.stack([torch.from_numpy(_reference(p, size)) for p in paths])
    return ours, ref


@pytest.mark.parametrize("size, max_bound", [(224, 64), (32, 16)])
def test_draft_jpeg_pixels_close_to_full_decode(images, size, max_bound):
    paths = images["jpeg"]
    # the draft decode really is reduced (640x480 at 224 px: 1/2; at 32 px: 1/8) ...
    w, h = load_image(paths[0], size_hint=size).size
    assert w < 640 and h < 480 and min(w, h) >= size
    # ... and the crop it gives is close to the full decode's
    ours, ref = _pair(paths, size)
    assert ours.dtype == torch.uint8 and ours.shape == (len(paths), 3, size, size)
    diff = (ours.int() - ref.int()).abs().float()
    per_image = diff.mean(dim=(1, 2, 3))
    assert per_image.max() < 3.0, per_image
    assert diff.max() <= max_bound
    assert torch.quantile(diff.flatten()[:1_000_000], 0.99) <= 12
    # a misaligned crop (2 % off centre) is far outside these bounds: the check has teeth
    with Image.open(paths[0]) as img:
        img = img.convert("RGB")
        s = min(img.size)
        left = (img.size[0] - s) / 2 + 0.02 * s
        top = (img.size[1] - s) / 2
        shifted = np.asarray(img.resize((size, size), Image.BICUBIC, box=(left, top, left + s, top + s)))
    shifted_diff = np.abs(shifted.transpose(2, 0, 1).astype(int) - ref[0].numpy().astype(int)).mean()
    assert shifted_diff > 2 * float(per_image[0])


@pytest.mark.parametrize("size", [224, 32])
def test_png_pixels_identical_to_reference(images, size):
    ours, ref = _pair(images["png"], size)
    assert torch.equal(ours, ref)


def test_embeddings_of_draft_and_full_decode_agree(images, tiny_clip_dir):
    bb = load_backbone(f"hf:{tiny_clip_dir}")
    paths = images["jpeg"] + images["png"]
    ours, ref = _pair(paths, bb.image_size)
    with torch.no_grad():
        u = F.normalize(bb.encode_image(ours), dim=-1)
        v = F.normalize(bb.encode_image(ref), dim=-1)
    same = (u * v).sum(dim=1)
    assert same.min() > 0.99, same
    # random weights map all images close together; the draft error must still be far
    # smaller than the distance between two different images
    cross = u @ u.t()
    apart = 1 - cross[~torch.eye(len(paths), dtype=torch.bool)]
    assert (1 - same).max() < 0.05 * apart.min(), ((1 - same).max(), apart.min())


def test_loader_batches_are_uint8(images):
    paths = images["jpeg"] + images["png"]
    ds = ImageDataset(paths, 32)
    loader = make_loader(ds, batch_size=4, num_workers=1)
    seen = []
    for idx, px in loader:
        assert px.dtype == torch.uint8
        assert px.shape[1:] == (3, 32, 32) and len(idx) == len(px) <= 4
        for i, x in zip(idx.tolist(), px):
            assert torch.equal(x, ds[i][1])  # what crossed the process boundary is the item itself
        seen += idx.tolist()
    assert seen == list(range(len(paths)))

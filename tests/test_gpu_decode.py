"""The GPU-decode input path, checked on the CPU.

nvjpeg itself needs CUDA and torchvision; here a stand-in ``torchvision.io`` decodes with
Pillow at full size, which is what nvjpeg returns (same IDCT up to rounding). What is
tested is everything around it: which files go to the GPU, the fallbacks, the batched
resize, and how far the result is from the CPU path's pixels and embeddings.
"""

from __future__ import annotations

import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from mumic.data.dataset import ImageDataset, pixel_batches
from mumic.data.gpu_decode import (
    JpegBytesDataset,
    check_decode,
    decode_batch,
    gpu_decode_available,
    resize_center_crop_tensor,
)
from mumic.data.images import resize_center_crop
from mumic.errors import ConfigError, ImageError


def photo(seed: int, w: int = 640, h: int = 480) -> Image.Image:
    """Smooth colour fields, shapes and mild noise: photo-like content for JPEG."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    base = np.stack([128 + 100 * np.sin(xx / rng.uniform(30, 90) + c) * np.cos(yy / rng.uniform(30, 90)) for c in range(3)], -1)
    base += rng.normal(0, 6, base.shape)
    img = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))
    d = ImageDraw.Draw(img)
    for _ in range(6):
        x0, y0 = int(rng.integers(0, w - 60)), int(rng.integers(0, h - 60))
        d.ellipse([x0, y0, x0 + int(rng.integers(20, 200)), y0 + int(rng.integers(20, 200))],
                  fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
    return img


def install_fake_torchvision(monkeypatch) -> dict[str, int]:
    """torchvision.io.decode_jpeg stand-in: Pillow at full size, batch calls fail as a whole.
    Returns the call counts."""
    calls = {"batch": 0, "single": 0}

    def decode_one(data: torch.Tensor, device) -> torch.Tensor:
        import io

        try:
            with Image.open(io.BytesIO(data.numpy().tobytes())) as im:
                arr = np.asarray(im.convert("RGB"))
        except Exception as e:
            raise RuntimeError(f"nvjpeg stand-in: {e}") from None
        return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous().to(device)

    def decode_jpeg(data, mode=None, device="cpu"):
        if isinstance(data, list):
            calls["batch"] += 1
            return [decode_one(d, device) for d in data]  # one failure fails all, like nvjpeg's batch
        calls["single"] += 1
        return decode_one(data, device)

    io_mod = types.ModuleType("torchvision.io")
    io_mod.decode_jpeg = decode_jpeg
    io_mod.ImageReadMode = types.SimpleNamespace(RGB="RGB")
    tv = types.ModuleType("torchvision")
    tv.io = io_mod
    monkeypatch.setitem(sys.modules, "torchvision", tv)
    monkeypatch.setitem(sys.modules, "torchvision.io", io_mod)
    return calls


def test_resize_matches_pillow_eval_transform():
    """The tensor resize (antialiased bicubic) vs Pillow's on the same full-size pixels."""
    for seed, (w, h) in enumerate([(640, 480), (480, 640), (300, 300), (1000, 250)]):
        img = photo(seed, w, h)
        ref = resize_center_crop(img, 224).astype(np.int16)
        t = torch.from_numpy(np.array(img)).permute(2, 0, 1)
        ours = resize_center_crop_tensor(t, 224).numpy().astype(np.int16)
        assert ours.shape == (3, 224, 224)
        diff = np.abs(ours - ref)
        assert diff.mean() < 1.0, (w, h, diff.mean())
        assert np.percentile(diff, 99) <= 6, (w, h, np.percentile(diff, 99))
        batch = resize_center_crop_tensor(t.unsqueeze(0).repeat(2, 1, 1, 1), 224)
        assert torch.equal(batch[0], torch.from_numpy(ours.astype(np.uint8))) and torch.equal(batch[0], batch[1])


def write_cases(folder: Path) -> dict[str, Path]:
    img = photo(7)
    cases = {"baseline": folder / "a.jpg", "grey": folder / "g.jpg", "png": folder / "p.png", "progressive": folder / "pr.jpg",
             "rotated": folder / "r.jpg", "cmyk": folder / "c.jpg", "truncated": folder / "t.jpg"}
    img.save(cases["baseline"], quality=90)
    img.convert("L").save(cases["grey"], quality=90)
    img.save(cases["png"])
    img.save(cases["progressive"], quality=90, progressive=True)
    exif = Image.Exif()
    exif[0x0112] = 6
    img.save(cases["rotated"], quality=90, exif=exif)
    img.convert("CMYK").save(cases["cmyk"], quality=90)
    cases["truncated"].write_bytes(cases["baseline"].read_bytes()[:2000])
    return cases


def test_worker_sends_only_plain_jpegs_to_the_gpu(tmp_path):
    cases = write_cases(tmp_path)
    names = list(cases)
    ds = JpegBytesDataset([cases[n] for n in names], 224, skip_bad=True)
    kinds = {n: ds[i][1] for i, n in enumerate(names)}
    assert kinds == {"baseline": 0, "grey": 0, "png": 1, "progressive": 1, "rotated": 1, "cmyk": 1, "truncated": 0}
    # a file whose header lies about its size goes the CPU path and gets its limit error
    small = JpegBytesDataset([cases["baseline"]], 224, max_pixels=1000, skip_bad=True)[0]
    assert small[1] == 2 and "too many pixels" in small[3]
    with pytest.raises(ImageError, match="too many pixels"):
        JpegBytesDataset([cases["baseline"]], 224, max_pixels=1000)[0]
    missing = JpegBytesDataset([tmp_path / "nope.jpg"], 224, skip_bad=True)[0]
    assert missing[1] == 2 and "file not found" in missing[3]


def test_raw_batches_pass_pinning_untouched(tmp_path):
    """The DataLoader pins batches on CUDA machines; pinning must not walk the bytes
    (a mutable byte buffer would be copied one element at a time)."""
    from torch.utils.data._utils.pin_memory import pin_memory

    from mumic.data.gpu_decode import collate_raw

    cases = write_cases(tmp_path)
    ds = JpegBytesDataset([cases["baseline"], cases["png"]], 224)
    batch = collate_raw([ds[0], ds[1]])
    assert isinstance(batch[0][2], bytes)
    assert pin_memory(batch) is batch


def test_decode_batch_matches_cpu_path_and_survives_a_bad_file(tmp_path, monkeypatch):
    fake_torchvision = install_fake_torchvision(monkeypatch)
    cases = write_cases(tmp_path)
    names = list(cases)
    paths = [cases[n] for n in names]
    ds = JpegBytesDataset(paths, 224, skip_bad=True)
    idx, px, reasons = decode_batch([ds[i] for i in range(len(ds))], ds, torch.device("cpu"))
    assert idx.tolist() == list(range(len(paths))) and px.shape == (len(paths), 3, 224, 224) and px.dtype == torch.uint8
    # the truncated JPEG failed the batch call, so each went alone; its reason is the CPU path's
    assert fake_torchvision == {"batch": 1, "single": 3}  # baseline, grey, truncated
    bad = names.index("truncated")
    assert "truncated" in reasons[bad] and not px[bad].any()
    assert [r for i, r in enumerate(reasons) if i != bad] == [""] * (len(paths) - 1)
    ref = ImageDataset(paths, 224, skip_bad=True)
    for i, n in enumerate(names):
        if n == "truncated":
            continue
        want = ref[i][1].numpy().astype(np.int16)
        diff = np.abs(px[i].numpy().astype(np.int16) - want)
        # GPU rows decode at full size and resize once; the CPU path decodes at half
        # size (JPEG draft) first; CPU-fallback rows are the CPU path itself
        limit = 0 if n in ("png", "progressive", "rotated", "cmyk") else 3.0
        assert diff.mean() <= limit, (n, diff.mean())


def test_pixel_batches_gpu_path_embeddings_match_cpu_path(tmp_path, monkeypatch):
    """End to end through the lite tower: cosine of the embeddings of both paths."""
    import mumic.data.gpu_decode as gd
    from mumic.backbones import load_backbone

    paths = []
    for i in range(6):
        p = tmp_path / f"{i}.jpg"
        photo(100 + i).save(p, quality=88)
        paths.append(p)
    monkeypatch.setattr(gd, "check_decode", lambda decode, device: None)  # let "gpu" run on the CPU here
    bb = load_backbone("lite", device="cpu")
    install_fake_torchvision(monkeypatch)  # after loading: transformers probes torchvision
    with torch.inference_mode():
        got = {}
        for decode in ("cpu", "gpu"):
            rows = [(idx, bb.encode_image(px)) for idx, px, _ in pixel_batches(paths, bb.image_size, 4, decode=decode)]
            assert torch.cat([r[0] for r in rows]).tolist() == list(range(6))
            got[decode] = torch.nn.functional.normalize(torch.cat([r[1] for r in rows]).float(), dim=-1)
    cos = (got["cpu"] * got["gpu"]).sum(-1)
    assert cos.min() > 0.98, cos


def test_check_decode_names_the_problem(monkeypatch):
    check_decode("cpu", "cpu")
    with pytest.raises(ConfigError, match="decode must be one of cpu, gpu, nvimgcodec, got 'nvjpeg'"):
        check_decode("nvjpeg", "cpu")
    with pytest.raises(ConfigError, match="needs a CUDA device, but the model runs on cpu"):
        check_decode("gpu", "cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setitem(sys.modules, "torchvision", None)  # import fails
    monkeypatch.setitem(sys.modules, "torchvision.io", None)
    with pytest.raises(ConfigError, match="torchvision is not importable"):
        check_decode("gpu", "cuda")


@pytest.mark.skipif(gpu_decode_available() is not None, reason="needs CUDA and torchvision (nvjpeg)")
def test_real_nvjpeg_against_cpu_path(tmp_path):
    """On a CUDA machine with torchvision: nvjpeg's pixels vs the CPU path, and a
    truncated file inside a batch costs only its own row."""
    cases = write_cases(tmp_path)
    names = list(cases)
    paths = [cases[n] for n in names]
    ds = JpegBytesDataset(paths, 224, skip_bad=True)
    idx, px, reasons = decode_batch([ds[i] for i in range(len(ds))], ds, torch.device("cuda"))
    ref = ImageDataset(paths, 224, skip_bad=True)
    for i, n in enumerate(names):
        if n == "truncated":
            continue  # nvjpeg may decode what it can, or refuse it (then the CPU path's reason)
        assert reasons[i] == "", (n, reasons[i])
        diff = (px[i].cpu().int() - ref[i][1].int()).abs().float()
        assert diff.mean() <= 3.0, (n, float(diff.mean()))


def test_pixel_batches_join_worker_slices_into_whole_batches(tmp_path):
    """Large batches are decoded as slices (so every worker has work) and joined: the
    batches, their order and their pixels are those of one big batch."""
    paths = []
    for i in range(150):
        p = tmp_path / f"{i}.png"
        Image.fromarray(np.full((20, 30, 3), i, np.uint8)).save(p)
        paths.append(p)
    paths.insert(7, tmp_path / "missing.png")
    got = list(pixel_batches(paths, 16, 100, skip_bad=True, num_workers=2))
    assert [len(b[0]) for b in got] == [100, 51]  # slices of 50, joined
    idx = torch.cat([b[0] for b in got])
    assert idx.tolist() == list(range(151))
    px = torch.cat([b[1] for b in got])
    reasons = [r for b in got for r in b[2]]
    assert "file not found" in reasons[7] and not px[7].any()
    want = [i for i in range(150)]
    rows = [r for r in range(151) if r != 7]
    assert [int(px[r, 0, 0, 0]) for r in rows] == want

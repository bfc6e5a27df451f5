"""The hardware-JPEG input path (``decode="nvimgcodec"``), checked on the CPU.

nvImageCodec is an optional dependency (``mumic[gpu]``). Here a stand-in module decodes
with Pillow at full size (what the hardware decoder returns, up to IDCT rounding) and
refuses what nvImageCodec refuses; what is tested is everything around it: the packed
batches, the fallbacks to the CPU path, the resize, the errors. Where the real package is
installed its CPU backend runs the same checks; where CUDA is there too, the GPU does.
"""

from __future__ import annotations

import io
import sys
import types

import numpy as np
import pytest
import torch
from PIL import Image

from mumic.data.dataset import ImageDataset, pixel_batches
from mumic.data.gpu_decode import JpegBytesDataset, check_decode
from mumic.data.nvimgcodec_decode import NvImgCodecDecoder, collate_packed, nvimgcodec_missing
from mumic.errors import ConfigError, ImageError
from test_gpu_decode import photo, write_cases

REAL = nvimgcodec_missing() is None
CUDA = torch.cuda.is_available()


def install_fake_nvimgcodec(monkeypatch) -> dict[str, list]:
    """``nvidia.nvimgcodec`` stand-in; returns what the decoder was built with and asked."""
    seen: dict[str, list] = {"decoders": [], "batches": []}

    class CodeStream:
        def __init__(self, array):
            self.data = bytes(np.asarray(array, np.uint8))
            if self.data[:3] != b"\xff\xd8\xff":
                raise RuntimeError("Failed to get image info")

    class Decoder:
        def __init__(self, device_id, max_num_cpu_threads, backends, options):
            seen["decoders"].append({"device_id": device_id, "backends": [b.kind for b in backends], "options": options})

        def decode(self, streams, params=None, cuda_stream=0):
            seen["batches"].append(len(streams))
            out = []
            for s in streams:
                try:
                    with Image.open(io.BytesIO(s.data)) as im:
                        out.append(np.asarray(im.convert("RGB")).copy())  # HWC, DLPack-capable
                except Exception:
                    out.append(None)  # nvImageCodec: None where a stream cannot be decoded
            return out

    nv = types.ModuleType("nvidia.nvimgcodec")
    nv.NVIMGCODEC_DEVICE_CPU_ONLY = -99999
    nv.CodeStream = CodeStream
    nv.Decoder = Decoder
    nv.Backend = lambda kind: types.SimpleNamespace(kind=kind)
    nv.BackendKind = types.SimpleNamespace(HW_GPU_ONLY="hw", GPU_ONLY="gpu", HYBRID_CPU_GPU="hybrid", CPU_ONLY="cpu")
    nv.DecodeParams = lambda **kw: kw
    nv.ColorSpec = types.SimpleNamespace(SRGB="srgb")
    nv.SampleFormat = types.SimpleNamespace(I_RGB="i_rgb")
    pkg = types.ModuleType("nvidia")
    pkg.nvimgcodec = nv
    monkeypatch.setitem(sys.modules, "nvidia", pkg)
    monkeypatch.setitem(sys.modules, "nvidia.nvimgcodec", nv)
    return seen


def test_packed_batch_holds_each_file_and_cpu_row(tmp_path):
    cases = write_cases(tmp_path)
    names = list(cases)
    ds = JpegBytesDataset([cases[n] for n in names], 224, skip_bad=True)
    items = [ds[i] for i in range(len(ds))]
    b = collate_packed(items)
    assert len(b) == len(names) and b.index.tolist() == list(range(len(names)))
    assert b.kind.tolist() == [it[1] for it in items]
    off = b.offsets.tolist()
    for r, n in enumerate(names):
        span = bytes(b.data[off[r] : off[r + 1]].numpy())
        assert span == (cases[n].read_bytes() if items[r][1] == 0 else b"")
    cpu = [r for r, it in enumerate(items) if it[1] == 1]
    assert b.cpu_rows.tolist() == cpu
    for j, r in enumerate(cpu):
        assert torch.equal(b.cpu_pixels[j], torch.from_numpy(items[r][2]))
    from torch.utils.data._utils.pin_memory import pin_memory

    assert pin_memory(b) is b  # the DataLoader's pinning leaves it alone


def check_against_cpu_path(tmp_path, decoder_backends=None) -> dict[str, str]:
    tmp_path.mkdir(parents=True, exist_ok=True)
    cases = write_cases(tmp_path)
    names = list(cases)
    paths = [cases[n] for n in names]
    ds = JpegBytesDataset(paths, 224, skip_bad=True)
    dec = NvImgCodecDecoder("cuda" if CUDA and decoder_backends is None else "cpu", backends=decoder_backends)
    idx, px, reasons = dec.decode(collate_packed([ds[i] for i in range(len(ds))]), ds)
    assert idx.tolist() == list(range(len(paths))) and px.shape == (len(paths), 3, 224, 224) and px.dtype == torch.uint8
    ref = ImageDataset(paths, 224, skip_bad=True)
    for i, n in enumerate(names):
        if n == "truncated":
            continue
        assert reasons[i] == "", (n, reasons[i])
        diff = (px[i].cpu().int() - ref[i][1].int()).abs().float()
        # decoded at full size and resized once, against Pillow's draft decode; rows the
        # workers decoded on the CPU are the CPU path itself
        limit = 0.0 if n in ("png", "progressive", "rotated", "cmyk") else 3.0
        assert diff.mean() <= limit, (n, float(diff.mean()))
    return dict(zip(names, reasons))


def test_decode_matches_cpu_path_and_a_refused_file_gets_the_cpu_error(tmp_path, monkeypatch):
    seen = install_fake_nvimgcodec(monkeypatch)
    reasons = check_against_cpu_path(tmp_path / "a", decoder_backends=None)
    assert "truncated" in reasons["truncated"]  # the stand-in refused it; the CPU path's reason
    assert seen["decoders"][0]["device_id"] == -99999  # no CUDA: the CPU-only device id
    assert seen["decoders"][0]["backends"] == ["hw", "gpu", "hybrid"]  # no CPU-only backend: refusals come back to mumic
    assert seen["batches"] == [3]  # baseline, grey and truncated JPEGs went to the decoder, in one call
    # without skip_bad the truncated file raises the CPU path's ImageError
    (tmp_path / "b").mkdir()
    cases = write_cases(tmp_path / "b")
    ds = JpegBytesDataset([cases["baseline"], cases["truncated"]], 224)
    items = [ds[0], ds[1]]  # the header looks fine: both go to the decoder
    with pytest.raises(ImageError, match="truncated"):
        NvImgCodecDecoder("cpu").decode(collate_packed(items), ds)


def test_pixel_batches_nvimgcodec_path_matches_cpu_path(tmp_path, monkeypatch):
    import mumic.data.gpu_decode as gd

    install_fake_nvimgcodec(monkeypatch)
    monkeypatch.setattr(gd, "check_decode", lambda decode, device: None)  # let it run on the CPU here
    paths = []
    for i in range(5):
        p = tmp_path / f"{i}.jpg"
        photo(200 + i).save(p, quality=88)
        paths.append(p)
    paths.insert(2, tmp_path / "missing.jpg")
    got = {d: list(pixel_batches(paths, 64, 4, skip_bad=True, decode=d)) for d in ("cpu", "nvimgcodec")}
    for d, batches in got.items():
        assert [len(b[0]) for b in batches] == [4, 2], d
    a = torch.cat([b[1] for b in got["cpu"]]).int()
    b = torch.cat([b[1] for b in got["nvimgcodec"]]).int()
    reasons = [r for batch in got["nvimgcodec"] for r in batch[2]]
    assert "file not found" in reasons[2] and not b[2].any() and reasons.count("") == 5
    assert (a - b).abs().float().mean() <= 3.0


def test_selecting_it_without_cuda_or_the_package_names_what_is_missing(monkeypatch):
    with pytest.raises(ConfigError, match=r"decode must be one of cpu, gpu, nvimgcodec, got 'dali'"):
        check_decode("dali", "cpu")
    with pytest.raises(ConfigError, match=r"^decode 'nvimgcodec' needs a CUDA device, but the model runs on cpu; use decode 'cpu'$"):
        check_decode("nvimgcodec", "cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setitem(sys.modules, "nvidia", None)  # the import fails, as without the package
    monkeypatch.setitem(sys.modules, "nvidia.nvimgcodec", None)
    with pytest.raises(ConfigError, match=r"needs nvImageCodec, which is not importable .*install it with pip install 'mumic\[gpu\]'"):
        check_decode("nvimgcodec", "cuda")
    install_fake_nvimgcodec(monkeypatch)
    check_decode("nvimgcodec", "cuda")  # package and (stand-in) CUDA: accepted


def test_cli_offers_the_choice():
    import argparse

    from mumic.cli._options import add_decode_option

    p = argparse.ArgumentParser()
    add_decode_option(p)
    assert p.parse_args(["--decode", "nvimgcodec"]).decode == "nvimgcodec"


@pytest.mark.skipif(not REAL, reason="needs nvImageCodec (pip install 'mumic[gpu]')")
def test_real_nvimgcodec_cpu_backend_against_cpu_path(tmp_path):
    """The real library through its CPU backend: the calls mumic makes are the ones it takes."""
    reasons = check_against_cpu_path(tmp_path, decoder_backends=["CPU_ONLY"])
    assert reasons["truncated"] == "" or "truncated" in reasons["truncated"]


@pytest.mark.skipif(not (REAL and CUDA), reason="needs a CUDA device and nvImageCodec (pip install 'mumic[gpu]')")
def test_real_nvimgcodec_on_the_gpu_against_cpu_path(tmp_path):
    """On a CUDA machine: the hardware/CUDA decoders' pixels vs the CPU path; a truncated
    file costs only its own row."""
    reasons = check_against_cpu_path(tmp_path, decoder_backends=None)
    assert reasons["truncated"] == "" or "truncated" in reasons["truncated"]

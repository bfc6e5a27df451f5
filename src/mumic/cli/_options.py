"""Options shared by several verbs."""

from __future__ import annotations

import argparse


def add_manifest_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--allow-outside-paths", action="store_true",
                   help="accept manifest image paths outside the manifest's folder (only for manifests you trust)")
    p.add_argument("--allow-duplicate-rows", action="store_true", help="keep exact duplicate manifest rows instead of refusing them")


def add_engine_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--engine", choices=("auto", "torch", "onnxruntime"), default="auto",
                   help="what runs the image tower (and lite's frozen text tower): onnxruntime (CPU only; each graph is "
                        "exported once and cached), torch, or auto (default: onnxruntime on the CPU, torch on GPUs)")


def add_decode_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--decode", choices=("cpu", "gpu", "nvimgcodec"), default="cpu",
                   help="where JPEGs are decoded and resized: in the DataLoader workers (cpu, default), with nvjpeg "
                        "on the CUDA device (gpu; needs torchvision), or on the GPU's hardware JPEG engines (nvimgcodec; "
                        "needs pip install 'mumic[gpu]'); other formats always decode on the CPU")


def add_device_options(p: argparse.ArgumentParser, *, batch_size: int) -> None:
    """--batch-size, --num-workers and --device: how images reach the model."""
    p.add_argument("--batch-size", type=int, default=batch_size, help=f"images per forward pass (default: {batch_size})")
    p.add_argument("--num-workers", type=int, default=0, help="DataLoader worker processes for decoding (default: 0)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: auto)")


def add_batch_options(p: argparse.ArgumentParser) -> None:
    """Options of the commands that stream a manifest through a run (predict, embed)."""
    p.add_argument("--compile", action="store_true", help="run the image tower through torch.compile (pays off on large jobs)")
    p.add_argument("--on-bad-image", choices=("fail", "skip"), default="fail",
                   help="an unreadable image stops the job (fail, default) or is left out and listed in OUT.skipped.csv (skip)")
    p.add_argument("--shard-rows", type=int, default=4096,
                   help="rows per output shard: the unit of resuming and, under torchrun, of work per rank (default: 4096)")
    add_device_options(p, batch_size=32)
    add_decode_option(p)
    add_engine_option(p)
    add_manifest_options(p)

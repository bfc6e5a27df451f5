"""Backbones: image and text towers with projections into one embedding space.

`load_backbone("lite")` or `load_backbone("hf:<name or local dir>")`; see base.Backbone for
the interface every adapter provides.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from mumic.errors import BackboneError

if TYPE_CHECKING:  # importing the package stays torch-free (the CLI reads backbones.onnx constants)
    import torch

    from mumic.backbones.base import Backbone

__all__ = ["load_backbone", "VALID_SPECS"]

logger = logging.getLogger(__name__)

VALID_SPECS = "'lite', or 'hf:<model name or local directory>' (a CLIP or SigLIP model)"


def load_backbone(
    spec: str,
    *,
    image_size: int | None = None,
    image_head: str | None = None,
    device: str | torch.device = "cpu",
    seed: int = 0,
    lazy_text: bool = False,
) -> Backbone:
    """Build the backbone named by `spec`, with frozen towers, in eval mode, on `device`.

    image_size: resolution to run at (default: the adapter's). image_head: "mlp" (default)
    or "linear" for 'lite'; 'hf:' always uses its pretrained projection ("pretrained").
    New heads are initialised from `seed`, without touching the global random state.
    lazy_text: load a frozen text tower only when text is first encoded (where the
    adapter can; 'hf:' loads both towers from one checkpoint).
    """
    import torch

    if not isinstance(spec, str):
        raise BackboneError(f"backbone must be a string: {VALID_SPECS}; got {spec!r}")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise BackboneError(f"unknown device {device!r}: use e.g. 'cpu' or 'cuda'") from exc
    name = spec.strip()
    if name == "lite":
        from mumic.backbones.lite import LiteBackbone

        backbone: Backbone = LiteBackbone(image_size=image_size, image_head=image_head, seed=seed, lazy_text=lazy_text)
    elif name.startswith("hf:"):
        from mumic.backbones.hf import HFBackbone

        backbone = HFBackbone(name[3:].strip(), image_size=image_size, image_head=image_head, seed=seed)
    else:
        raise BackboneError(f"unknown backbone {spec!r}: use {VALID_SPECS}")
    try:
        return backbone.to(dev)
    except (RuntimeError, AssertionError) as exc:
        raise BackboneError(f"could not move backbone {spec!r} to {dev}: {exc}") from exc

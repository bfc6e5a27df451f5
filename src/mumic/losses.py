"""Losses on a [N, C] matrix of logits with {0,1} targets and a mask of known cells, and
the registry of the losses a run can train with.

All losses average over the known (image, label) cells, so masking unknown labels
changes what is learned, not the scale of the loss. The tempered-sigmoid BCE of MuMIC is
`bce` applied to z = s / tau + b (the model computes z); the comparison losses take the
same logits so an ablation changes one thing at a time.

Importing this module does not import torch (the command line's --help lists the loss
names); the loss functions import it when first called.
"""

from __future__ import annotations

import types
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from mumic.errors import ConfigError

if TYPE_CHECKING:
    import torch


def _known(y: torch.Tensor, known: torch.Tensor | None) -> torch.Tensor:
    import torch

    return torch.ones_like(y, dtype=torch.bool) if known is None else known.bool()


def bce(logits: torch.Tensor, y: torch.Tensor, known: torch.Tensor | None = None) -> torch.Tensor:
    """Binary cross-entropy with logits, averaged over known cells.

    For a negative cell dL/dz = sigmoid(z): with z = s / tau + b the gradient grows
    exponentially with the similarity of the negative, which is the hardness-aware
    behaviour of the tempered sigmoid.
    """
    import torch.nn.functional as F

    k = _known(y, known)
    cell = F.binary_cross_entropy_with_logits(logits, y.to(logits.dtype), reduction="none")
    return (cell * k).sum() / k.sum().clamp_min(1)


def softmax_ce(logits: torch.Tensor, y: torch.Tensor, known: torch.Tensor | None = None) -> torch.Tensor:
    """Softmax cross-entropy over classes with the target spread evenly over the positives.

    Unknown cells are excluded from the softmax; images without a known positive are skipped.
    """
    import torch

    k = _known(y, known)
    pos = (y > 0.5) & k
    n_pos = pos.sum(1)
    rows = n_pos > 0
    if not bool(rows.any()):
        return logits.sum() * 0.0
    masked = logits.masked_fill(~k, float("-inf"))
    logp = torch.log_softmax(masked[rows], dim=1)
    target = pos[rows].to(logits.dtype) / n_pos[rows, None].to(logits.dtype)
    # 0 * -inf must contribute 0, not nan
    contrib = torch.where(pos[rows], target * logp, torch.zeros_like(logp))
    return -contrib.sum(1).mean()


def asl(
    logits: torch.Tensor,
    y: torch.Tensor,
    known: torch.Tensor | None = None,
    gamma_neg: float = 4.0,
    gamma_pos: float = 0.0,
    clip: float = 0.05,
    eps: float = 1e-8,
) -> torch.Tensor:
    """Asymmetric Loss: focusing on positives and down-weighted, shifted negatives.

    L+ = (1-p)^gamma_pos log p,  L- = p_m^gamma_neg log(1 - p_m),  p_m = max(p - clip, 0).
    Averaged over known cells (the original sums; the mean keeps learning rates comparable).
    """
    import torch

    k = _known(y, known)
    yy = y.to(logits.dtype)
    p = torch.sigmoid(logits)
    p_m = (p - clip).clamp(min=0) if clip > 0 else p
    loss_pos = yy * torch.log(p.clamp(min=eps)) * (1 - p).pow(gamma_pos)
    loss_neg = (1 - yy) * torch.log((1 - p_m).clamp(min=eps)) * p_m.pow(gamma_neg)
    cell = -(loss_pos + loss_neg)
    return (cell * k).sum() / k.sum().clamp_min(1)


def bootstrap_bce(logits: torch.Tensor, y: torch.Tensor, known: torch.Tensor | None = None, beta: float = 0.5) -> torch.Tensor:
    """BCE whose negative cells are softly bootstrapped toward the model's own belief
    (Reed et al., 2015, applied to negatives only): a negative's target is beta x sg(p).

    A missing tag is an unlisted positive; where the model is confident it is there, its
    negative target rises with p and the push to suppress it shrinks (the gradient of a
    negative cell is p - beta x sg(p) = (1 - beta) p instead of p). Listed positives keep target 1,
    so added false positives are not helped: the option targets missing tags, the common noise.
    """
    import torch
    import torch.nn.functional as F

    k = _known(y, known)
    yy = y.to(logits.dtype)
    target = yy + (1 - yy) * beta * torch.sigmoid(logits.detach())
    cell = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    return (cell * k).sum() / k.sum().clamp_min(1)


Head = Literal["prompt", "linear"]


@dataclass(frozen=True)
class LossSpec:
    """What a loss name means for a run: the loss on the logits, which head makes them,
    and how tau and b start."""

    name: str
    fn: Callable[..., torch.Tensor]  # (logits [N, C], y, known) -> scalar
    head: Head  # "prompt": z = cos(u, v_c) / tau + b over class text embeddings; "linear": a linear classifier
    learns_tau: bool  # False: tau stays at its initial value whatever learn_tau says
    prior_bias: bool  # b starts where the mean predicted probability matches the label prior
    tau: float | None  # initial tau when none is configured (None: from the backbone's logit scale)
    summary: str


LOSSES: Mapping[str, LossSpec] = types.MappingProxyType({s.name: s for s in (
    LossSpec("tempered_sigmoid", bce, "prompt", learns_tau=True, prior_bias=True, tau=None,
             summary="BCE on cosine / tau + b, tau learned (MuMIC)"),
    LossSpec("tempered_sigmoid_fixed", bce, "prompt", learns_tau=False, prior_bias=True, tau=1.0,
             summary="BCE on cosine / tau + b, tau fixed (1 by default)"),
    LossSpec("linear_bce", bce, "linear", learns_tau=True, prior_bias=True, tau=None,
             summary="BCE on a linear classifier over image embeddings (the usual baseline)"),
    # a shared b cancels in the softmax, so it is not fitted to the prior
    LossSpec("softmax_ce", softmax_ce, "prompt", learns_tau=True, prior_bias=False, tau=None,
             summary="CLIP-style softmax over classes, multi-positive targets"),
    LossSpec("asl", asl, "prompt", learns_tau=True, prior_bias=True, tau=None,
             summary="Asymmetric Loss (Ridnik et al., 2021) on cosine / tau + b"),
    # noise-robust options: the same heads with negatives bootstrapped toward the model's belief
    LossSpec("tempered_sigmoid_bootstrap", bootstrap_bce, "prompt", learns_tau=True, prior_bias=True, tau=None,
             summary="MuMIC's BCE with unlisted negatives softly bootstrapped (target 0.5 x p): for missing tags"),
    LossSpec("linear_bce_bootstrap", bootstrap_bce, "linear", learns_tau=True, prior_bias=True, tau=None,
             summary="the linear baseline with the same bootstrapped negatives"),
)})
LOSS_NAMES = tuple(LOSSES)


def loss_spec(name: str) -> LossSpec:
    """The registry entry of a loss name; an unknown name is a ConfigError listing the known ones."""
    try:
        return LOSSES[name]
    except (KeyError, TypeError):
        raise ConfigError(f"unknown loss {name!r}; choose one of {', '.join(LOSS_NAMES)}") from None

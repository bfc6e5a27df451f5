"""Losses on a [N, C] matrix of logits with {0,1} targets and a mask of known cells.

All losses average over the known (image, label) cells, so masking unknown labels
changes what is learned, not the scale of the loss. The tempered-sigmoid BCE of MuMIC is
`bce` applied to z = s / tau + b (the model computes z); the comparison losses take the
same logits so an ablation changes one thing at a time.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mumic.errors import ConfigError

# loss name -> (function, what the model's logits are)
#   tempered_sigmoid        BCE on cosine / tau + b, tau learned           (MuMIC)
#   tempered_sigmoid_fixed  BCE on cosine / tau + b, tau fixed (1 by default)
#   linear_bce              BCE on a linear classifier over image embeddings (the usual baseline)
#   softmax_ce              CLIP-style softmax over classes, multi-positive targets
#   asl                     Asymmetric Loss (Ridnik et al., 2021) on cosine / tau + b
LOSS_NAMES = ("tempered_sigmoid", "tempered_sigmoid_fixed", "linear_bce", "softmax_ce", "asl")


def _known(y: torch.Tensor, known: torch.Tensor | None) -> torch.Tensor:
    return torch.ones_like(y, dtype=torch.bool) if known is None else known.bool()


def bce(logits: torch.Tensor, y: torch.Tensor, known: torch.Tensor | None = None) -> torch.Tensor:
    """Binary cross-entropy with logits, averaged over known cells.

    For a negative cell dL/dz = sigmoid(z): with z = s / tau + b the gradient grows
    exponentially with the similarity of the negative, which is the hardness-aware
    behaviour of the tempered sigmoid.
    """
    k = _known(y, known)
    cell = F.binary_cross_entropy_with_logits(logits, y.to(logits.dtype), reduction="none")
    return (cell * k).sum() / k.sum().clamp_min(1)


def softmax_ce(logits: torch.Tensor, y: torch.Tensor, known: torch.Tensor | None = None) -> torch.Tensor:
    """Softmax cross-entropy over classes with the target spread evenly over the positives.

    Unknown cells are excluded from the softmax; images without a known positive are skipped.
    """
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
    k = _known(y, known)
    yy = y.to(logits.dtype)
    p = torch.sigmoid(logits)
    p_m = (p - clip).clamp(min=0) if clip > 0 else p
    loss_pos = yy * torch.log(p.clamp(min=eps)) * (1 - p).pow(gamma_pos)
    loss_neg = (1 - yy) * torch.log((1 - p_m).clamp(min=eps)) * p_m.pow(gamma_neg)
    cell = -(loss_pos + loss_neg)
    return (cell * k).sum() / k.sum().clamp_min(1)


def get_loss(name: str):
    """The loss function for a loss name (see LOSS_NAMES)."""
    if name in ("tempered_sigmoid", "tempered_sigmoid_fixed", "linear_bce"):
        return bce
    if name == "softmax_ce":
        return softmax_ce
    if name == "asl":
        return asl
    raise ConfigError(f"unknown loss {name!r}; choose one of {', '.join(LOSS_NAMES)}")

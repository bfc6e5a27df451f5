"""The classifier on top of the image embeddings, written once for training, serving and
export:

    s = normalize(u) . v_c         cosine of the image embedding and the class embedding
    z = s / tau + b_c              the tempered logit;  p = sigmoid(z)

`v_c` comes from the prompts of class c (see `MuMIC.class_embeddings`), so a label never
trained on is scored by the same formula, with the mean b (zero-shot). The linear head of
the baseline scores only its trained labels.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F

MAX_INV_TAU = 100.0
FORMULA = "p = sigmoid(dot(image_embedding, label_embedding) / tau + bias)"
"""The scoring in words, as written into exports (the embeddings are L2-normalised)."""


def inv_tau(log_inv_tau: torch.Tensor) -> torch.Tensor:
    """1/tau from its log-parametrisation, clamped to at most MAX_INV_TAU."""
    return log_inv_tau.clamp(max=math.log(MAX_INV_TAU)).exp()


def tempered_logits(u_raw: torch.Tensor, v: torch.Tensor, inv_tau: torch.Tensor | float, bias: torch.Tensor | float) -> torch.Tensor:
    """[N, C] logits z = normalize(u) . v / tau + b for normalised class embeddings v [C, D]
    and biases b (a scalar or [C])."""
    return F.normalize(u_raw, dim=-1) @ v.t() * inv_tau + bias


def tempered_probabilities(u_raw: torch.Tensor, v: torch.Tensor, inv_tau: torch.Tensor | float, bias: torch.Tensor | float) -> torch.Tensor:
    """[N, C] probabilities sigmoid(z) of `tempered_logits`."""
    return torch.sigmoid(tempered_logits(u_raw, v, inv_tau, bias))


def label_biases(bias: torch.Tensor, seen_index: Mapping[str, int], names: Sequence[str], seen: Sequence[bool]) -> torch.Tensor:
    """b for each label: its own where b is per label and the label was trained, else the
    mean b (zero-shot labels, and every label when b is shared)."""
    if bias.numel() == 1:
        return bias.expand(len(names))
    mean = bias.mean()
    idx = [seen_index.get(n) if s else None for n, s in zip(names, seen)]
    return torch.stack([bias[i] if i is not None else mean for i in idx])


def prior_bias(s: torch.Tensor, prior: torch.Tensor, per_label: bool, steps: int = 60) -> torch.Tensor:
    """The b at which the mean sigmoid(s + b) over images matches the label prior: one
    scalar for the mean prior, or one b per label (bisection; the mean is monotone in b)."""
    target = prior if per_label else prior.mean()
    lo = torch.full_like(target, -50.0)
    hi = torch.full_like(target, 50.0)
    for _ in range(steps):
        mid = (lo + hi) / 2
        p = torch.sigmoid(s + mid).mean(0) if per_label else torch.sigmoid(s + mid).mean()
        lo = torch.where(p < target, mid, lo)
        hi = torch.where(p < target, hi, mid)
    return (lo + hi) / 2


def linear_prior_bias(prior: torch.Tensor) -> torch.Tensor:
    """The linear head's bias at which sigmoid(b) is the label prior: logit(prior)."""
    return torch.log(prior / (1 - prior))

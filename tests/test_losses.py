import math

import numpy as np
import pytest
import torch
from sklearn.metrics import log_loss

from mumic.errors import ConfigError
from mumic.losses import LOSS_NAMES, asl, bce, get_loss, softmax_ce


def _data(seed=0, n=7, c=5):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, c, generator=g) * 3
    y = (torch.rand(n, c, generator=g) < 0.3).float()
    return z, y


def test_bce_matches_sklearn_log_loss():
    z, y = _data()
    p = torch.sigmoid(z).numpy().ravel()
    ref = log_loss(y.numpy().ravel(), p, labels=[0, 1])
    assert bce(z, y).item() == pytest.approx(ref, rel=1e-5)


def test_bce_mask_averages_over_known_cells_only():
    z, y = _data(1)
    known = torch.rand(z.shape, generator=torch.Generator().manual_seed(3)) < 0.6
    keep = known.numpy().ravel()
    ref = log_loss(y.numpy().ravel()[keep], torch.sigmoid(z).numpy().ravel()[keep], labels=[0, 1])
    assert bce(z, y, known).item() == pytest.approx(ref, rel=1e-5)
    # changing an unknown cell's logit changes nothing
    z2 = z.clone()
    z2[~known] += 100
    assert bce(z2, y, known).item() == pytest.approx(bce(z, y, known).item(), rel=1e-6)


def test_tempered_sigmoid_gradient_is_hardness_aware():
    # for a negative cell, dL/ds = sigmoid(s/tau + b) / tau / (#cells): harder negatives get more gradient
    tau, b = 0.07, -8.0
    s = torch.tensor([[0.1, 0.3, 0.5]], requires_grad=True)
    y = torch.zeros(1, 3)
    bce(s / tau + b, y).backward()
    expected = torch.sigmoid(s.detach() / tau + b) / tau / 3
    assert torch.allclose(s.grad, expected, rtol=1e-5)
    assert s.grad[0, 2] > 10 * s.grad[0, 0]


def test_softmax_ce_hand_worked():
    # one image, logits [0, ln 2, ln 3]: softmax = [1, 2, 3] / 6; positives 1 and 2 -> target [0, .5, .5]
    z = torch.tensor([[0.0, math.log(2), math.log(3)]])
    y = torch.tensor([[0.0, 1.0, 1.0]])
    expected = -0.5 * math.log(2 / 6) - 0.5 * math.log(3 / 6)
    assert softmax_ce(z, y).item() == pytest.approx(expected, rel=1e-6)
    # masking label 0 removes it from the softmax: [2, 3] / 5
    known = torch.tensor([[False, True, True]])
    expected_m = -0.5 * math.log(2 / 5) - 0.5 * math.log(3 / 5)
    assert softmax_ce(z, y, known).item() == pytest.approx(expected_m, rel=1e-6)


def test_softmax_ce_skips_images_without_positives():
    z = torch.tensor([[1.0, 2.0], [5.0, -1.0]])
    y = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    only_first = softmax_ce(z[:1], y[:1])
    assert softmax_ce(z, y).item() == pytest.approx(only_first.item())
    assert softmax_ce(z, torch.zeros_like(y)).item() == 0.0


def test_asl_reduces_to_bce_without_focusing_or_clip():
    z, y = _data(2)
    assert asl(z, y, gamma_neg=0, gamma_pos=0, clip=0).item() == pytest.approx(bce(z, y).item(), rel=1e-4)


def test_asl_against_direct_formula():
    z, y = _data(4)
    p = torch.sigmoid(z).double().numpy()
    yy = y.numpy()
    pm = np.clip(p - 0.05, 0, None)
    ref = -(yy * np.log(p) + (1 - yy) * np.log(1 - pm) * pm**4).mean()
    assert asl(z, y).item() == pytest.approx(ref, rel=1e-4)


def test_get_loss_names_and_error():
    for name in LOSS_NAMES:
        assert callable(get_loss(name))
    with pytest.raises(ConfigError, match="unknown loss 'focal'"):
        get_loss("focal")

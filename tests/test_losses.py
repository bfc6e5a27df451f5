import math

import numpy as np
import pytest
import torch
from sklearn.metrics import log_loss

from mumic.errors import ConfigError
from mumic.losses import LOSS_NAMES, LOSSES, asl, bce, loss_spec, softmax_ce


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


def _brute_force(name, z, y, known):
    """Each loss written out cell by cell in plain Python, averaged as the docstrings say."""
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    n, c = len(z), len(z[0])
    cells = [(i, j) for i in range(n) for j in range(c) if known[i][j]]
    if name in ("tempered_sigmoid", "tempered_sigmoid_fixed", "linear_bce"):
        per = [-(y[i][j] * math.log(sig(z[i][j])) + (1 - y[i][j]) * math.log(1 - sig(z[i][j]))) for i, j in cells]
        return sum(per) / len(cells)
    if name in ("tempered_sigmoid_bootstrap", "linear_bce_bootstrap"):  # a negative's target is 0.5 x p
        per = []
        for i, j in cells:
            p = sig(z[i][j])
            t = 1.0 if y[i][j] else 0.5 * p
            per.append(-(t * math.log(p) + (1 - t) * math.log(1 - p)))
        return sum(per) / len(cells)
    if name == "asl":  # gamma_neg 4, gamma_pos 0, clip 0.05
        per = []
        for i, j in cells:
            p = sig(z[i][j])
            pm = max(p - 0.05, 0.0)
            per.append(-(math.log(p) if y[i][j] else pm**4 * math.log(1 - pm)))
        return sum(per) / len(cells)
    if name == "softmax_ce":
        rows = []
        for i in range(n):
            ks = [j for j in range(c) if known[i][j]]
            pos = [j for j in ks if y[i][j]]
            if pos:
                log_norm = math.log(sum(math.exp(z[i][j]) for j in ks))
                rows.append(-sum((z[i][j] - log_norm) / len(pos) for j in pos))
        return sum(rows) / len(rows)
    raise AssertionError(f"no reference for {name}")


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_each_registered_loss_matches_a_brute_force_reference(name):
    z, y = _data(5, n=6, c=4)
    known = torch.rand(z.shape, generator=torch.Generator().manual_seed(6)) < 0.8
    ref = _brute_force(name, z.double().tolist(), y.tolist(), known.tolist())
    assert loss_spec(name).fn(z.double(), y, known).item() == pytest.approx(ref, rel=1e-9)


def test_registry_says_what_each_loss_needs():
    assert tuple(LOSSES) == LOSS_NAMES and all(LOSSES[n].name == n for n in LOSS_NAMES)
    assert [n for n in LOSS_NAMES if LOSSES[n].head == "linear"] == ["linear_bce", "linear_bce_bootstrap"]
    assert [n for n in LOSS_NAMES if not LOSSES[n].learns_tau] == ["tempered_sigmoid_fixed"]
    assert loss_spec("tempered_sigmoid_fixed").tau == 1.0 and loss_spec("tempered_sigmoid").tau is None
    assert [n for n in LOSS_NAMES if not LOSSES[n].prior_bias] == ["softmax_ce"]
    with pytest.raises(ConfigError, match="unknown loss 'focal'; choose one of tempered_sigmoid, tempered_sigmoid_fixed, "):
        loss_spec("focal")


def test_the_registry_and_config_import_no_torch():
    import os
    import subprocess
    import sys
    from pathlib import Path

    import mumic

    env = dict(os.environ, PYTHONPATH=str(Path(mumic.__file__).parents[1]))
    code = "import sys, mumic.config, mumic.losses; print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"

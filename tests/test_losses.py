"""Losses on hand cases (2 RoIs, 2 classes + background), reductions to CE, gradients, scores."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from heads.losses import (LOSSES, CrossEntropy, Focal, Gumbel, GumbelOptimised, Margin, Reweighted,
                          droploss_weights, gol_loss, gumbel_loss, gumbel_scores)
from tests.test_train_heads_support import make_class_info

LOGITS = torch.tensor([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0]])


def _info(instance_count, image_classes=None, frequency=None):
    image_classes = image_classes or [{0, 1}]
    return make_class_info(image_classes=image_classes, num_classes=len(instance_count),
                           instance_count=np.array(instance_count), frequency=frequency)


def _ce_row(logits, label):
    return math.log(sum(math.exp(v) for v in logits)) - logits[label]


def test_ce_hand_value():
    labels = torch.tensor([0, 2])
    want = ((math.log(math.e + 2) - 1) + math.log(2 + math.e ** 2)) / 2
    got = CrossEntropy(class_info=_info([5, 5]))(LOGITS, labels)
    assert got.item() == pytest.approx(want, rel=1e-6)


def test_reweight_hand_value():
    # N = 100: w0 = clamp(100/1000) = 0.1, w1 = clamp(100/5 = 20) = 10, background 1
    loss = Reweighted(class_info=_info([1000, 5]))
    np.testing.assert_allclose(loss.class_weights.numpy(), [0.1, 10.0, 1.0], rtol=1e-6)
    labels = torch.tensor([0, 1])
    want = (0.1 * _ce_row([1, 0, 0], 0) + 10 * _ce_row([0, 2, 0], 1)) / 2
    assert loss(LOGITS, labels).item() == pytest.approx(want, rel=1e-6)


def test_focal_hand_value():
    labels = torch.tensor([0, 1])
    p0 = math.e / (math.e + 2)
    p1 = math.e ** 2 / (math.e ** 2 + 2)
    want = (-0.5 * (1 - p0) ** 3 * math.log(p0) - 0.5 * (1 - p1) ** 3 * math.log(p1)) / 2
    assert Focal(class_info=_info([5, 5]))(LOGITS, labels).item() == pytest.approx(want, rel=1e-6)


def test_margin_hand_value():
    # Δ_j = 6 / N_j^(1/4): N = 16 -> 3, N = 81 -> 2; background 0
    loss = Margin(class_info=_info([16, 81]))
    np.testing.assert_allclose(loss.margins.numpy(), [3.0, 2.0, 0.0], rtol=1e-6)
    labels = torch.tensor([0, 1])
    want = (_ce_row([1 - 3, 0, 0], 0) + _ce_row([0, 2 - 2, 0], 1)) / 2  # = (log(e^-2 + 2) + 2 + log 3) / 2
    assert loss(LOGITS, labels).item() == pytest.approx(want, rel=1e-6)


def _neg(q):  # -log(1 - exp(-exp(-q)))
    return -math.log(1 - math.exp(-math.exp(-q)))


def test_gumbel_hand_value_and_clipping():
    logits = torch.tensor([[0.5, -1.0, 2.0]])
    want = math.exp(-0.5) + _neg(-1.0) + _neg(2.0)          # class 0 positive, the rest negative
    assert gumbel_loss(logits, torch.tensor([0])).item() == pytest.approx(want, rel=1e-6)
    # without the background output (GOL code): the background term is left out
    got = gumbel_loss(logits, torch.tensor([0]), train_background=False)
    assert got.item() == pytest.approx(math.exp(-0.5) + _neg(-1.0), rel=1e-6)
    # q is clipped to [-4, 10] before η
    far = torch.tensor([[12.0, -9.0, -9.0]])
    want = math.exp(-10.0) + 2 * _neg(-4.0)
    assert gumbel_loss(far, torch.tensor([0])).item() == pytest.approx(want, rel=1e-5)


def test_gol_hand_value_when_the_bernoulli_is_degenerate():
    # tail = class 0 (image frequency 1/4 < λ = 0.3); class 1 frequent.
    info = _info([3, 40], image_classes=[{0, 1}, {1}, {1}, {1}])
    loss = GumbelOptimised(class_info=info, num_train_images=4, lam=0.3)
    assert loss.tail.tolist() == [True, False]
    logits = torch.tensor([[0.3, 1.2, -0.7], [-0.2, 0.4, 1.5]])
    labels = torch.tensor([1, 2])  # fg of a non-tail class, then background -> μ = 0/1 = 0
    # row 0 (fg): tail negative dropped; row 1 (bg, μ = 0): tail negative dropped too
    want = ((math.exp(-1.2) + _neg(-0.7)) + (_neg(0.4) + math.exp(-1.5))) / 2
    got = loss(logits, labels, generator=torch.Generator().manual_seed(0))
    assert got.item() == pytest.approx(want, rel=1e-6)
    # μ = 1 when every fg RoI is of a tail class: nothing is dropped on background RoIs
    labels = torch.tensor([0, 2])
    want = ((math.exp(-0.3) + _neg(1.2) + _neg(-0.7)) + (_neg(-0.2) + _neg(0.4) + math.exp(-1.5))) / 2
    assert loss(logits, labels, generator=torch.Generator().manual_seed(0)).item() == pytest.approx(want, rel=1e-6)
    clamped = GumbelOptimised(class_info=info, num_train_images=4, lam=0.3, clamp_max=1.0)
    assert clamped(logits, labels, generator=torch.Generator().manual_seed(0)).item() == pytest.approx(1.0)


def test_droploss_background_keep_rate_follows_the_batch_foreground_mix():
    tail = torch.tensor([True, False, True])
    labels = torch.tensor([0] * 30 + [1] * 90 + [3] * 4000)  # μ = 30 / 120 = 0.25
    w = droploss_weights(labels, tail=tail, generator=torch.Generator().manual_seed(1))
    bg = w[120:]
    assert bg[:, 1].eq(1).all() and bg[:, 3].eq(1).all()        # non-tail and background always kept
    assert bg[:, [0, 2]].mean().item() == pytest.approx(0.25, abs=0.015)
    assert w[:30].eq(torch.tensor([1.0, 1.0, 0.0, 1.0])).all()  # fg of tail class 0: other tail negative dropped
    assert w[30:120].eq(torch.tensor([0.0, 1.0, 0.0, 1.0])).all()
    paper = droploss_weights(labels, tail=tail, generator=torch.Generator().manual_seed(1), background_mode="paper",
                             frequent=torch.tensor([False, True, False]))
    assert paper[120:, 1].mean().item() == pytest.approx(0.75, abs=0.03)  # μ = n_frequent / n_all


def test_reductions_to_plain_cross_entropy():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 4, generator=g)
    labels = torch.tensor([0, 1, 2, 3, 3, 1])
    ce = CrossEntropy(class_info=_info([5, 5, 5]))(logits, labels)
    info_100 = _info([100, 100, 100], image_classes=[{0, 1, 2}])
    assert Reweighted(class_info=info_100)(logits, labels).item() == pytest.approx(ce.item(), rel=1e-6)
    assert Margin(class_info=info_100, c=0.0)(logits, labels).item() == pytest.approx(ce.item(), rel=1e-6)
    assert Focal(class_info=info_100, gamma=0.0, alpha=1.0)(logits, labels).item() == pytest.approx(ce.item(), rel=1e-6)
    # GOL with no tail class is plain Gumbel
    gol = GumbelOptimised(class_info=info_100, num_train_images=1, lam=0.0)
    gum = Gumbel(class_info=info_100)
    assert gol(logits, labels, generator=g).item() == pytest.approx(gum(logits, labels).item(), rel=1e-6)
    assert gol_loss(logits, labels, tail=torch.zeros(3, dtype=torch.bool), generator=g).item() == \
        pytest.approx(gum(logits, labels).item(), rel=1e-6)


@pytest.mark.parametrize("name", list(LOSSES))
def test_gradients_are_finite_even_for_extreme_logits(name):
    info = _info([1, 50, 5000], image_classes=[{0, 1, 2}, {1, 2}, {2}])
    kwargs = {"num_train_images": 3} if name == "gol" else {}
    loss = LOSSES[name](class_info=info, **kwargs)
    logits = torch.tensor([[60.0, -60.0, 0.0, 3.0], [-80.0, 80.0, 1.0, 0.0], [0.1, 0.2, 0.3, 0.4]],
                          requires_grad=True)
    value = loss(logits, torch.tensor([0, 3, 2]), generator=torch.Generator().manual_seed(0))
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(logits.grad).all()
    probs = loss.scores(logits.detach())
    assert probs.shape == (3, 4) and torch.all((probs >= 0) & (probs <= 1))


def test_scores_softmax_and_gumbel():
    info = _info([5, 5])
    p = CrossEntropy(class_info=info).scores(LOGITS)
    np.testing.assert_allclose(p.sum(1).numpy(), [1.0, 1.0], rtol=1e-6)
    q = Gumbel(class_info=info).scores(torch.tensor([[0.0, 1.0, -1.0]]))
    np.testing.assert_allclose(q.numpy(), [[math.exp(-1), math.exp(-math.exp(-1)), math.exp(-math.e)]], rtol=1e-6)
    prod = gumbel_scores(torch.tensor([[0.0, 1.0, 5.0]]), background="product")
    want_bg = (1 - math.exp(-1)) * (1 - math.exp(-math.exp(-1)))
    assert prod[0, 2].item() == pytest.approx(want_bg, rel=1e-5)
    assert Gumbel(class_info=info, train_background=False).background_score == "product"


def test_gumbel_init_zeroes_the_initial_total_gradient():
    c = 1203
    linear = torch.nn.Linear(8, c + 1)
    assert Gumbel(class_info=_info([5] * 3, image_classes=[{0, 1, 2}])).init_classifier(linear, c)
    assert linear.bias[0].item() == pytest.approx(-math.log(math.log(1204)), rel=1e-6)  # ≈ -1.96 (paper: ≈ -2)
    assert torch.all(linear.weight == 0.001)
    logits = linear(torch.zeros(1, 8))
    logits.retain_grad()
    gumbel_loss(logits, torch.tensor([5])).backward()
    # -e^{-b} + C e^{-b} / (e^{e^{-b}} - 1) = 0 at b = -log log(C+1)
    assert abs(logits.grad.sum().item()) < 1e-3 * logits.grad.abs().max().item()
    assert not CrossEntropy(class_info=_info([5, 5])).init_classifier(linear, c)

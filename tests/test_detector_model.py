"""The default detector's architecture: validation, serialisation, size, class-agnostic heads."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from cache_schema.errors import ConfigError
from extract.detectors.arch import DetectorArch
from extract.detectors.model import AgnosticMaskPredictor, build_detector, count_parameters, parameter_breakdown
from extract.detectors.toy import ToyShapes, tiny_arch

# Exact trainable-parameter count of DetectorArch(num_classes=200) (the synthetic benchmark's C).
DEFAULT_PARAMS_C200 = 4_046_749


def test_default_arch_size_and_parts():
    torch.manual_seed(0)
    model = build_detector(DetectorArch(num_classes=200))
    n = count_parameters(model)
    assert 3_000_000 <= n <= 5_000_000
    assert n == DEFAULT_PARAMS_C200
    parts = parameter_breakdown(model)
    assert sum(parts.values()) == n
    # resnet18 conv1..layer3 only: layer4 (8.4M parameters) must be gone.
    assert parts["backbone.body"] == 2_782_784
    assert not any(name.startswith("backbone.body.layer4") for name, _ in model.named_parameters())
    # torchvision's names, reachable by other packages.
    assert model.roi_heads.box_head.fc6.out_features == 256
    assert model.roi_heads.box_head.fc7.out_features == 256
    assert model.roi_heads.box_predictor.cls_score.out_features == 201
    assert model.roi_heads.box_predictor.bbox_pred.out_features == 4
    assert model.roi_heads.mask_predictor.mask_fcn_logits.out_channels == 1
    assert any(isinstance(m, nn.GroupNorm) for m in model.backbone.modules())
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())


def test_arch_dict_round_trip_and_validation():
    arch = tiny_arch()
    data = arch.to_dict()
    assert isinstance(data["anchor_sizes"], list)
    assert DetectorArch.from_dict(data) == arch
    with pytest.raises(ConfigError, match="unknown field"):
        DetectorArch.from_dict({**data, "colour": 1})
    with pytest.raises(ConfigError, match="num_classes"):
        DetectorArch.from_dict({k: v for k, v in data.items() if k != "num_classes"})
    bad = [
        {"num_classes": 0},
        {"num_classes": 3, "backbone": "resnet50"},
        {"num_classes": 3, "norm": "layer"},
        {"num_classes": 3, "anchor_sizes": (16, 32)},
        {"num_classes": 3, "class_agnostic_box": False},
        {"num_classes": 3, "box_nms_thresh": 0.0},
        {"num_classes": 3, "fpn_channels": 2.5},
    ]
    for kwargs in bad:
        with pytest.raises(ConfigError) as info:
            DetectorArch(**kwargs)
        assert "\n" not in str(info.value)


def test_class_agnostic_predictors_expand_one_output():
    torch.manual_seed(1)
    model = build_detector(tiny_arch())
    predictor = model.roi_heads.box_predictor
    x = torch.randn(5, 32)
    scores, deltas = predictor(x)
    assert scores.shape == (5, 4) and deltas.shape == (5, 16)
    one = predictor.agnostic_deltas(x)
    for k in range(4):
        assert torch.equal(deltas[:, 4 * k : 4 * k + 4], one)
    masks = model.roi_heads.mask_predictor(torch.randn(2, 16, 14, 14))
    assert masks.shape == (2, 4, 28, 28)
    assert torch.equal(masks[:, 0], masks[:, 3])


def test_class_wise_mask_option():
    model = build_detector(DetectorArch(**{**tiny_arch().to_dict(), "class_agnostic_mask": False}))
    assert model.roi_heads.mask_predictor.mask_fcn_logits.out_channels == 4


def test_train_mode_losses_and_eval_outputs():
    torch.manual_seed(2)
    model = build_detector(tiny_arch())
    data = ToyShapes(num_images=2, seed=3)
    images, targets = [], []
    for i in range(2):
        image, target = data[i]
        images.append(image)
        targets.append({"boxes": target["boxes"], "labels": target["labels"] + 1, "masks": target["masks"]})
    losses = model(images, targets)
    assert set(losses) == {"loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness", "loss_rpn_box_reg"}
    assert all(torch.isfinite(v) and v >= 0 for v in losses.values())
    # Uniform initial class scores: cross entropy starts near log(C+1).
    assert abs(losses["loss_classifier"].item() - torch.log(torch.tensor(4.0)).item()) < 0.1
    sum(losses.values()).backward()
    assert model.roi_heads.mask_predictor.mask_fcn_logits.weight.grad.abs().sum() > 0
    model.eval()
    with torch.no_grad():
        out = model(images)
    assert out[0]["masks"].shape[1:] == (1, 64, 64)
    assert len(out[0]["boxes"]) <= tiny_arch().box_detections_per_img


@pytest.mark.parametrize("agnostic", [True, False])
def test_inference_mask_logits_equal_torchvision_modules(agnostic):
    """Eval-mode raw_logits computes the 2x2 stride-2 transposed conv as a matrix product; it must
    give the module chain's values (ConvTranspose2d -> ReLU -> 1x1 Conv2d) up to float rounding."""
    torch.manual_seed(0)
    pred = AgnosticMaskPredictor(in_channels=8, num_classes_with_bg=5, class_agnostic=agnostic).eval()
    for bias in (pred.conv5_mask.bias, pred.mask_fcn_logits.bias):
        nn.init.normal_(bias)  # non-zero biases, so their placement is checked too
    x = torch.randn(7, 8, 6, 6)
    with torch.no_grad():
        want = pred.mask_fcn_logits(pred.relu(pred.conv5_mask(x)))
        got = pred.raw_logits(x)
        assert got.shape == (7, 1 if agnostic else 5, 12, 12)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
        pred.train()
        assert torch.equal(pred.raw_logits(x), want)  # training keeps the modules themselves

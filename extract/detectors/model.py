"""Build the small default Mask R-CNN from a :class:`DetectorArch`, out of torchvision parts.

The model is a plain ``torchvision.models.detection.MaskRCNN`` whose module names are
torchvision's (``backbone.body``, ``backbone.fpn``, ``rpn``, ``roi_heads.box_roi_pool``,
``roi_heads.box_head.fc6/fc7``, ``roi_heads.box_predictor.cls_score/bbox_pred``,
``roi_heads.mask_head``, ``roi_heads.mask_predictor.mask_fcn_logits``) so other packages can reach
in. Only the two predictors are ours: they compute one class-agnostic box (and mask) and expand it
to all ``C+1`` classes, so torchvision's losses and postprocess work unchanged.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from functools import partial

import torch
import torchvision
from torch import nn
from torchvision.models.detection import MaskRCNN
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads
from torchvision.models.detection.rpn import RPNHead
from torchvision.ops import MultiScaleRoIAlign

from extract.detectors.arch import RESNET18_C3_CHANNELS, DetectorArch

# FPN levels the RoI poolers read (strides 4, 8, 16); the extra max-pooled level only feeds the RPN.
ROI_FEATURE_MAPS = ["0", "1", "2"]
ROI_POOL_SIZE = 7


class AgnosticBoxPredictor(nn.Module):
    """Classification over ``C+1`` classes (background at index 0) and ONE box regression.

    ``forward(x [R, D]) -> (class_logits [R, C+1], box_deltas [R, 4*(C+1)])`` where the deltas are
    the class-agnostic 4 repeated for every class, which is what torchvision's loss and
    postprocess index into. :meth:`agnostic_deltas` gives the un-repeated ``[R, 4]``.
    """

    def __init__(self, *, in_features: int, num_classes_with_bg: int) -> None:
        super().__init__()
        self.num_classes_with_bg = num_classes_with_bg
        self.cls_score = nn.Linear(in_features, num_classes_with_bg)
        self.bbox_pred = nn.Linear(in_features, 4)
        # Small initial outputs (Detectron's choice): uniform class scores, near-identity boxes.
        nn.init.normal_(self.cls_score.weight, std=0.01)
        nn.init.normal_(self.bbox_pred.weight, std=0.001)
        nn.init.zeros_(self.cls_score.bias)
        nn.init.zeros_(self.bbox_pred.bias)

    def agnostic_deltas(self, x: torch.Tensor) -> torch.Tensor:
        """Box deltas ``[R, 4]`` (dx, dy, dw, dh, torchvision's BoxCoder weights 10,10,5,5)."""
        return self.bbox_pred(x.flatten(1))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = x.flatten(1)
        return self.cls_score(x), self.bbox_pred(x).repeat(1, self.num_classes_with_bg)


class AgnosticMaskPredictor(nn.Module):
    """torchvision's mask predictor (2x transposed conv, ReLU, 1x1 conv) with 1 or ``C+1`` outputs.

    ``forward(x [R, D, m, m]) -> [R, C+1, 2m, 2m]`` mask logits; with a class-agnostic head the one
    channel is expanded (a view, no copy) so torchvision's per-label indexing works unchanged.
    :meth:`raw_logits` gives ``[R, K, 2m, 2m]`` with K = 1 (agnostic) or C+1.
    """

    def __init__(self, *, in_channels: int, num_classes_with_bg: int, class_agnostic: bool) -> None:
        super().__init__()
        self.num_classes_with_bg = num_classes_with_bg
        self.class_agnostic = class_agnostic
        self.conv5_mask = nn.ConvTranspose2d(in_channels, in_channels, 2, 2, 0)
        self.relu = nn.ReLU(inplace=True)
        self.mask_fcn_logits = nn.Conv2d(in_channels, 1 if class_agnostic else num_classes_with_bg, 1)
        for module in (self.conv5_mask, self.mask_fcn_logits):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(module.bias)

    def raw_logits(self, x: torch.Tensor) -> torch.Tensor:
        """``[R, D, m, m]`` float32 -> ``[R, K, 2m, 2m]`` mask logits.

        At inference the 2x2 stride-2 transposed conv runs as one matrix product: each input
        pixel writes its own 2x2 output block, so ``out[r, o, 2i+a, 2j+b] = bias[o] +
        sum_c x[r, c, i, j] W[c, o, a, b]``. CPU ``conv_transpose2d`` took ~5x longer for the
        same values (up to float32 summation order) and was a quarter of mask inference.
        Training keeps torchvision's modules.
        """
        if self.training:
            return self.mask_fcn_logits(self.relu(self.conv5_mask(x)))
        r, d, m, _ = x.shape
        up, fcn = self.conv5_mask, self.mask_fcn_logits
        o, k = up.out_channels, fcn.out_channels
        # Rows (r, i, j); columns (a, b, o) so that the 1x1 conv is a second product over o.
        y = torch.addmm(up.bias.repeat(4), x.permute(0, 2, 3, 1).reshape(-1, d),
                        up.weight.permute(0, 2, 3, 1).reshape(d, 4 * o)).relu_()
        z = torch.addmm(fcn.bias, y.view(-1, o), fcn.weight.view(k, o).t())  # rows (r, i, j, a, b)
        return z.view(r, m, m, 2, 2, k).permute(0, 5, 1, 3, 2, 4).reshape(r, k, 2 * m, 2 * m)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.raw_logits(x)
        if self.class_agnostic:
            return logits.expand(-1, self.num_classes_with_bg, -1, -1)
        return logits


def _group_norm(num_channels: int, *, groups: int) -> nn.GroupNorm:
    # Channel counts such as 16 or 48 are not multiples of 32: use the largest divisor that fits.
    return nn.GroupNorm(math.gcd(groups, num_channels), num_channels)


def norm_layer_for(arch: DetectorArch):
    """The normalisation constructor ``f(num_channels) -> nn.Module`` the arch asks for."""
    if arch.norm == "group":
        return partial(_group_norm, groups=arch.gn_groups)
    return nn.BatchNorm2d


def build_backbone(arch: DetectorArch) -> BackboneWithFPN:
    """resnet18 conv1..layer3 (random init, ``weights=None``) + FPN with a max-pooled extra level.

    Output: ``OrderedDict`` of 4 maps ``"0","1","2","pool"`` with ``fpn_channels`` channels at
    strides 4, 8, 16, 32 of the (resized, padded) input.
    """
    norm = norm_layer_for(arch)
    # zero_init_residual: each block starts as identity, which steadies training from scratch.
    resnet = torchvision.models.resnet18(weights=None, norm_layer=norm, zero_init_residual=True)
    return BackboneWithFPN(
        resnet,
        return_layers={"layer1": "0", "layer2": "1", "layer3": "2"},
        in_channels_list=list(RESNET18_C3_CHANNELS),
        out_channels=arch.fpn_channels,
        norm_layer=norm,
    )


def build_detector(arch: DetectorArch) -> MaskRCNN:
    """A randomly initialised Mask R-CNN (train mode) for ``arch``; seed torch first for determinism.

    Inputs follow torchvision: a list of float images ``[3, H, W]`` in [0, 1]; targets with
    ``boxes`` xyxy pixels, ``labels`` int64 ``1..C`` (0 is background), ``masks`` uint8 ``[N, H, W]``.
    """
    backbone = build_backbone(arch)
    c1 = arch.num_classes + 1
    anchors = AnchorGenerator(
        sizes=tuple((size,) for size in arch.anchor_sizes),
        aspect_ratios=(tuple(arch.aspect_ratios),) * len(arch.anchor_sizes),
    )
    rpn_head = RPNHead(arch.fpn_channels, len(arch.aspect_ratios))
    box_head = TwoMLPHead(arch.fpn_channels * ROI_POOL_SIZE * ROI_POOL_SIZE, arch.representation_size)
    box_predictor = AgnosticBoxPredictor(in_features=arch.representation_size, num_classes_with_bg=c1)
    mask_head = MaskRCNNHeads(
        arch.fpn_channels, [arch.mask_head_channels] * 4, 1, norm_layer=norm_layer_for(arch)
    )
    mask_predictor = AgnosticMaskPredictor(
        in_channels=arch.mask_head_channels, num_classes_with_bg=c1, class_agnostic=arch.class_agnostic_mask
    )
    return MaskRCNN(
        backbone,
        num_classes=None,
        min_size=arch.image_size,
        max_size=arch.image_size,
        rpn_anchor_generator=anchors,
        rpn_head=rpn_head,
        rpn_pre_nms_top_n_train=arch.rpn_pre_nms_top_n_train,
        rpn_pre_nms_top_n_test=arch.rpn_pre_nms_top_n_test,
        rpn_post_nms_top_n_train=arch.rpn_post_nms_top_n_train,
        rpn_post_nms_top_n_test=arch.rpn_post_nms_top_n_test,
        rpn_nms_thresh=arch.rpn_nms_thresh,
        rpn_batch_size_per_image=arch.rpn_batch_size_per_image,
        box_roi_pool=MultiScaleRoIAlign(featmap_names=ROI_FEATURE_MAPS, output_size=ROI_POOL_SIZE, sampling_ratio=2),
        box_head=box_head,
        box_predictor=box_predictor,
        box_score_thresh=arch.box_score_thresh,
        box_nms_thresh=arch.box_nms_thresh,
        box_detections_per_img=arch.box_detections_per_img,
        box_batch_size_per_image=arch.box_batch_size_per_image,
        box_positive_fraction=arch.box_positive_fraction,
        mask_roi_pool=MultiScaleRoIAlign(
            featmap_names=ROI_FEATURE_MAPS, output_size=arch.mask_roi_size, sampling_ratio=2
        ),
        mask_head=mask_head,
        mask_predictor=mask_predictor,
    )


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def parameter_breakdown(model: MaskRCNN) -> "OrderedDict[str, int]":
    """Parameters per top-level part (backbone body, fpn, rpn, box head, predictors, mask)."""
    parts = OrderedDict(
        [
            ("backbone.body", model.backbone.body),
            ("backbone.fpn", model.backbone.fpn),
            ("rpn", model.rpn),
            ("box_head", model.roi_heads.box_head),
            ("box_predictor", model.roi_heads.box_predictor),
            ("mask_head", model.roi_heads.mask_head),
            ("mask_predictor", model.roi_heads.mask_predictor),
        ]
    )
    return OrderedDict((name, count_parameters(module)) for name, module in parts.items())

"""Plain torchvision layout: a checkpoint any torchvision user can load without roicache.

roicache's small detector keeps its class-agnostic box and mask outputs un-repeated (4 deltas,
1 mask channel). torchvision's stock ``FastRCNNPredictor``/``MaskRCNNPredictor`` hold one output
per class; repeating the agnostic weights for every class gives a stock model with identical
outputs. :func:`build_plain_torchvision` builds that stock model from torchvision classes only.
"""

from __future__ import annotations

import torch
import torchvision
from torchvision.models.detection import MaskRCNN
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.rpn import AnchorGenerator, RPNHead
from torchvision.ops import MultiScaleRoIAlign

from cache_schema.errors import CheckpointError
from extract.detectors.arch import DetectorArch
from extract.detectors.model import norm_layer_for

PLAIN_FORMAT = "roicache.torchvision-plain"
_FEATURE_MAPS = ["0", "1", "2", "pool"]


def build_plain_torchvision(arch: DetectorArch) -> MaskRCNN:
    """A stock torchvision Mask R-CNN with ``arch``'s sizes (per-class box and mask outputs)."""
    norm = norm_layer_for(arch)
    resnet = torchvision.models.resnet18(weights=None, norm_layer=norm)
    backbone = BackboneWithFPN(resnet, return_layers={"layer1": "0", "layer2": "1", "layer3": "2"},
                               in_channels_list=[64, 128, 256], out_channels=arch.fpn_channels, norm_layer=norm)
    c1 = arch.num_classes + 1
    anchors = AnchorGenerator(sizes=tuple((s,) for s in arch.anchor_sizes),
                              aspect_ratios=(tuple(arch.aspect_ratios),) * len(arch.anchor_sizes))
    return MaskRCNN(
        backbone, num_classes=None, min_size=arch.image_size, max_size=arch.image_size,
        rpn_anchor_generator=anchors, rpn_head=RPNHead(arch.fpn_channels, len(arch.aspect_ratios)),
        rpn_pre_nms_top_n_test=arch.rpn_pre_nms_top_n_test, rpn_post_nms_top_n_test=arch.rpn_post_nms_top_n_test,
        rpn_nms_thresh=arch.rpn_nms_thresh,
        box_roi_pool=MultiScaleRoIAlign(featmap_names=_FEATURE_MAPS, output_size=7, sampling_ratio=2),
        box_head=TwoMLPHead(arch.fpn_channels * 49, arch.representation_size),
        box_predictor=FastRCNNPredictor(arch.representation_size, c1),
        box_score_thresh=arch.box_score_thresh, box_nms_thresh=arch.box_nms_thresh,
        box_detections_per_img=arch.box_detections_per_img,
        mask_roi_pool=MultiScaleRoIAlign(featmap_names=_FEATURE_MAPS, output_size=arch.mask_roi_size, sampling_ratio=2),
        mask_head=MaskRCNNHeads(arch.fpn_channels, [arch.mask_head_channels] * 4, 1, norm_layer=norm),
        mask_predictor=MaskRCNNPredictor(arch.mask_head_channels, arch.mask_head_channels, c1),
    )


def to_plain_state_dict(state: dict, arch: DetectorArch) -> dict:
    """roicache weights → stock torchvision weights (agnostic outputs repeated per class)."""
    c1 = arch.num_classes + 1
    out = dict(state)
    w, b = state["roi_heads.box_predictor.bbox_pred.weight"], state["roi_heads.box_predictor.bbox_pred.bias"]
    if w.shape[0] == 4:
        # torchvision reads class k's deltas at rows 4k..4k+3: the agnostic 4, once per class.
        out["roi_heads.box_predictor.bbox_pred.weight"] = w.repeat(c1, 1)
        out["roi_heads.box_predictor.bbox_pred.bias"] = b.repeat(c1)
    mw, mb = state["roi_heads.mask_predictor.mask_fcn_logits.weight"], state["roi_heads.mask_predictor.mask_fcn_logits.bias"]
    if mw.shape[0] == 1:
        out["roi_heads.mask_predictor.mask_fcn_logits.weight"] = mw.repeat(c1, 1, 1, 1)
        out["roi_heads.mask_predictor.mask_fcn_logits.bias"] = mb.repeat(c1)
    return out


def replace_torchvision_classifier(payload: dict, *, weight: torch.Tensor, bias: torch.Tensor) -> dict:
    """A plain-torchvision checkpoint of ``payload`` (``roicache.detector``) whose ``cls_score``
    is ``weight`` ``[C+1, D]`` / ``bias`` ``[C+1]`` given in store order (background last); the
    rows are rotated back to torchvision's background-first order."""
    arch = DetectorArch.from_dict(payload["arch"])
    state = to_plain_state_dict(payload["state_dict"], arch)
    w, b = weight.detach().cpu().float(), bias.detach().cpu().float()
    old = state["roi_heads.box_predictor.cls_score.weight"]
    if tuple(w.shape) != tuple(old.shape):
        raise CheckpointError(f"the new classifier is {tuple(w.shape)}, the detector's {tuple(old.shape)}; "
                              "inject a head trained on this detector's store")
    order = torch.cat([torch.tensor([w.shape[0] - 1]), torch.arange(w.shape[0] - 1)])
    state["roi_heads.box_predictor.cls_score.weight"] = w[order].clone()
    state["roi_heads.box_predictor.cls_score.bias"] = b[order].clone()
    return {"format": PLAIN_FORMAT, "format_version": 1, "arch": payload["arch"],
            "categories": payload["categories"], "state_dict": state, "meta": payload.get("meta", {})}

"""Dual-head inference inside plain mmdetection: a box head registered in mmdet's registry.

``serve inject --combine sel`` (and the other rules but ``det``) on an mmdet checkpoint writes
the checkpoint with the calibrated head's weights under ``roi_head.bbox_head.calibrated.`` plus
a config whose box head is :class:`RoicacheDualBBoxHead`, loaded through mmdet's
``custom_imports``; ``init_detector(config, checkpoint)`` then scores every RoI with both heads
and applies the rule inside mmdet's own post-processing:

1. ``forward`` returns the original ``fc_cls`` logits next to the calibrated head's logits
   (``[N, 2(C+1)]``), the calibrated head reading the same RoI feature it was trained on
   (``fc``: the input of ``fc_cls``; ``pooled``: the RoIAlign output);
2. mmdet turns a box head's scores into probabilities per image through
   ``loss_cls.get_activation`` when ``loss_cls.custom_cls_channels`` is set; here that activation is
   the rule: softmax of the original logits, the calibrated head's probabilities, combined by
   :mod:`heads.combine` (per image, as roicache's own full inference does), background from the
   original head;
3. the rest — per-class box decoding, score threshold, NMS, masks — is mmdet's.

Inference only: training such a model is refused.
"""

from __future__ import annotations

from pathlib import Path

import torch
from mmdet.models.roi_heads.bbox_heads import Shared2FCBBoxHead
from mmdet.registry import MODELS

from cache_schema.errors import ConfigError
from extract.detectors.mmdet_config import injected_prefix
from heads.combine import get_rule
from heads.models import HEADS, HeadSpec, head_scores
from serve.inject import Calibration, combination_of_record

DUAL_HEAD_TYPE = "RoicacheDualBBoxHead"


class _RuleActivation:
    """``get_activation`` of the dual head: ``[n, 2(C+1)]`` logits → ``[n, C+1]`` scores.
    mmdet's box head reads ``custom_cls_channels`` from its ``loss_cls``. A cascade averages its
    stages' ``[n, 2(C+1)]`` outputs before the last stage's activation, so both halves are the
    stage-averaged logits of the original and the calibrated classifiers."""

    custom_cls_channels = True

    def __init__(self, head: "RoicacheDualBBoxHead") -> None:
        self._head = [head]  # a list: not registered as a submodule (no cycle in .modules())

    def get_activation(self, scores: torch.Tensor) -> torch.Tensor:
        head = self._head[0]
        c1 = head.num_classes + 1
        p_orig = torch.softmax(scores[:, :c1].float(), dim=1)
        cal = scores[:, c1:].float()
        p_cal = torch.softmax(cal, dim=1) if head.spec is None else head_scores(head.spec, cal)
        fg = head.rule(p_orig=p_orig, p_cal=p_cal, instance_count=head.instance_count, config=head.combine)[0]
        return torch.cat([fg, p_orig[:, -1:]], dim=1)


@MODELS.register_module(name=DUAL_HEAD_TYPE)
class RoicacheDualBBoxHead(Shared2FCBBoxHead):
    """mmdet's ``Shared2FCBBoxHead`` plus a calibrated classifier and a combination rule.

    Args:
        calibration: ``{"spec": HeadSpec dict or None, "combination": Combination dict (rule, T,
            boundary, thr, scale_ratio), "instance_count": [C ints]}`` (what ``serve inject``
            writes into the config; configs of older versions with top-level
            ``combine``/``T``/``boundary`` load too). ``spec`` None: a cascade stage that keeps
            its own classifier — its "calibrated" half is its own logits again.
    """

    def __init__(self, *, calibration: dict, **kwargs) -> None:
        super().__init__(**kwargs)
        spec = calibration.get("spec")
        self.spec = None if spec is None else HeadSpec.from_dict(spec)
        self.combine = combination_of_record(calibration)
        if self.combine.rule == "det":
            raise ConfigError("the det rule merges two detection sets; it cannot run inside mmdet's box head")
        self.calibrated = None if self.spec is None else HEADS[self.spec.name](spec=self.spec)
        self.rule = get_rule(self.combine.rule)
        self.register_buffer("instance_count", torch.tensor(calibration["instance_count"], dtype=torch.int64),
                             persistent=False)
        del self.loss_cls  # a registered submodule; replaced by the rule's activation below
        self.loss_cls = _RuleActivation(self)
        self._fc_input: list[torch.Tensor] = []
        self.fc_cls.register_forward_pre_hook(lambda _m, args: self._fc_input.append(args[0]))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.training:
            raise ConfigError(f"{DUAL_HEAD_TYPE} is for inference; train the original model instead")
        self._fc_input.clear()
        cls_score, bbox_pred = super().forward(x)
        if self.calibrated is None:
            return torch.cat([cls_score, cls_score], dim=1), bbox_pred
        feats = self._fc_input[0] if self.spec.level == "fc" else x
        return torch.cat([cls_score, self.calibrated(feats)], dim=1), bbox_pred


def export_dual(*, payload: dict, calibration: Calibration, cfg, config_out: Path) -> dict:
    """The checkpoint payload with the calibrated heads' weights added, and (written to
    ``config_out``) the model's config with :class:`RoicacheDualBBoxHead` as its box head — as
    every stage's box head of a cascade, those without a calibrated head keeping their own."""
    if calibration.combination.rule == "det":
        raise ConfigError("--combine det merges two detection sets and cannot run inside mmdet's box head; "
                          "choose sel, cal-only, avg, sel-thr, sel-scale or sel-norm")
    prefix = "module." if any(k.startswith("module.") for k in payload["state_dict"]) else ""
    dual = cfg.copy()
    roi_head = dual.model.roi_head
    cascade = isinstance(roi_head.bbox_head, (list, tuple))
    boxes = list(roi_head.bbox_head) if cascade else [roi_head.bbox_head]
    heads = calibration.by_stage
    if max(heads) >= len(boxes):
        raise ConfigError(f"a head for stage {max(heads)}, but the model has {len(boxes)} box head(s)")
    state = dict(payload["state_dict"])
    common = {"combination": calibration.combination.to_dict(), "instance_count": list(calibration.instance_count)}
    for k, box in enumerate(boxes):
        head = heads.get(k)
        if head is not None:
            where = injected_prefix(k if cascade else None)
            state.update({f"{prefix}{where}{name}": v.detach().cpu().clone() for name, v in head.state_dict.items()})
        # The whole combination (thr, scale_ratio too): sel-thr / sel-scale run in mmdet as in roicache.
        boxes[k] = {**dict(box), "type": DUAL_HEAD_TYPE,
                    "calibration": {**common, "spec": None if head is None else head.spec.to_dict()}}
    roi_head.bbox_head = boxes if cascade else boxes[0]
    dual.custom_imports = {"imports": [__name__], "allow_failed_imports": False}
    config_out.parent.mkdir(parents=True, exist_ok=True)
    dual.dump(str(config_out))
    return {**payload, "state_dict": state}

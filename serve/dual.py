"""A detector with two classification heads: the original and the calibrated one (SimCal §4.2).

Every RoI the detector keeps at test time is scored by both heads; the combination rule
(:mod:`heads.combine`) turns the two probability vectors into one, and the detector's own
post-processing (class-wise NMS, top ``max_dets``, class-agnostic masks) turns scores into
detections (:func:`heads.evaluation.assemble_detections`, checked equal to torchvision's).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cache_schema.errors import ConfigError
from extract.detectors.backends import load_adapter, read_checkpoint
from extract.detectors.base import MaskRequest, RoiOutputs
from heads.combine import Combination, get_rule
from heads.evaluation import Detections, assemble_detection_arrays, to_results
from heads.evaluation.scoring import cascade_probs
from heads.models import head_from_state, head_scores
from serve.inject import Calibration, read_calibration


@dataclass(frozen=True, kw_only=True)
class Inferred:
    """One image's RoI outputs and its detections under each combination asked for (same order)."""

    out: RoiOutputs
    dets: tuple[Detections, ...]
    request: MaskRequest


def _mask_request(dets: tuple[Detections, ...], *, per_class: bool) -> MaskRequest:
    """The masks ``dets`` (one image, several combinations) need: one per RoI for class-agnostic
    mask heads, one per (RoI, class) pair — with that pair's box — for class-specific ones."""
    rows = torch.cat([d.roi_index for d in dets]).cpu()
    labels = torch.cat([d.labels for d in dets]).cpu() if per_class else torch.zeros_like(rows)
    boxes = torch.cat([d.boxes for d in dets]).float().cpu()
    keys = rows * (int(labels.max()) + 1 if len(labels) else 1) + labels
    _, first = np.unique(keys.numpy(), return_index=True)
    return MaskRequest(rows=rows[first].numpy(), labels=labels[first].numpy(), boxes=boxes[first].numpy())


class DualHeadDetector:
    """A loaded detector checkpoint, plain or injected, that scores RoIs with one or two heads."""

    def __init__(self, *, path: Path, device: torch.device, config: str | None = None) -> None:
        self.path = Path(path)
        self.device = device
        payload = read_checkpoint(self.path)
        self.adapter = load_adapter(self.path, device=device, config=config, payload=payload)
        # json ids; None when the checkpoint records names only (mmdet): set from the annotation
        # file once its class table is checked against the detector's (serve.evaluate).
        ids = [c["id"] for c in self.adapter.categories]
        self.category_ids: tuple[int, ...] | None = None if None in ids else tuple(int(i) for i in ids)
        self.calibration: Calibration | None = read_calibration(payload)
        # stage -> (spec, module) of each calibrated head (one at stage 0 unless a cascade).
        self.heads: dict[int, tuple] = {}
        if self.calibration is not None:
            stages = max(1, len(self.adapter.stage_fg_iou))
            for h in self.calibration.heads:
                if h.stage >= stages:
                    raise ConfigError(f"{self.path} carries a head for stage {h.stage}, the detector has {stages} stage(s)")
                module = head_from_state(h.spec, h.state_dict, where=f"{self.path} calibration (stage {h.stage})")
                self.heads[h.stage] = (h.spec, module.to(device))
        # The injected combination; a plain detector has the original head only.
        self.default = self.calibration.combination if self.calibration else Combination(rule="orig")

    def check(self, combination: Combination) -> None:
        if combination.rule != "orig" and self.calibration is None:
            raise ConfigError(f"{self.path} carries no calibrated head, so only --combine orig applies; "
                              "inject a head first with `serve inject`")

    def run_images(self, images: list[np.ndarray], *, combinations: tuple[Combination, ...] = (),
                   max_proposals: int | None = None, max_dets: int = 300) -> list[RoiOutputs]:
        """RoI outputs of the detector on ``images`` (test-time proposals). Mask logits are
        computed, as in torchvision's inference, only for RoIs that become one of the top
        ``max_dets`` detections under one of ``combinations`` (all RoIs when none is given);
        ``max_dets`` must be the one :meth:`detections` is called with."""
        if combinations:
            return [inf.out for inf in self.infer(images, combinations=combinations, max_proposals=max_proposals,
                                                  max_dets=max_dets)]
        return self.adapter.run(images, gt_boxes=None, levels=self._levels(), with_masks=True,
                                max_proposals=max_proposals or self.adapter.default_proposals)

    def infer(self, images: list[np.ndarray], *, combinations: tuple[Combination, ...],
              max_proposals: int | None = None, max_dets: int = 300) -> list[Inferred]:
        """Full inference: each image's RoI outputs and its detections under each combination.

        The detections are assembled once, before the mask head runs, because they decide which
        RoIs need masks (torchvision runs its mask head only on detections, too)."""
        found: dict[int, tuple[np.ndarray, tuple[Detections, ...], MaskRequest]] = {}

        def select(out: RoiOutputs, image_size: tuple[int, int]) -> MaskRequest:
            dets = tuple(self.detect(out, c, image_size, max_dets=max_dets) for c in combinations)
            request = _mask_request(dets, per_class=not self.adapter.class_agnostic_mask)
            # The adapter returns ``out`` with masks added and every other array shared, so the
            # logits array identifies the image; holding it keeps its id from being reused.
            found[id(out.logits)] = (out.logits, dets, request)
            return request

        outs = self.adapter.run(images, gt_boxes=None, levels=self._levels(), with_masks=True, mask_rows=select,
                                max_proposals=max_proposals or self.adapter.default_proposals)
        return [Inferred(out=o, dets=found[id(o.logits)][1], request=found[id(o.logits)][2]) for o in outs]

    def _levels(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(spec.level for spec, _ in self.heads.values())) or ("fc",)

    def detect(self, out: RoiOutputs, combination: Combination, image_size: tuple[int, int], *,
               max_dets: int = 300) -> Detections:
        """Detections of one image's RoIs under ``combination`` (torchvision post-processing)."""
        post = self.adapter.postprocess
        streams = self.scores(out, combination)
        boxes = out.reg_boxes if out.class_boxes is None else out.class_boxes  # [R, 4] or [R, C, 4]
        return assemble_detection_arrays(scores=streams if len(streams) > 1 else streams[0],
                                         boxes=torch.from_numpy(boxes), image_size=image_size,
                                         score_thresh=post.score_thresh, nms_iou=post.nms_iou, max_dets=max_dets,
                                         min_box_size=post.min_box_size)

    def results(self, out: RoiOutputs, dets: Detections, *, image_id: int, image_size: tuple[int, int],
                request: MaskRequest | None = None) -> list[dict]:
        """LVIS-format results of ``dets`` (from :meth:`detect` on ``out``), masks included:
        class-agnostic mask logits pasted here, or the detector's own per-detection masks
        (``out.det_masks``, in the order of the ``request`` they were computed for)."""
        if self.category_ids is None:
            raise ConfigError(f"{self.path} records class names only; set category_ids from the annotation file")
        res = to_results(dets=dets, image_id=image_id, category_ids=self.category_ids, image_size=image_size,
                         mask_logits=None if out.mask_logits is None else torch.from_numpy(out.mask_logits))
        if out.det_masks is not None:
            where = {(int(r), int(c)): k for k, (r, c) in enumerate(zip(request.rows, request.labels))}
            for r, row, label in zip(res, dets.roi_index.tolist(), dets.labels.tolist()):
                r["segmentation"] = out.det_masks[where[(row, label)]]
        return res

    @torch.inference_mode()
    def probabilities(self, out: RoiOutputs) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(p_orig, p_cal)``, each float32 ``[R, C+1]`` (background last); ``p_cal`` is None
        for a plain detector."""
        p_orig = torch.softmax(torch.from_numpy(out.logits).float(), dim=1)
        if not self.heads:
            return p_orig, None
        if out.stages is None:
            spec, head = self.heads[0]
            x = torch.from_numpy(out.features[spec.level]).to(self.device).float()
            return p_orig, head_scores(spec, head(x)).float().cpu()
        # A cascade: retrained stages' logits replace the detector's own before the stage average.
        retrained = {k: head(torch.from_numpy(out.stages[k].features[spec.level]).to(self.device).float()).float().cpu()
                     for k, (spec, head) in self.heads.items()}
        return p_orig, cascade_probs(tuple(torch.from_numpy(st.logits) for st in out.stages), retrained)

    def scores(self, out: RoiOutputs, combination: Combination) -> tuple[torch.Tensor, ...]:
        """Combined foreground scores: one ``[R, C]`` tensor (two for ``det``)."""
        self.check(combination)
        p_orig, p_cal = self.probabilities(out)
        counts = torch.as_tensor(self.calibration.instance_count if self.calibration else
                                 (0,) * (p_orig.shape[1] - 1), dtype=torch.int64)
        return get_rule(combination.rule)(p_orig=p_orig, p_cal=p_cal, instance_count=counts, config=combination)

    def detections(self, out: RoiOutputs, combination: Combination, *, image_id: int,
                   image_size: tuple[int, int], max_dets: int = 300) -> list[dict]:
        """LVIS-format detections of one image under ``combination``."""
        dets = self.detect(out, combination, image_size, max_dets=max_dets)
        return self.results(out, dets, image_id=image_id, image_size=image_size)

    def with_default(self, **changes) -> Combination:
        """The injected combination with the fields given and not None changed (``rule``, ``T``,
        ``boundary``, ``thr``, ``scale_ratio``)."""
        return self.default.override(**changes)

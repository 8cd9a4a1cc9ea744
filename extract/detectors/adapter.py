"""The torchvision backend of :class:`~extract.detectors.base.DetectorAdapter`.

One :meth:`TorchvisionAdapter.run` call computes, for a batch of images, exactly what the
detector's own inference computes for its RoIs: the backbone once per batch, the RPN's post-NMS
proposals at test settings (kept with their objectness logits), and for proposals + appended GT
boxes the RoIAlign features, the shared-fc features, the class logits, the class-agnostic
regressed boxes and (optionally) the class-agnostic mask logits on those regressed boxes.

Images of the same size are batched together; different sizes run in separate batches. Why:
with GroupNorm an image's features depend on the zero padding a mixed-size batch adds, so
grouping by size keeps every image's outputs independent of what it was batched with.
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from torchvision.models.detection.rpn import concat_box_prediction_layers
from torchvision.models.detection.transform import resize_boxes
from torchvision.ops import boxes as box_ops

from cache_schema.errors import ConfigError
from extract.detectors.base import FEATURE_LEVELS, MaskRows, Postprocess, RoiOutputs
from extract.detectors.checkpoint import LoadedDetector, is_roicache_detector, load_detector
from extract.detectors.plain import replace_torchvision_classifier


class TorchvisionAdapter:
    """A :class:`DetectorAdapter` over a roicache torchvision Mask R-CNN checkpoint."""

    backend = "torchvision"
    class_agnostic_box = True
    stage_fg_iou: tuple[float, ...] = ()  # one box head: not a cascade

    def __init__(self, *, detector: LoadedDetector, device: str | torch.device = "cpu") -> None:
        self.detector = detector
        self.device = torch.device(device)
        self.model = detector.model.to(self.device).eval()
        arch = detector.arch
        self.arch = arch
        self.path, self.sha256 = detector.path, detector.sha256
        self.num_classes = arch.num_classes
        self.categories = detector.categories
        self.levels: dict[str, tuple[int, ...]] = {"fc": (arch.representation_size,), "pooled": arch.pooled_shape}
        self.mask_size = arch.mask_size
        self.class_agnostic_mask = arch.class_agnostic_mask
        self.default_proposals = arch.rpn_post_nms_top_n_test
        self.postprocess = Postprocess(score_thresh=arch.box_score_thresh, nms_iou=arch.box_nms_thresh,
                                       max_dets=arch.box_detections_per_img, min_box_size=1e-2)

    @classmethod
    def accepts(cls, payload: object) -> bool:
        """The loaded checkpoint ``payload`` is one this backend reads."""
        return is_roicache_detector(payload)

    @classmethod
    def from_payload(cls, payload: dict, *, path: Path, device: str | torch.device = "cpu",
                     config: str | None = None) -> "TorchvisionAdapter":
        """The adapter of an already-read checkpoint (its architecture travels inside it)."""
        if config is not None:
            raise ConfigError("--config applies to mmdetection checkpoints; a roicache detector checkpoint "
                              "carries its own architecture, drop --config")
        return cls(detector=load_detector(path, device=device, payload=payload), device=device)

    @classmethod
    def from_checkpoint(
        cls, path: str | os.PathLike[str], *, device: str | torch.device = "cpu"
    ) -> "TorchvisionAdapter":
        """Load a ``roicache.detector`` checkpoint (see :func:`load_detector`) onto ``device``."""
        return cls(detector=load_detector(Path(path), device=device), device=device)

    @staticmethod
    def categories_of(payload: dict) -> tuple[dict, ...]:
        """The class table of a checkpoint payload, without building the model."""
        return tuple(payload["categories"])

    @staticmethod
    def replace_classifier(payload: dict, *, weight: torch.Tensor, bias: torch.Tensor, stage: int = 0) -> dict:
        """A plain-torchvision checkpoint of ``payload``'s detector whose classifier is
        ``weight`` float32 ``[C+1, D]`` / ``bias`` ``[C+1]`` (rows in store order, background
        last), loadable into stock ``torchvision.models.detection.MaskRCNN`` without roicache."""
        if stage != 0:
            raise ConfigError(f"this torchvision detector has one box head; there is no stage {stage}")
        return replace_torchvision_classifier(payload, weight=weight, bias=bias)

    def box_regression(self) -> None:
        """None: this detector's box regression is class-agnostic (``reg_boxes`` serve every class)."""
        return None

    def head_state(self, stage: int = 0) -> dict[str, np.ndarray]:
        """``fc6``/``fc7``/``cls`` of the box head, float32; torchvision puts background at
        classifier row 0, the store last (mmdet convention), so the rows are rotated ``[1..C, 0]``."""
        if stage != 0:
            raise ConfigError(f"this torchvision detector has one box head; there is no stage {stage}")
        head, predictor = self.model.roi_heads.box_head, self.model.roi_heads.box_predictor
        cls_w, cls_b = predictor.cls_score.weight, predictor.cls_score.bias
        order = torch.cat([torch.arange(1, cls_w.shape[0]), torch.zeros(1, dtype=torch.int64)]).to(cls_w.device)
        state = {"fc6.weight": head.fc6.weight, "fc6.bias": head.fc6.bias,
                 "fc7.weight": head.fc7.weight, "fc7.bias": head.fc7.bias,
                 "cls.weight": cls_w[order], "cls.bias": cls_b[order]}
        return {k: v.detach().cpu().float().numpy() for k, v in state.items()}

    def describe(self) -> dict:
        """What a store records about its detector (JSON-safe)."""
        return {
            "backend": self.backend,
            "arch": self.arch.to_dict(),
            "checkpoint_sha256": self.detector.sha256,
            "checkpoint_name": self.detector.path.name,
            "feature_levels": {k: list(v) for k, v in self.levels.items()},
            "mask_size": self.mask_size,
            "class_agnostic_mask": self.arch.class_agnostic_mask,
            "num_classes": self.num_classes,
            "postprocess": self.postprocess.to_dict(),
        }

    # ------------------------------------------------------------------ validation
    def _check_inputs(self, images, gt_boxes, levels, max_proposals, with_masks) -> None:
        if not isinstance(images, (list, tuple)) or not images:
            raise ConfigError("adapter.run: images must be a non-empty list of uint8 HxWx3 arrays")
        for i, img in enumerate(images):
            if not isinstance(img, np.ndarray) or img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
                got = f"{img.dtype}{list(img.shape)}" if isinstance(img, np.ndarray) else type(img).__name__
                raise ConfigError(f"adapter.run: image {i} is {got}; pass RGB uint8 arrays of shape [H, W, 3]")
        if gt_boxes is not None:
            if len(gt_boxes) != len(images):
                raise ConfigError(
                    f"adapter.run: {len(gt_boxes)} GT box arrays for {len(images)} images; give one per image"
                )
            for i, g in enumerate(gt_boxes):
                if not isinstance(g, np.ndarray) or g.ndim != 2 or g.shape[1] != 4 or not np.isfinite(g).all():
                    raise ConfigError(f"adapter.run: gt_boxes[{i}] must be a finite float array [G, 4] (xyxy pixels)")
        unknown = [lv for lv in levels if lv not in FEATURE_LEVELS]
        if unknown:
            raise ConfigError(f"adapter.run: unknown feature level(s) {unknown}; choose from {list(FEATURE_LEVELS)}")
        if isinstance(max_proposals, bool) or not isinstance(max_proposals, int) or max_proposals < 1:
            raise ConfigError(f"adapter.run: max_proposals={max_proposals!r} must be a positive integer")
        if with_masks and not self.arch.class_agnostic_mask:
            raise ConfigError(
                "adapter.run: this detector's mask head is class-wise, the cache stores class-agnostic "
                "mask logits; extract without masks"
            )

    # ------------------------------------------------------------------ public
    @torch.inference_mode()
    def run(
        self,
        images: list[np.ndarray],
        *,
        gt_boxes: list[np.ndarray] | None = None,
        levels: tuple[str, ...] = ("fc",),
        max_proposals: int = 300,
        with_masks: bool = False,
        mask_rows: MaskRows | None = None,
    ) -> list[RoiOutputs]:
        """RoI outputs per image (see the module docstring); order follows ``images``.

        Args:
            images: RGB uint8 ``[H, W, 3]`` arrays.
            gt_boxes: per image float ``[G, 4]`` xyxy original pixels, appended after the proposals
                (objectness ``+inf``, ``is_gt`` True); ``None`` = proposals only.
            levels: feature levels to return (``"fc"``, ``"pooled"``).
            max_proposals: RPN proposals kept per image after NMS, highest objectness first.
            with_masks: also compute class-agnostic mask logits on the regressed boxes.
            mask_rows: with ``with_masks``, compute masks only for the rows of the
                :class:`MaskRequest` this returns (given the image's outputs without masks and its
                original (height, width)); other rows' mask logits are left 0. Full inference
                uses it as torchvision does: the mask head runs only on the RoIs that became
                detections (exact for a class-agnostic mask head, and ~5x cheaper).
        """
        levels = tuple(levels)
        self._check_inputs(images, gt_boxes, levels, max_proposals, with_masks)
        by_size: dict[tuple[int, int], list[int]] = {}
        for i, img in enumerate(images):
            by_size.setdefault(img.shape[:2], []).append(i)
        results: list[RoiOutputs | None] = [None] * len(images)
        for members in by_size.values():
            gts = None if gt_boxes is None else [gt_boxes[i] for i in members]
            outs = self._run_batch([images[i] for i in members], gts, levels, max_proposals, with_masks, mask_rows)
            for i, out in zip(members, outs):
                results[i] = out
        return results  # type: ignore[return-value]

    # ------------------------------------------------------------------ internals
    def _proposals(self, image_list, features) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The RPN's test-time post-NMS proposals (resized-image pixels) and their logits.

        Mirrors ``RegionProposalNetwork.forward`` + ``filter_proposals`` in eval mode, except that
        the objectness LOGITS are carried along (torchvision keeps only sigmoid probabilities,
        which saturate to 1.0) and the post-NMS cut is left to the caller. Every operation and
        ordering matches torchvision's, so the first 300 proposals are the model's own.
        """
        rpn = self.model.rpn
        maps = list(features.values())
        objectness, deltas = rpn.head(maps)
        anchors = rpn.anchor_generator(image_list, maps)
        num_images = len(anchors)
        per_level = [o[0].numel() for o in objectness]
        objectness, deltas = concat_box_prediction_layers(objectness, deltas)
        proposals = rpn.box_coder.decode(deltas, anchors).view(num_images, -1, 4)
        objectness = objectness.reshape(num_images, -1)
        level_ids = torch.cat(
            [torch.full((n,), k, dtype=torch.int64, device=objectness.device) for k, n in enumerate(per_level)]
        ).reshape(1, -1).expand_as(objectness)
        top = rpn._get_top_n_idx(objectness, per_level)  # per-level pre-NMS top-n at test settings
        rows = torch.arange(num_images, device=objectness.device)[:, None]
        objectness, level_ids, proposals = objectness[rows, top], level_ids[rows, top], proposals[rows, top]
        boxes_out, logits_out = [], []
        for boxes, logit, lvl, shape in zip(proposals, objectness, level_ids, image_list.image_sizes):
            prob = torch.sigmoid(logit)
            boxes = box_ops.clip_boxes_to_image(boxes, shape)
            keep = box_ops.remove_small_boxes(boxes, rpn.min_size)
            boxes, prob, logit, lvl = boxes[keep], prob[keep], logit[keep], lvl[keep]
            keep = torch.where(prob >= rpn.score_thresh)[0]
            boxes, prob, logit, lvl = boxes[keep], prob[keep], logit[keep], lvl[keep]
            # NMS on probabilities (not logits) so ties break exactly as torchvision's do.
            keep = box_ops.batched_nms(boxes, prob, lvl, rpn.nms_thresh)
            boxes_out.append(boxes[keep])
            logits_out.append(logit[keep])
        return boxes_out, logits_out

    def _run_batch(self, images, gt_boxes, levels, max_proposals, with_masks, mask_rows=None) -> list[RoiOutputs]:
        model, heads = self.model, self.model.roi_heads
        tensors = [torch.from_numpy(np.require(img, requirements=["W"])).to(self.device).permute(2, 0, 1).float().div_(255.0) for img in images]
        original_sizes = [tuple(t.shape[-2:]) for t in tensors]
        image_list, _ = model.transform(tensors)
        sizes = image_list.image_sizes
        features = model.backbone(image_list.tensors)
        proposals, obj_logits = self._proposals(image_list, features)
        rois, objectness, is_gt, gt_original = [], [], [], []
        for i, (props, logit) in enumerate(zip(proposals, obj_logits)):
            props, logit = props[:max_proposals], logit[:max_proposals]
            gt_original.append(
                torch.zeros((0, 4))
                if gt_boxes is None
                else torch.as_tensor(np.asarray(gt_boxes[i], dtype=np.float32).reshape(-1, 4))
            )
            gt = resize_boxes(gt_original[i].to(self.device), original_sizes[i], sizes[i])  # resized-image px
            rois.append(torch.cat([props, gt]))
            objectness.append(torch.cat([logit, torch.full((len(gt),), float("inf"), device=self.device)]))
            is_gt.append(torch.cat([torch.zeros(len(props), dtype=torch.bool), torch.ones(len(gt), dtype=torch.bool)]))
        pooled = heads.box_roi_pool(features, rois, sizes)
        fc = heads.box_head(pooled)
        predictor = heads.box_predictor
        class_logits = predictor.cls_score(fc)
        decoded = heads.box_coder.decode(predictor.agnostic_deltas(fc), rois).reshape(-1, 4)
        counts = [len(r) for r in rois]
        reg = [box_ops.clip_boxes_to_image(b, s) for b, s in zip(decoded.split(counts), sizes)]
        masks = None
        if with_masks and mask_rows is None:
            mask_features = heads.mask_head(heads.mask_roi_pool(features, reg, sizes))
            masks = heads.mask_predictor.raw_logits(mask_features)[:, 0].split(counts)
        # torchvision's background is column 0; the cache puts it last.
        logits = torch.cat([class_logits[:, 1:], class_logits[:, :1]], dim=1).split(counts)
        level_values = {"fc": fc.split(counts), "pooled": pooled.split(counts)}
        outs = []
        for i in range(len(images)):
            back = (sizes[i], original_sizes[i])
            outs.append(
                RoiOutputs(
                    # GT rows are returned exactly as given, not round-tripped through the resize.
                    boxes=np.concatenate([_np(resize_boxes(rois[i][: counts[i] - len(gt_original[i])], *back)),
                                          gt_original[i].numpy()]),
                    objectness=_np(objectness[i]),
                    is_gt=is_gt[i].cpu().numpy(),
                    features={lv: _np(level_values[lv][i]) for lv in levels},
                    logits=_np(logits[i]),
                    reg_boxes=_np(resize_boxes(reg[i], *back)),
                    mask_logits=None if masks is None else _np(masks[i]),
                )
            )
        if with_masks and mask_rows is not None:
            outs = [self._selected_masks(out, r, s, features, i, mask_rows(out, original_sizes[i]).rows)
                    for i, (out, r, s) in enumerate(zip(outs, reg, sizes))]
        return outs

    def _selected_masks(self, out: RoiOutputs, reg: torch.Tensor, size, features, i: int, rows) -> RoiOutputs:
        """``out`` with mask logits for ``rows`` (zeros elsewhere)."""
        heads = self.model.roi_heads
        rows = torch.as_tensor(np.asarray(rows, dtype=np.int64))
        m = self.mask_size
        logits = np.zeros((len(out), m, m), dtype=np.float32)
        if len(rows):
            one = {k: v[i : i + 1] for k, v in features.items()}
            feats = heads.mask_head(heads.mask_roi_pool(one, [reg[rows.to(reg.device)]], [size]))
            logits[rows.numpy()] = _np(heads.mask_predictor.raw_logits(feats)[:, 0])
        return replace(out, mask_logits=logits)


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().to("cpu", torch.float32).contiguous().numpy()

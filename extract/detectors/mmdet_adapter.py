"""The mmdetection backend of :class:`~extract.detectors.base.DetectorAdapter` (Faster / Mask R-CNN,
Cascade R-CNN, HTC).

One :meth:`MmdetAdapter.run` computes what the model's own ``predict`` computes for its RoIs,
through the model's own modules: the config's test pipeline and data preprocessor (so the cached
features are exactly what the model sees), ``extract_feat``, ``rpn_head.predict`` (post-NMS
proposals, highest score first), ``roi_head.bbox_roi_extractor`` (``pooled``), the box head's
shared fcs (``fc``: the input of ``fc_cls``, caught by a forward pre-hook), ``fc_cls`` logits
(background already last) and the box coder's per-class boxes.

mmdet's LVIS models regress one box per class; the store keeps the frozen ``fc_reg`` layer
(:meth:`box_regression`) instead of 4·C numbers per RoI. Their mask heads are class-specific,
which the store cannot hold per RoI, so this backend extracts no mask logits (cached evaluation
gives box AP; mask AP comes from full inference).

Cascades (``CascadeRoIHead``, ``HybridTaskCascadeRoIHead``, class-agnostic refinement only) run
stage by stage through ``roi_head._bbox_forward(stage, ...)`` as mmdet's ``_refine_roi`` does:
stage ``k`` classifies stage ``k-1``'s regressed boxes. Every stage's RoIs, features and logits
go to ``RoiOutputs.stages``; the top-level logits are the stage logits averaged (mmdet's own
order: summed, then divided), the boxes the last stage's.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from cache_schema.errors import ConfigError
from cache_schema.postprocess import BoxRegression
from cache_schema.runtime import sha256_file
from extract.detectors import mmdet_config as mc
from extract.detectors.base import FEATURE_LEVELS, MaskRequest, MaskRows, Postprocess, RoiOutputs, StageRois

#: Detections whose masks are pasted at once (each is an image-sized bool array).
MASK_CHUNK = 64


class MmdetAdapter:
    """A :class:`DetectorAdapter` over an mmdetection two-stage checkpoint."""

    backend = "mmdet"
    class_agnostic_mask = False  # see the module docstring: no mask logits are extracted

    def __init__(self, *, model, cfg, path: Path, sha256: str, class_names: tuple[str, ...],
                 config_source: str, device: torch.device) -> None:
        self.model, self.cfg, self.path, self.sha256 = model, cfg, Path(path), sha256
        self.device = torch.device(device)
        self.config_source = config_source
        roi_head = model.roi_head
        self.stage_fg_iou = mc.stage_fg_iou(cfg)
        heads = roi_head.bbox_head
        self.stage_heads = tuple(heads) if self.stage_fg_iou else (heads,)
        if self.stage_fg_iou and len(self.stage_heads) != len(self.stage_fg_iou):
            raise ConfigError(f"{path}: {len(self.stage_heads)} box heads for {len(self.stage_fg_iou)} cascade stages in "
                              "train_cfg.rcnn; the config and the model disagree")
        self.bbox_head = self.stage_heads[0]
        for head in self.stage_heads:
            self._check_head(head)
        self.num_classes = int(self.bbox_head.num_classes)
        if len(class_names) != self.num_classes:
            raise ConfigError(f"{path}: {len(class_names)} class names for a {self.num_classes}-class box head; "
                              "the checkpoint's dataset_meta and the config disagree")
        # mmdet checkpoints record class names, not json ids: the ids come from the annotation file
        # (checked by name when a dataset is attached, extract.writer).
        self.categories = tuple({"id": None, "name": n} for n in class_names)
        extractor = roi_head.bbox_roi_extractor[0] if self.stage_fg_iou else roi_head.bbox_roi_extractor
        side = int(extractor.roi_layer.output_size[0]) if hasattr(extractor, "roi_layer") else 7
        self.levels = {"fc": (int(self.bbox_head.fc_cls.in_features),),
                       "pooled": (int(extractor.out_channels), side, side)}
        mask_head = getattr(roi_head, "mask_head", None) if getattr(roi_head, "with_mask", False) else None
        if isinstance(mask_head, torch.nn.ModuleList):  # a cascade's per-stage mask heads share one size
            mask_head = mask_head[-1]
        # FCNMaskHead's roi_feat_size is a (h, w) pair; its logits are upsampled scale_factor times.
        self.mask_size = 0 if mask_head is None else int(np.ravel(mask_head.roi_feat_size)[0] * mask_head.scale_factor)
        test = cfg.model.test_cfg
        self.default_proposals = int(test.rpn.max_per_img)
        self.postprocess = Postprocess(score_thresh=float(test.rcnn.score_thr),
                                       nms_iou=float(test.rcnn.nms.iou_threshold),
                                       max_dets=int(test.rcnn.max_per_img), min_box_size=0.0)
        self._pipeline = self._test_pipeline()

    # ------------------------------------------------------------------ loading
    @classmethod
    def accepts(cls, payload: object) -> bool:
        return mc.is_mmdet_checkpoint(payload)

    @classmethod
    def from_payload(cls, payload: dict, *, path: Path, device: str | torch.device = "cpu",
                     config: str | None = None) -> "MmdetAdapter":
        """Build the model from its config (``config`` or the checkpoint's) and load its weights."""
        # Config and class table are checked before mmcv's ops are stood in (and announced).
        mc.require_mmdet(ops=False)
        cfg, source = mc.resolve_config(payload, config, path=Path(path))
        mc.check_two_stage(cfg)
        _drop_pretrained(cfg.model)
        names = mc.class_names(payload)
        if names is None:
            raise ConfigError(f"{path} records no class names (meta.dataset_meta.classes); re-save it with mmengine "
                              "or add them to its meta")
        mc.require_mmdet()
        model = mc.build_model(cfg, source=source)
        mc.load_weights(model, payload, source=source, path=Path(path))
        model.cfg = cfg
        model.to(device).eval()
        adapter = cls(model=model, cfg=cfg, path=Path(path), sha256=sha256_file(path), class_names=names,
                      config_source=source, device=torch.device(device))
        # One forward on a blank image before anything is written: a model that needs a compiled
        # op the installed mmcv lacks is refused here, with the op's name, not midway through a store.
        adapter.run([np.zeros((32, 32, 3), np.uint8)], levels=("fc",), max_proposals=1)
        return adapter

    @staticmethod
    def categories_of(payload: dict) -> tuple[dict, ...]:
        return tuple({"id": None, "name": n} for n in (mc.class_names(payload) or ()))

    @staticmethod
    def replace_classifier(payload: dict, *, weight: torch.Tensor, bias: torch.Tensor, stage: int = 0) -> dict:
        """The checkpoint with ``fc_cls`` (of cascade stage ``stage``) replaced by ``weight``
        ``[C+1, D]`` / ``bias`` (store order = mmdet's: background last); everything else, meta
        included, untouched, so plain mmdet (``init_detector``) loads it."""
        state = dict(payload["state_dict"])
        prefix = "module." if any(k.startswith("module.") for k in state) else ""
        cascade = f"{prefix}roi_head.bbox_head.{int(stage)}.fc_cls"
        key = cascade if f"{cascade}.weight" in state else f"{prefix}roi_head.bbox_head.fc_cls"
        if stage and key != cascade:
            raise ConfigError(f"the checkpoint has no cascade stage {stage}; inject a head trained with --stage 0")
        old = state.get(f"{key}.weight")
        if old is None or tuple(old.shape) != tuple(weight.shape):
            got = None if old is None else tuple(old.shape)
            raise ConfigError(f"the new classifier is {tuple(weight.shape)}, the checkpoint's fc_cls {got}; "
                              "inject a head trained on this detector's store")
        state[f"{key}.weight"] = weight.detach().cpu().to(old.dtype).clone()
        state[f"{key}.bias"] = bias.detach().cpu().to(old.dtype).clone()
        return {**payload, "state_dict": state}

    # ------------------------------------------------------------------ boundary
    def describe(self) -> dict:
        return {"backend": self.backend, "checkpoint_sha256": self.sha256, "checkpoint_name": self.path.name,
                "arch": {"model": self.cfg.model.type, "roi_head": self.cfg.model.roi_head.type,
                         "bbox_head": type(self.bbox_head).__name__, "num_classes": self.num_classes,
                         "num_stages": len(self.stage_heads),
                         "config_source": self.config_source, "reg_class_agnostic": self.class_agnostic_box,
                         "config": self.cfg.pretty_text},
                "feature_levels": {k: list(v) for k, v in self.levels.items()}, "num_classes": self.num_classes,
                "postprocess": self.postprocess.to_dict()}

    @property
    def class_agnostic_box(self) -> bool:
        return all(bool(h.reg_class_agnostic) for h in self.stage_heads)

    def head_state(self, stage: int = 0) -> dict[str, np.ndarray]:
        """``fc6``/``fc7`` = the two shared fcs, ``cls`` = ``fc_cls`` (background already last)."""
        if not 0 <= stage < len(self.stage_heads):
            raise ConfigError(f"the detector has {len(self.stage_heads)} classification stage(s); there is no stage {stage}")
        head = self.stage_heads[stage]
        fcs, cls = head.shared_fcs, head.fc_cls
        state = {"fc6.weight": fcs[0].weight, "fc6.bias": fcs[0].bias, "fc7.weight": fcs[1].weight,
                 "fc7.bias": fcs[1].bias, "cls.weight": cls.weight, "cls.bias": cls.bias}
        return {k: v.detach().cpu().float().numpy() for k, v in state.items()}

    def box_regression(self) -> BoxRegression | None:
        """The frozen class-specific regressor (``None`` when regression is class-agnostic)."""
        if self.class_agnostic_box:
            return None
        coder, reg = self.bbox_head.bbox_coder, self.bbox_head.fc_reg
        return BoxRegression(weight=reg.weight.detach().cpu().float().numpy(),
                             bias=reg.bias.detach().cpu().float().numpy(), means=tuple(coder.means),
                             stds=tuple(coder.stds))

    @torch.inference_mode()
    def run(self, images: list[np.ndarray], *, gt_boxes: list[np.ndarray] | None = None,
            levels: tuple[str, ...] = ("fc",), max_proposals: int = 1000, with_masks: bool = False,
            mask_rows: MaskRows | None = None) -> list[RoiOutputs]:
        """RoI outputs per image, in order (see the module docstring). Images whose preprocessed
        tensors have the same size run as one batch (identical padding: batch-independent)."""
        unknown = [lv for lv in levels if lv not in FEATURE_LEVELS]
        if unknown:
            raise ConfigError(f"adapter.run: unknown feature level(s) {unknown}; choose from {list(FEATURE_LEVELS)}")
        if with_masks and (mask_rows is None or not self.mask_size):
            raise ConfigError("the mmdet backend stores no per-RoI mask logits (its mask head is class-specific); "
                              "masks are computed for detections only, in full inference (serve eval)")
        if gt_boxes is not None and len(gt_boxes) != len(images):
            raise ConfigError(f"adapter.run: {len(gt_boxes)} GT box arrays for {len(images)} images")
        packed = [self._pipeline({"img": np.ascontiguousarray(img[..., ::-1]), "img_id": i})  # RGB → BGR
                  for i, img in enumerate(images)]
        by_shape: dict[tuple[int, ...], list[int]] = {}
        for i, p in enumerate(packed):
            by_shape.setdefault(tuple(p["inputs"].shape), []).append(i)
        results: list[RoiOutputs | None] = [None] * len(images)
        for members in by_shape.values():
            gts = None if gt_boxes is None else [gt_boxes[i] for i in members]
            for i, out in zip(members, self._run_batch([packed[i] for i in members], gts, levels, max_proposals,
                                                         mask_rows if with_masks else None)):
                results[i] = out
        return results  # type: ignore[return-value]

    # ------------------------------------------------------------------ internals
    @staticmethod
    def _check_head(head) -> None:
        if getattr(head, "custom_cls_channels", False):
            raise ConfigError("this box head uses a custom classification activation (e.g. Seesaw loss); "
                              "roicache reads softmax classifiers so far")
        if head.num_shared_fcs != 2 or head.num_shared_convs or head.num_cls_convs or head.num_cls_fcs:
            raise ConfigError("roicache reads box heads with exactly two shared fcs feeding fc_cls "
                              "(Shared2FCBBoxHead); this head has other layers on the classification path")
        coder = head.bbox_coder
        if type(coder).__name__ != "DeltaXYWHBBoxCoder" or getattr(coder, "add_ctr_clamp", False) or not coder.clip_border:
            raise ConfigError(f"box coder {type(coder).__name__} is not supported; roicache recomputes boxes "
                              "with DeltaXYWHBBoxCoder (clip_border=True, no centre clamp)")

    def _test_pipeline(self):
        from mmdet.utils import get_test_pipeline_cfg
        from mmengine.dataset import Compose

        steps = [dict(s) for s in get_test_pipeline_cfg(self.cfg.copy())]
        if not steps or "LoadImage" not in str(steps[0].get("type")):
            raise ConfigError("the config's test pipeline does not start by loading the image; roicache feeds "
                              "decoded images through the rest of it")
        steps[0] = {"type": "mmdet.LoadImageFromNDArray"}
        # Ground truth is not read at inference; the annotations step would only look for it.
        steps = [s for s in steps if "LoadAnnotations" not in str(s.get("type"))]
        return Compose(steps)

    def _run_batch(self, packed: list[dict], gt_boxes, levels, max_proposals, mask_rows=None) -> list[RoiOutputs]:
        from mmdet.structures.bbox import bbox2roi

        model = self.model
        data = model.data_preprocessor({"inputs": [p["inputs"] for p in packed],
                                        "data_samples": [p["data_samples"] for p in packed]}, False)
        samples = data["data_samples"]
        feats = model.extract_feat(data["inputs"].to(self.device))
        proposals = model.rpn_head.predict(feats, samples, rescale=False)
        scales = [torch.tensor(s.metainfo["scale_factor"], dtype=torch.float32, device=self.device).repeat(2)
                  for s in samples]  # (w, h, w, h): original px × scale = input px
        rois, objectness, n_gt = [], [], []
        for i, prop in enumerate(proposals):
            boxes, probs = prop.bboxes[:max_proposals], prop.scores[:max_proposals]
            gt = torch.zeros((0, 4), device=self.device) if gt_boxes is None else \
                torch.as_tensor(np.asarray(gt_boxes[i], np.float32).reshape(-1, 4), device=self.device)
            rois.append(torch.cat([boxes, gt * scales[i]]))
            # mmdet keeps sigmoid probabilities only; the logit is recovered from them.
            objectness.append(torch.cat([torch.logit(probs.float(), eps=1e-6),
                                         torch.full((len(gt),), float("inf"), device=self.device)]))
            n_gt.append(len(gt))
        counts = [len(r) for r in rois]
        shapes = [s.metainfo["img_shape"] for s in samples]
        stages = self._stages(feats, bbox2roi(rois), counts, shapes)
        outs = []
        for i, r in enumerate(rois):
            given = np.concatenate([_np(r[: counts[i] - n_gt[i]] / scales[i]),
                                    np.asarray(gt_boxes[i], np.float32).reshape(-1, 4)]) \
                if gt_boxes is not None else _np(r / scales[i])
            per_stage = [(st_rois[i], cls[i], reg[i], {lv: _np(v[lv][i]) for lv in levels})
                         for st_rois, cls, reg, v in stages]
            boxes = per_stage[-1][2].reshape(counts[i], -1, 4) / scales[i][None, None]  # → original pixels
            # The cascade's score input: stage logits summed then divided, in mmdet's order (_refine_roi).
            logits = sum(cls for _, cls, _, _ in per_stage) / float(len(per_stage)) if self.stage_fg_iou \
                else per_stage[0][1]
            top = logits[:, :-1].argmax(dim=1) if boxes.shape[1] > 1 else torch.zeros(counts[i], dtype=torch.int64)
            cascade = tuple(StageRois(boxes=given if k == 0 else _np(st_rois / scales[i]), logits=_np(cls), features=f)
                            for k, (st_rois, cls, _, f) in enumerate(per_stage)) if self.stage_fg_iou else None
            outs.append(RoiOutputs(
                boxes=given, objectness=_np(objectness[i]), is_gt=np.arange(counts[i]) >= counts[i] - n_gt[i],
                features=per_stage[0][3], logits=_np(logits), reg_boxes=_np(boxes[torch.arange(counts[i]), top]),
                class_boxes=_np(boxes) if boxes.shape[1] > 1 else None, stages=cascade))
        if mask_rows is not None:
            outs = [replace(out, det_masks=self._det_masks(
                        tuple(f[i:i + 1] for f in feats), samples[i].metainfo, scales[i],
                        mask_rows(out, tuple(samples[i].metainfo["ori_shape"]))))
                    for i, out in enumerate(outs)]
        return outs

    def _stages(self, feats, rois: torch.Tensor, counts: list[int], shapes: list) -> list[tuple]:
        """Per stage, per image: (the stage's RoIs ``[R, 4]`` in input px, its logits ``[R, C+1]``,
        its decoded boxes ``[R, 4]`` or ``[R, 4C]``, and ``{"pooled": [R, ...], "fc": [R, D]}``) —
        the head's input and ``fc_cls``'s input, caught by forward pre-hooks on the model's own
        forward (HTC's semantic fusion included)."""
        roi_head = self.model.roi_head
        extra = {}
        if getattr(roi_head, "with_semantic", False):
            extra["semantic_feat"] = roi_head.semantic_head(feats)[1]
        out = []
        for k, head in enumerate(self.stage_heads):
            caught: dict[str, torch.Tensor] = {}
            hooks = [head.register_forward_pre_hook(lambda _m, args: caught.setdefault("pooled", args[0])),
                     head.fc_cls.register_forward_pre_hook(lambda _m, args: caught.setdefault("fc", args[0]))]
            try:
                res = roi_head._bbox_forward(k, feats, rois, **extra) if self.stage_fg_iou else \
                    roi_head._bbox_forward(feats, rois)
            finally:
                for h in hooks:
                    h.remove()
            st_rois = rois[:, 1:].split(counts)
            decoded = [head.bbox_coder.decode(r, d, max_shape=shape)
                       for r, d, shape in zip(st_rois, res["bbox_pred"].split(counts), shapes)]
            out.append((st_rois, res["cls_score"].split(counts), decoded,
                        {lv: v.split(counts) for lv, v in caught.items()}))
            if k + 1 < len(self.stage_heads):  # class-agnostic refinement: the next stage's RoIs
                rois = torch.cat([rois[:, :1], torch.cat(decoded)], dim=1)
        return out

    def _det_masks(self, feats, meta: dict, scale: torch.Tensor, request: MaskRequest) -> tuple[dict, ...]:
        """One RLE per requested detection, by the model's own mask head and post-processing
        (mask of the detection's class on its box, pasted at the original size, thresholded)."""
        from mmengine.structures import InstanceData
        from pycocotools import mask as mask_util

        roi_head, rles = self.model.roi_head, []
        semantic = roi_head.semantic_head(feats)[1] if getattr(roi_head, "with_semantic", False) else None
        for lo in range(0, len(request.rows), MASK_CHUNK):  # bounds the [K, H, W] bool masks
            boxes = torch.as_tensor(request.boxes[lo:lo + MASK_CHUNK], dtype=torch.float32, device=self.device)
            labels = torch.as_tensor(request.labels[lo:lo + MASK_CHUNK], dtype=torch.int64, device=self.device)
            res = [InstanceData(bboxes=boxes * scale, labels=labels, scores=torch.ones(len(labels)))]
            # The RoI head's own mask path (a cascade merges its stages' masks; HTC adds its info flow).
            masks = (roi_head.predict_mask(feats, semantic, [meta], res, rescale=True)
                     if type(roi_head).__name__ == "HybridTaskCascadeRoIHead"
                     else roi_head.predict_mask(feats, [meta], res, rescale=True))[0].masks
            encoded = mask_util.encode(np.asfortranarray(masks.cpu().numpy().transpose(1, 2, 0).astype(np.uint8)))
            rles += [{"size": r["size"], "counts": r["counts"].decode("ascii")} for r in encoded]
        return tuple(rles)


def _drop_pretrained(model_cfg) -> None:
    """Remove ``init_cfg`` pretrained entries: the checkpoint's weights replace them, and loading
    them would try a download."""
    def walk(node) -> None:
        if isinstance(node, dict):
            init = node.get("init_cfg")
            if isinstance(init, dict) and init.get("type") == "Pretrained":
                node["init_cfg"] = None
            for v in node.values():
                walk(v)
        elif isinstance(node, (list, tuple)):
            for v in node:
                walk(v)
    walk(model_cfg)


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().to("cpu", torch.float32).contiguous().numpy()


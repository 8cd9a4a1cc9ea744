"""The mmdetection backend of :class:`~extract.detectors.base.DetectorAdapter` (Faster / Mask R-CNN).

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
from extract.detectors.base import FEATURE_LEVELS, MaskRequest, MaskRows, Postprocess, RoiOutputs

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
        self.bbox_head = roi_head.bbox_head
        self._check_head()
        self.num_classes = int(self.bbox_head.num_classes)
        if len(class_names) != self.num_classes:
            raise ConfigError(f"{path}: {len(class_names)} class names for a {self.num_classes}-class box head; "
                              "the checkpoint's dataset_meta and the config disagree")
        # mmdet checkpoints record class names, not json ids: the ids come from the annotation file
        # (checked by name when a dataset is attached, extract.writer).
        self.categories = tuple({"id": None, "name": n} for n in class_names)
        extractor = roi_head.bbox_roi_extractor
        side = int(extractor.roi_layer.output_size[0]) if hasattr(extractor, "roi_layer") else 7
        self.levels = {"fc": (int(self.bbox_head.fc_cls.in_features),),
                       "pooled": (int(extractor.out_channels), side, side)}
        mask_head = getattr(roi_head, "mask_head", None) if getattr(roi_head, "with_mask", False) else None
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
    def replace_classifier(payload: dict, *, weight: torch.Tensor, bias: torch.Tensor) -> dict:
        """The checkpoint with ``fc_cls`` replaced by ``weight`` ``[C+1, D]`` / ``bias`` (store
        order = mmdet's: background last); everything else, meta included, untouched, so plain
        mmdet (``init_detector``) loads it."""
        state = dict(payload["state_dict"])
        prefix = "module." if any(k.startswith("module.") for k in state) else ""
        key = f"{prefix}roi_head.bbox_head.fc_cls"
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
                         "bbox_head": self.cfg.model.roi_head.bbox_head.type, "num_classes": self.num_classes,
                         "config_source": self.config_source, "reg_class_agnostic": self.class_agnostic_box,
                         "config": self.cfg.pretty_text},
                "feature_levels": {k: list(v) for k, v in self.levels.items()}, "num_classes": self.num_classes,
                "postprocess": self.postprocess.to_dict()}

    @property
    def class_agnostic_box(self) -> bool:
        return bool(self.bbox_head.reg_class_agnostic)

    def head_state(self) -> dict[str, np.ndarray]:
        """``fc6``/``fc7`` = the two shared fcs, ``cls`` = ``fc_cls`` (background already last)."""
        fcs, cls = self.bbox_head.shared_fcs, self.bbox_head.fc_cls
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
    def _check_head(self) -> None:
        head = self.bbox_head
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

        model, roi_head, head = self.model, self.model.roi_head, self.bbox_head
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
        batch_rois = bbox2roi(rois)
        pooled = roi_head.bbox_roi_extractor(feats[: roi_head.bbox_roi_extractor.num_inputs], batch_rois)
        caught: list[torch.Tensor] = []
        hook = head.fc_cls.register_forward_pre_hook(lambda _m, args: caught.append(args[0]))
        try:
            cls_score, bbox_pred = head(pooled)
        finally:
            hook.remove()
        fc = caught[0]
        counts = [len(r) for r in rois]
        outs = []
        for i, (r, s, p, f, d) in enumerate(zip(rois, cls_score.split(counts), pooled.split(counts),
                                                fc.split(counts), bbox_pred.split(counts))):
            boxes = head.bbox_coder.decode(r, d, max_shape=samples[i].metainfo["img_shape"])
            boxes = boxes.reshape(len(r), -1, 4) / scales[i][None, None]  # → original pixels
            top = s[:, :-1].argmax(dim=1) if boxes.shape[1] > 1 else torch.zeros(len(r), dtype=torch.int64)
            given = r[: counts[i] - n_gt[i]] / scales[i]
            values = {"fc": f, "pooled": p}
            outs.append(RoiOutputs(
                boxes=np.concatenate([_np(given), np.asarray(gt_boxes[i], np.float32).reshape(-1, 4)])
                if gt_boxes is not None else _np(given),
                objectness=_np(objectness[i]), is_gt=np.arange(len(r)) >= counts[i] - n_gt[i],
                features={lv: _np(values[lv]) for lv in levels}, logits=_np(s),
                reg_boxes=_np(boxes[torch.arange(len(r)), top]),
                class_boxes=_np(boxes) if boxes.shape[1] > 1 else None))
        if mask_rows is not None:
            outs = [replace(out, det_masks=self._det_masks(
                        tuple(f[i:i + 1] for f in feats), samples[i].metainfo, scales[i],
                        mask_rows(out, tuple(samples[i].metainfo["ori_shape"]))))
                    for i, out in enumerate(outs)]
        return outs

    def _det_masks(self, feats, meta: dict, scale: torch.Tensor, request: MaskRequest) -> tuple[dict, ...]:
        """One RLE per requested detection, by the model's own mask head and post-processing
        (mask of the detection's class on its box, pasted at the original size, thresholded)."""
        from mmdet.structures.bbox import bbox2roi
        from mmengine.structures import InstanceData
        from pycocotools import mask as mask_util

        roi_head, rles = self.model.roi_head, []
        for lo in range(0, len(request.rows), MASK_CHUNK):  # bounds the [K, H, W] bool masks
            boxes = torch.as_tensor(request.boxes[lo:lo + MASK_CHUNK], dtype=torch.float32, device=self.device)
            labels = torch.as_tensor(request.labels[lo:lo + MASK_CHUNK], dtype=torch.int64, device=self.device)
            preds = roi_head._mask_forward(feats, bbox2roi([boxes * scale]))["mask_preds"]
            res = InstanceData(bboxes=boxes * scale, labels=labels, scores=torch.ones(len(labels)))
            masks = roi_head.mask_head.predict_by_feat(mask_preds=(preds,), results_list=[res], batch_img_metas=[meta],
                                                       rcnn_test_cfg=roi_head.test_cfg, rescale=True)[0].masks
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


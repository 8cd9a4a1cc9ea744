"""Evaluate heads from the cache alone: cached val RoIs -> combined scores -> detections -> LVIS AP.

The cache holds, per val RoI, the original head's logits, the class-agnostic regressed box and
(class-agnostic) mask logits, so a new classification head is evaluated without the detector:
softmax both heads, combine (``heads.combine``), assemble each image's detections exactly as
torchvision's postprocessing would, and run the official LVIS evaluation.

For a detector with class-specific box regression (``box_regression``), every (RoI, class) pair
has its own box, decoded on demand from the RoI's ``fc`` feature and proposal box
(:mod:`heads.evaluation.class_boxes`); ``reg_boxes`` (the top class's box only) is not used.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence

import numpy as np
import torch
from lvis import LVIS

from cache_schema.errors import ConfigError, SchemaError
from cache_schema.postprocess import BoxRegression
from cache_schema.records import ClassInfo, RoiSet
from heads.combine import Combination, get_rule
from heads.evaluation.class_boxes import BoxDecoder, ClassBoxes
from heads.evaluation.detections import MIN_BOX_SIZE, Detections, merge_det, select_detections_many, to_results
from heads.evaluation.lvis_eval import evaluate_lvis
from heads.evaluation.metrics import BinSpec, Metrics


def _check(roiset: RoiSet, class_info: ClassInfo, cal_probs: torch.Tensor | None,
           image_ids: np.ndarray, image_sizes: np.ndarray, box_regression: BoxRegression | None,
           box_features: torch.Tensor | None) -> None:
    if box_regression is None:
        for col in ("logits", "reg_boxes"):
            if getattr(roiset, col) is None:
                raise SchemaError(f"RoiSet has no '{col}'; load the val split with columns logits, reg_boxes (and mask_logits)")
    else:
        for col in ("logits", "boxes"):
            if getattr(roiset, col) is None:
                raise SchemaError(f"RoiSet has no '{col}'; class-specific boxes need the val split's columns logits, boxes")
        if box_features is None or box_features.ndim != 2 or box_features.shape[0] != len(roiset):
            got = None if box_features is None else tuple(box_features.shape)
            raise ConfigError(f"box_features is {got}; class-specific boxes need the [{len(roiset)}, D] fc features "
                              "of the same RoIs (the val split's 'fc' level)")
        if box_regression.num_classes != class_info.num_classes:
            raise SchemaError(f"the box regressor has {box_regression.num_classes} classes, the class table "
                              f"{class_info.num_classes}; read both from the same store")
    c1 = class_info.num_classes + 1
    if roiset.logits.shape[1] != c1:
        raise SchemaError(
            f"cached logits have {roiset.logits.shape[1]} columns, the class table {class_info.num_classes}+1; "
            "read the RoIs and the class table from the same store"
        )
    if cal_probs is not None and tuple(cal_probs.shape) != (len(roiset), c1):
        raise ConfigError(
            f"cal_probs has shape {tuple(cal_probs.shape)}, expected [{len(roiset)}, {c1}]; "
            "score every RoI of the RoiSet with a head trained on this store"
        )
    positions = roiset.images.cpu().numpy()
    if positions.size and (positions.min() < 0 or positions.max() >= len(image_ids) or positions.max() >= len(image_sizes)):
        raise ConfigError(
            f"image_ids/image_sizes ({len(image_ids)}/{len(image_sizes)} entries) do not cover split "
            f"positions up to {positions.max()}; pass the split's full per-position tables"
        )
    if np.asarray(image_sizes).ndim != 2 or np.asarray(image_sizes).shape[1] != 2:
        raise ConfigError(f"image_sizes has shape {np.asarray(image_sizes).shape}; expected [num_images, 2] (height, width)")


#: Images per block of detection assembly (bounds the padded [B, R, C] score arrays).
DETECT_BLOCK = 32


def _iterate_blocks(n: int, progress: bool, label: str) -> Iterable[int]:
    starts = range(0, n, DETECT_BLOCK)
    if not progress:
        return starts
    from rich.progress import track  # only when asked: keeps import-time light for tests

    return track(starts, description=label, total=len(starts), transient=True)


def detect_cached_arrays(
    *,
    roiset: RoiSet,
    class_info: ClassInfo,
    cal_probs: torch.Tensor | None,
    combination: Combination,
    image_ids: np.ndarray,
    image_sizes: np.ndarray,
    score_thresh: float = 0.0,
    nms_iou: float = 0.5,
    max_dets: int = 300,
    progress: bool = True,
    min_box_size: float = MIN_BOX_SIZE,
    box_regression: BoxRegression | None = None,
    box_features: torch.Tensor | None = None,
) -> list[Detections]:
    """Each image's :class:`Detections` (``roi_index`` relative to the image's rows).

    ``score_thresh``, ``nms_iou``, ``max_dets``, ``min_box_size``: the detector's test-time
    settings (``cache_schema.meta.Postprocess``; torchvision's by default). With
    ``box_regression`` (class-specific regression) each (RoI, class) box is decoded from
    ``box_features`` (float16/32 ``[N, D]``, the RoIs' ``fc`` level, rows of ``roiset``) and
    ``roiset.boxes``, only for the candidates NMS looks at; else ``roiset.reg_boxes`` is every
    class's box.
    """
    _check(roiset, class_info, cal_probs, image_ids, image_sizes, box_regression, box_features)
    decoder = BoxDecoder(box_regression) if box_regression is not None else None
    rule = get_rule(combination.rule)
    # Softmax once over all rows (vectorised); combination is per image because sel-scale's
    # background means are per image, as in per-image detector inference.
    p_orig = torch.softmax(roiset.logits.float(), dim=1)
    # The calibrated head gives probabilities (softmax or Gumbel, see heads.models.head_scores).
    p_cal = cal_probs.float().to(p_orig.device) if cal_probs is not None else None
    counts = torch.as_tensor(class_info.instance_count, dtype=torch.int64)
    positions = roiset.images.cpu().numpy()
    out: list[Detections] = []
    # Images go through detection assembly in blocks: the NMS works on whole blocks at once.
    for start in _iterate_blocks(roiset.num_images, progress, f"detect ({combination.rule})"):
        js = range(start, min(start + DETECT_BLOCK, roiset.num_images))
        streams = [rule(p_orig=p_orig[roiset.rows_of(j)], p_cal=p_cal[roiset.rows_of(j)] if p_cal is not None else None,
                        instance_count=counts, config=combination) for j in js]
        if decoder is None:
            boxes = [roiset.reg_boxes[roiset.rows_of(j)] for j in js]
        else:
            boxes = [ClassBoxes(decoder=decoder, fc=box_features[roiset.rows_of(j)], proposals=roiset.boxes[roiset.rows_of(j)])
                     for j in js]
        sizes = [tuple(int(v) for v in image_sizes[positions[j]]) for j in js]
        per_stream = [select_detections_many(scores=[s[i] for s in streams], boxes=boxes, image_sizes=sizes,
                                             score_thresh=score_thresh, nms_iou=nms_iou, max_dets=max_dets, stream=i,
                                             min_box_size=min_box_size)
                      for i in range(len(streams[0]))]
        if len(per_stream) == 1:
            out += per_stream[0]
        else:  # the det rule: each stream detected alone, then merged per image
            out += [merge_det(dets=list(sets), nms_iou=nms_iou, max_dets=max_dets) for sets in zip(*per_stream)]
    return out


def cached_results(*, dets: list[Detections], roiset: RoiSet, class_info: ClassInfo, image_ids: np.ndarray,
                   image_sizes: np.ndarray) -> list[dict]:
    """LVIS-format results of :func:`detect_cached_arrays`' detections; with masks (RLE, each
    RoI pasted once) when the RoiSet has ``mask_logits``, else boxes only."""
    positions = roiset.images.cpu().numpy()
    results: list[dict] = []
    for j, d in enumerate(dets):
        rows = roiset.rows_of(j)
        results += to_results(dets=d, image_id=int(image_ids[positions[j]]), category_ids=class_info.category_ids,
                              mask_logits=roiset.mask_logits[rows] if roiset.mask_logits is not None else None,
                              image_size=tuple(int(v) for v in image_sizes[positions[j]]))
    return results


def evaluate_cached(
    *,
    roiset: RoiSet,
    class_info: ClassInfo,
    cal_probs: torch.Tensor | None,
    combination: Combination,
    gt_json: str | os.PathLike[str] | LVIS,
    image_ids: np.ndarray,
    image_sizes: np.ndarray,
    bins: BinSpec | None = None,
    max_dets: int = 300,
    progress: bool = True,
    score_thresh: float = 0.0,
    nms_iou: float = 0.5,
    iou_types: Sequence[str] = ("segm", "bbox"),
    min_box_size: float = MIN_BOX_SIZE,
    box_regression: BoxRegression | None = None,
    box_features: torch.Tensor | None = None,
) -> tuple[list[dict], Metrics]:
    """Evaluate the original head (and a calibrated one) on cached val RoIs.

    Args:
        roiset: val RoIs with ``logits`` ``[N, C+1]``, ``reg_boxes`` ``[N, 4]`` (xyxy, pixels of
            the original image) and optionally ``mask_logits`` ``[N, M, M]``; ``images`` are
            split positions.
        class_info: the store's class table (json category ids, training instance counts).
        cal_probs: float ``[N, C+1]`` calibrated head's class probabilities (background last) for the
            same rows (``heads.models.head_scores``), or None.
        combination: the rule (``orig``, ``sel``, ``det``, ...) and its settings (T, boundary,
            sel-thr threshold, sel-scale direction).
        gt_json: the split's annotation file (or a loaded :class:`lvis.LVIS`).
        image_ids: int ``[S]`` json id of every split position; image_sizes: int ``[S, 2]`` (h, w).
        bins: AP bins (default LVIS); max_dets: detections per image (300).
        progress: show a progress bar (rich) over images.
        score_thresh, nms_iou, min_box_size: detection assembly settings (torchvision's 0.0 / 0.5 /
            1e-2 by default; the store's ``Postprocess``).
        iou_types: ``segm`` is skipped (with a note) when the RoiSet has no mask logits.
        box_regression, box_features: class-specific regression and the RoIs' ``fc`` features
            ``[N, D]`` (see :func:`detect_cached_arrays`); then ``roiset`` needs ``boxes``.
    Returns:
        (LVIS results list, :class:`Metrics` over exactly the RoiSet's images).
    """
    dets = detect_cached_arrays(roiset=roiset, class_info=class_info, cal_probs=cal_probs, combination=combination,
                                image_ids=image_ids, image_sizes=image_sizes, score_thresh=score_thresh, nms_iou=nms_iou,
                                max_dets=max_dets, progress=progress, min_box_size=min_box_size,
                                box_regression=box_regression, box_features=box_features)
    results = cached_results(dets=dets, roiset=roiset, class_info=class_info, image_ids=image_ids,
                             image_sizes=image_sizes)
    metrics = evaluate_lvis(gt_json=gt_json, results=results, iou_types=iou_types, bins=bins, max_dets=max_dets,
                            image_ids=evaluated_image_ids(roiset, image_ids))
    return results, metrics


def evaluated_image_ids(roiset: RoiSet, image_ids: np.ndarray) -> list[int]:
    """json ids of the images ``roiset`` holds (``image_ids``: id of every split position)."""
    return [int(image_ids[p]) for p in roiset.images.cpu().numpy()]

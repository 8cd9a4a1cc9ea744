"""Inputs of the array evaluation (:mod:`heads.evaluation.fast_lvis`) from an LVIS annotation file,
cached detections and the store's mask overlaps, and its :class:`Metrics`."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pycocotools.mask as mask_utils
import torch
from lvis import LVIS

from cache_schema.errors import ConfigError, DatasetError
from cache_schema.eval_gt import EvalGroundTruth
from heads.evaluation.detections import Detections
from heads.evaluation.fast_lvis import DetArrays, GtArrays, evaluate_arrays
from heads.evaluation.metrics import BinSpec, IouMetrics, Metrics, summarize_precision


class OverlapsUnavailable(DatasetError):
    """The store's mask overlaps cannot stand in for the annotation file's masks."""


def _keys(gt: LVIS, ids: np.ndarray, cat_index: Mapping[int, int], field: str) -> np.ndarray:
    k = len(cat_index)
    keys = [i * k + cat_index[c] for i, img in enumerate(ids) for c in gt.imgs[int(img)][field] if c in cat_index]
    return np.unique(np.asarray(keys, dtype=np.int64))


def gt_arrays(gt: LVIS, image_ids: Sequence[int], *, slots: Mapping[int, int] | None = None) -> GtArrays:
    """Ground truth of ``image_ids`` from a loaded annotation file.

    ``slots``: annotation id -> column of the detections' ``mask_inter`` (the annotation's rank
    among its image's ground truth in the store); given, the ground-truth RLE areas are computed
    for mask evaluation, and every annotation of the images must have a slot.
    """
    ids = np.unique(np.asarray(list(image_ids), dtype=np.int64))
    cat_ids = np.asarray(sorted(gt.get_cat_ids()), dtype=np.int64)
    cat_index = {int(c): i for i, c in enumerate(cat_ids)}
    anns = [a for img in ids for a in gt.img_ann_map[int(img)]]
    image = np.repeat(np.arange(len(ids)), [len(gt.img_ann_map[int(img)]) for img in ids]).astype(np.int64)
    cats = gt.cats
    out = dict(
        image_ids=ids, cat_ids=cat_ids, image=image,
        cat=np.asarray([cat_index[a["category_id"]] for a in anns], dtype=np.int64),
        area=np.asarray([a["area"] for a in anns], dtype=np.float64),
        ignore=np.asarray([bool(a.get("ignore", 0)) for a in anns], dtype=bool),
        bbox=np.asarray([a["bbox"] for a in anns], dtype=np.float64).reshape(-1, 4),
        neg=_keys(gt, ids, cat_index, "neg_category_ids"),
        not_exhaustive=_keys(gt, ids, cat_index, "not_exhaustive_category_ids"),
        frequency=tuple(cats[int(c)]["frequency"] for c in cat_ids),
        instance_count=np.asarray([cats[int(c)]["instance_count"] for c in cat_ids], dtype=np.int64),
    )
    if slots is not None:
        missing = [a["id"] for a in anns if a["id"] not in slots]
        if missing:
            raise OverlapsUnavailable(f"{len(missing)} annotations (e.g. id {missing[0]}) have no mask overlaps in the store")
        out["slot"] = np.asarray([slots[a["id"]] for a in anns], dtype=np.int64)
        out["mask_area"] = np.asarray([int(mask_utils.area(gt.ann_to_rle(a))) for a in anns], dtype=np.int64)
    return GtArrays(**out)


def gt_arrays_from_store(record: EvalGroundTruth, *, position_ids: np.ndarray, category_ids: Sequence[int],
                         image_ids: Sequence[int], slots: Mapping[int, int] | None = None) -> GtArrays:
    """:func:`gt_arrays` from the ground truth the store keeps (:mod:`cache_schema.eval_gt`)
    instead of the json: the same arrays, in LVIS's order (image id, then json order).

    ``position_ids``: int64 ``[S]`` json id of every split position; ``category_ids``: the json's
    category ids ascending (the store's class table)."""
    ids = np.unique(np.asarray(list(image_ids), dtype=np.int64))
    position_ids = np.asarray(position_ids, dtype=np.int64)
    index_of_id = {int(i): k for k, i in enumerate(ids)}
    img_of_ann = position_ids[record.position]
    keep = np.flatnonzero(np.isin(img_of_ann, ids))
    keep = keep[np.argsort(img_of_ann[keep], kind="stable")]  # by image id; json order within
    k = len(category_ids)

    def keys(pairs: np.ndarray) -> np.ndarray:
        img = position_ids[pairs[:, 0]]
        ok = np.isin(img, ids)
        return np.unique(np.asarray([index_of_id[int(i)] for i in img[ok]], dtype=np.int64) * k + pairs[ok, 1])

    out = dict(
        image_ids=ids, cat_ids=np.asarray(category_ids, dtype=np.int64),
        image=np.asarray([index_of_id[int(i)] for i in img_of_ann[keep]], dtype=np.int64),
        cat=record.cat[keep].astype(np.int64), area=record.area[keep].astype(np.float64),
        ignore=record.ignore[keep].astype(bool), bbox=record.bbox[keep].astype(np.float64).reshape(-1, 4),
        neg=keys(record.neg), not_exhaustive=keys(record.not_exhaustive),
        frequency=tuple(("r", "c", "f")[int(v)] for v in record.frequency),
        instance_count=record.instance_count.astype(np.int64),
    )
    if slots is not None:
        ann_ids = record.ann_id[keep]
        missing = [int(a) for a in ann_ids if int(a) not in slots]
        if missing:
            raise OverlapsUnavailable(f"{len(missing)} annotations (e.g. id {missing[0]}) have no mask overlaps in the store")
        out["slot"] = np.asarray([slots[int(a)] for a in ann_ids], dtype=np.int64)
        out["mask_area"] = record.mask_area[keep].astype(np.int64)
    return GtArrays(**out)


def store_slots(gt_image: np.ndarray, gt_ann_id: np.ndarray) -> dict[int, int]:
    """annotation id -> its rank among its image's rows of the store's GT table (the column of
    ``rois/mask_inter`` extraction wrote for it)."""
    order = np.argsort(gt_image, kind="stable")
    img = gt_image[order]
    rank = np.arange(len(order)) - np.searchsorted(img, img, side="left")
    return {int(a): int(r) for a, r in zip(gt_ann_id[order], rank)}


def det_arrays(
    *,
    dets: Sequence[Detections],
    image_ids: Sequence[int],
    category_ids: Sequence[int],
    row_offsets: Sequence[int],
    mask_area: torch.Tensor | None = None,
    mask_inter: torch.Tensor | None = None,
) -> DetArrays:
    """Detections of several images as :class:`DetArrays` (results order: image by image).

    Args:
        dets: one image's :class:`Detections` per entry (``roi_index`` relative to the image).
        image_ids: json id of each entry's image; category_ids: json id of each class.
        row_offsets: first row of each image in ``mask_area`` / ``mask_inter``.
        mask_area, mask_inter: the RoIs' mask overlaps (``RoiSet.mask_area`` / ``.mask_inter``).
    """
    cats = np.asarray(category_ids, dtype=np.int64)
    counts = [len(d) for d in dets]
    if not dets or sum(counts) == 0:
        width = 0 if mask_inter is None else int(mask_inter.shape[1])
        return DetArrays(image=np.zeros(0, np.int64), cat=np.zeros(0, np.int64), score=np.zeros(0),
                         bbox=np.zeros((0, 4)), mask_area=None if mask_area is None else np.zeros(0, np.int64),
                         mask_inter=None if mask_inter is None else np.zeros((0, width), np.int32))
    xyxy = torch.cat([d.boxes for d in dets]).double().numpy()
    bbox = np.concatenate([xyxy[:, :2], xyxy[:, 2:] - xyxy[:, :2]], axis=1)  # as to_results writes it
    rows = torch.cat([d.roi_index + int(off) for d, off in zip(dets, row_offsets)])
    out = DetArrays(
        image=np.repeat(np.asarray(image_ids, dtype=np.int64), counts),
        cat=cats[torch.cat([d.labels for d in dets]).numpy()],
        score=torch.cat([d.scores for d in dets]).double().numpy(),
        bbox=bbox,
        mask_area=None if mask_area is None else mask_area[rows].numpy().astype(np.int64),
        mask_inter=None if mask_inter is None else mask_inter[rows].numpy(),
    )
    return out


def evaluate_fast(
    *,
    gt: GtArrays,
    dets: DetArrays,
    iou_types: Sequence[str] = ("segm", "bbox"),
    bins: BinSpec | None = None,
    max_dets: int = 300,
    notes: Sequence[str] = (),
) -> Metrics:
    """:class:`Metrics` equal to the official LVIS API's for the same detections (see
    :mod:`heads.evaluation.fast_lvis`); ``segm`` needs the mask overlaps on both sides."""
    bins = bins or BinSpec()
    bad = [t for t in iou_types if t not in ("segm", "bbox")]
    if bad or not iou_types:
        raise ConfigError(f"iou_types {list(iou_types)} invalid; use a subset of ['segm', 'bbox']")
    out: dict[str, IouMetrics] = {}
    for iou_type in iou_types:
        ev = evaluate_arrays(gt=gt, dets=dets, iou_type=iou_type, max_dets=max_dets)
        out[iou_type] = summarize_precision(
            ev.precision, iou_thrs=ev.params.iou_thrs, area_labels=ev.params.area_rng_lbl,
            cat_ids=[int(c) for c in gt.cat_ids], frequency=gt.frequency, instance_count=gt.instance_count,
            bins=bins, num_detections=ev.num_detections,
        )
    extra = () if len(dets) else ("no detections: every category with ground truth scores AP 0",)
    return Metrics(segm=out.get("segm"), bbox=out.get("bbox"), bins=bins, num_images=len(gt.image_ids),
                   max_dets=max_dets, notes=tuple(notes) + extra)

"""LVIS evaluation with the official ``lvis`` API (``LVIS``, ``LVISResults``, ``LVISEval``).

Score threshold 0.0 (nothing is filtered here), at most ``max_dets`` (300) detections per image.
AP1..AP4 are computed from LVISEval's precision array exactly as it computes APr/APc/APf: the mean
of all precision entries > -1 over the categories of the bin (area range "all").
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from lvis import LVIS, LVISEval

from cache_schema.errors import ConfigError, DatasetError
from heads.evaluation.compat import IOU_TYPES, make_results, patch_lvis_numpy, quiet_lvis
from heads.evaluation.metrics import (
    SUMMARY_KEYS,
    BinSpec,
    IouMetrics,
    Metrics,
    format_table,
    read_metrics,
    write_metrics,
    write_results,
)

__all__ = ["BinSpec", "Metrics", "evaluate_lvis", "format_table", "load_gt", "read_metrics", "write_metrics", "write_results"]

RESULT_KEYS = ("image_id", "category_id", "score")


def load_gt(gt_json: str | os.PathLike[str]) -> LVIS:
    """Load and check an LVIS-format annotation file (the fields LVISEval and the bins need)."""
    path = Path(gt_json)
    if not path.is_file():
        raise DatasetError(f"annotation file {path} not found; pass the split's LVIS json (e.g. DIR/val.json)")
    try:
        with quiet_lvis():
            gt = LVIS(str(path))
    except (ValueError, KeyError, AssertionError) as e:
        raise DatasetError(f"annotation file {path} is not LVIS json ({type(e).__name__}: {e}); regenerate it") from None
    for key in ("frequency", "instance_count"):
        bad = [c["id"] for c in gt.dataset["categories"] if key not in c]
        if bad:
            raise DatasetError(f"{path}: categories {bad[:5]} lack '{key}'; LVIS v1 categories need it")
    for key in ("neg_category_ids", "not_exhaustive_category_ids"):
        bad = [im["id"] for im in gt.dataset["images"] if key not in im]
        if bad:
            raise DatasetError(f"{path}: images {bad[:5]} lack '{key}'; LVIS v1 images need it (may be [])")
    return gt


def _load_results(results: list[dict] | str | os.PathLike[str]) -> list[dict]:
    if isinstance(results, list):
        return results
    path = Path(results)
    try:
        with path.open(encoding="utf-8") as f:
            loaded = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise DatasetError(f"cannot read results {path} ({e}); write it with write_results()") from None
    if not isinstance(loaded, list):
        raise DatasetError(f"results {path} is not a json list of detections; write it with write_results()")
    return loaded


def _check_results(gt: LVIS, results: list[dict]) -> None:
    img_ids, cat_ids = set(gt.imgs), set(gt.cats)
    for r in results:
        if not isinstance(r, dict) or any(k not in r for k in RESULT_KEYS) or not ("bbox" in r or "segmentation" in r):
            raise DatasetError(
                f"result {str(r)[:80]} lacks image_id/category_id/score/bbox|segmentation; use LVIS results format"
            )
        if r["image_id"] not in img_ids:
            raise DatasetError(
                f"result for image_id {r['image_id']} which is not in the annotation file; evaluate against the right split"
            )
        if r["category_id"] not in cat_ids:
            raise DatasetError(
                f"result with category_id {r['category_id']} not in the annotation file; map contiguous labels to json ids"
            )


def _per_category(ev: LVISEval) -> np.ndarray:
    """float64 ``[K]``: AP of each of ``ev.params.cat_ids`` (area "all"), ``-1`` without gt."""
    prec = ev.eval["precision"][:, :, :, 0]  # [iou thresholds, recall thresholds, K]
    valid = prec > -1
    total = np.where(valid, prec, 0.0).sum(axis=(0, 1))
    n = valid.sum(axis=(0, 1))
    return np.where(n > 0, total / np.maximum(n, 1), -1.0)


def _group_ap(ev: LVISEval, members: np.ndarray) -> float:
    """LVISEval._summarize('ap', freq_group_idx=...) for an arbitrary category subset."""
    s = ev.eval["precision"][:, :, members, 0]
    return float(np.mean(s[s > -1])) if np.any(s > -1) else -1.0


def _summarize(ev: LVISEval, gt: LVIS, bins: BinSpec, num_detections: int) -> IouMetrics:
    summary = {k: float(ev.results[k]) for k in SUMMARY_KEYS}
    cat_ids = list(ev.params.cat_ids)
    counts = np.array([gt.cats[c]["instance_count"] for c in cat_ids], dtype=np.int64)
    which = bins.assign(counts)
    for i, name in enumerate(bins.names):
        summary[name] = _group_ap(ev, np.flatnonzero(which == i))
    per_cat = _per_category(ev)
    return IouMetrics(
        summary=summary,
        per_category={int(c): float(a) for c, a in zip(cat_ids, per_cat)},
        num_detections=num_detections,
    )


def _run_one(
    gt: LVIS, results: list[dict], *, iou_type: str, bins: BinSpec, max_dets: int, image_ids: list[int]
) -> IouMetrics:
    dt = make_results(gt, results, iou_type=iou_type, max_dets=max_dets)
    with quiet_lvis():
        ev = LVISEval(gt, dt, iou_type=iou_type)
        ev.params.max_dets = max_dets
        ev.params.img_ids = image_ids
        ev.run()
    wanted = set(image_ids)
    num = sum(1 for a in dt.anns.values() if a["image_id"] in wanted)
    return _summarize(ev, gt, bins, num)


def evaluate_lvis(
    *,
    gt_json: str | os.PathLike[str] | LVIS,
    results: list[dict] | str | os.PathLike[str],
    iou_types: Sequence[str] = ("segm", "bbox"),
    bins: BinSpec | None = None,
    max_dets: int = 300,
    image_ids: Sequence[int] | None = None,
) -> Metrics:
    """Evaluate LVIS-format ``results`` against ``gt_json`` with the official LVIS API.

    Args:
        gt_json: annotation file (or an already loaded :class:`lvis.LVIS`, to reuse across calls;
            mask evaluation converts its polygons to RLE in place, which is harmless).
        results: list of ``{image_id, category_id, score, bbox (xywh), segmentation (RLE)}`` or a
            json file of it; not filtered by score (threshold 0.0).
        iou_types: subset of ``("segm", "bbox")``; ``segm`` is skipped with a note when the
            results carry no masks.
        bins: AP bins by the categories' ``instance_count`` (training counts); default LVIS bins.
        max_dets: detections kept per image (highest scores), 300 for LVIS.
        image_ids: evaluate only these images (default: every image of ``gt_json``).
    Returns:
        :class:`Metrics`; with no results every category with ground truth scores 0 (and a note).
    """
    patch_lvis_numpy()
    bins = bins or BinSpec()
    bad = [t for t in iou_types if t not in IOU_TYPES]
    if bad or not iou_types:
        raise ConfigError(f"iou_types {list(iou_types)} invalid; use a subset of {list(IOU_TYPES)}")
    if max_dets <= 0:
        raise ConfigError(f"max_dets={max_dets} must be > 0; LVIS uses 300")
    gt = gt_json if isinstance(gt_json, LVIS) else load_gt(gt_json)
    results = _load_results(results)
    _check_results(gt, results)
    if image_ids is None:
        ids = sorted(int(i) for i in gt.imgs)
    else:
        ids = sorted({int(i) for i in image_ids})
        missing = [i for i in ids if i not in gt.imgs]
        if missing:
            raise DatasetError(f"image ids {missing[:5]} are not in the annotation file; evaluate against the right split")
    notes: list[str] = []
    if not results:
        notes.append("no detections: every category with ground truth scores AP 0")
    per_type: dict[str, IouMetrics | None] = {"segm": None, "bbox": None}
    for iou_type in iou_types:
        key = "segmentation" if iou_type == "segm" else "bbox"
        have = sum(1 for r in results if key in r)
        if have != len(results):
            if have == 0:
                notes.append(f"{iou_type} not evaluated: the results carry no '{key}'")
                continue
            raise DatasetError(f"{len(results) - have} of {len(results)} results lack '{key}'; give it for all or none")
        per_type[iou_type] = _run_one(gt, results, iou_type=iou_type, bins=bins, max_dets=max_dets, image_ids=ids)
    if per_type["segm"] is None and per_type["bbox"] is None:
        raise DatasetError("the results have no masks, so segm cannot be evaluated; add 'bbox' to iou_types")
    return Metrics(
        segm=per_type["segm"], bbox=per_type["bbox"], bins=bins, num_images=len(ids), max_dets=max_dets, notes=tuple(notes)
    )

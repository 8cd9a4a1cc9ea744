"""LVIS evaluation with the official ``lvis`` API (``LVIS``, ``LVISResults``, ``LVISEval``).

Score threshold 0.0 (nothing is filtered here), at most ``max_dets`` (300) detections per image.
AP1..AP4 are computed from LVISEval's precision array exactly as it computes APr/APc/APf: the mean
of all precision entries > -1 over the categories of the bin (area range "all").
"""

from __future__ import annotations

import json
import multiprocessing
import os
from collections.abc import Mapping, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from pathlib import Path

from lvis import LVIS, LVISEval

from cache_schema.errors import ConfigError, DatasetError
from cache_schema.runtime import available_cores
from heads.evaluation.compat import IOU_TYPES, fields_for, make_results, result_key, patch_lvis_numpy, quiet_lvis
from heads.evaluation.metrics import (
    BinSpec,
    IouMetrics,
    Metrics,
    format_table,
    read_metrics,
    summarize_precision,
    write_metrics,
    write_results,
)

__all__ = ["BinSpec", "Metrics", "evaluate_lvis", "LvisEvaluator", "evaluate_lvis_many", "format_table", "load_gt", "read_metrics", "write_metrics", "write_results"]

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


def _summarize(ev: LVISEval, gt: LVIS, bins: BinSpec, num_detections: int) -> IouMetrics:
    cat_ids = list(ev.params.cat_ids)
    return summarize_precision(
        ev.eval["precision"], iou_thrs=ev.params.iou_thrs, area_labels=ev.params.area_rng_lbl, cat_ids=cat_ids,
        frequency=[gt.cats[c]["frequency"] for c in cat_ids],
        instance_count=[gt.cats[c]["instance_count"] for c in cat_ids], bins=bins, num_detections=num_detections,
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


# --------------------------------------------------------------------------- worker processes
_WORKER_GT: LVIS | None = None


def _init_worker(gt: LVIS) -> None:
    global _WORKER_GT
    patch_lvis_numpy()
    _WORKER_GT = gt


def _run_in_worker(results: list[dict], iou_type: str, bins: BinSpec, max_dets: int, image_ids: list[int]) -> IouMetrics:
    assert _WORKER_GT is not None, "worker not initialised"
    return _run_one(_WORKER_GT, results, iou_type=iou_type, bins=bins, max_dets=max_dets, image_ids=image_ids)


def _jobs_of(results: list[dict], iou_types: Sequence[str], notes: list[str]) -> list[str]:
    """The IoU types ``results`` can be evaluated for (a note for each skipped one)."""
    jobs = []
    for iou_type in iou_types:
        key = result_key(iou_type)
        have = sum(1 for r in results if key in r)
        if have != len(results):
            if have == 0:
                notes.append(f"{iou_type} not evaluated: the results carry no '{key}'")
                continue
            raise DatasetError(f"{len(results) - have} of {len(results)} results lack '{key}'; give it for all or none")
        jobs.append(iou_type)
    if not jobs:
        raise DatasetError("the results have no masks, so segm cannot be evaluated; add 'bbox' to iou_types")
    return jobs


class LvisEvaluator:
    """Official LVIS evaluation of several named result sets against one ground truth, run
    while the caller produces the next set.

    Each (result set, IoU type) is one independent ``LVISEval`` run. With ``workers > 1`` the
    runs go to that many spawned processes as soon as :meth:`submit` gets a set, so the caller
    can assemble the next rule's detections meanwhile; the numbers are exactly those of running
    them one after another. Why processes: LVISEval is single-threaded pure Python (its
    per-(image, class) matching dominates). Spawned, not forked: the parent holds torch's
    thread pools. Use as a context manager; :meth:`gather` returns ``{name: Metrics}``.
    """

    def __init__(self, *, gt_json: str | os.PathLike[str] | LVIS, iou_types: Sequence[str] = ("segm", "bbox"),
                 bins: BinSpec | None = None, max_dets: int = 300, image_ids: Sequence[int] | None = None,
                 workers: int | None = None) -> None:
        patch_lvis_numpy()
        bad = [t for t in iou_types if t not in IOU_TYPES]
        if bad or not iou_types:
            raise ConfigError(f"iou_types {list(iou_types)} invalid; use a subset of {list(IOU_TYPES)}")
        if max_dets <= 0:
            raise ConfigError(f"max_dets={max_dets} must be > 0; LVIS uses 300")
        self.gt = gt_json if isinstance(gt_json, LVIS) else load_gt(gt_json)
        self.iou_types, self.bins, self.max_dets = tuple(iou_types), bins or BinSpec(), max_dets
        if image_ids is None:
            self.ids = sorted(int(i) for i in self.gt.imgs)
        else:
            self.ids = sorted({int(i) for i in image_ids})
            missing = [i for i in self.ids if i not in self.gt.imgs]
            if missing:
                raise DatasetError(f"image ids {missing[:5]} are not in the annotation file; evaluate against the right split")
        self.workers = max(1, available_cores() if workers is None else workers)
        self._pool: ProcessPoolExecutor | None = None
        self._runs: dict[str, dict[str, Future | IouMetrics]] = {}
        self._notes: dict[str, list[str]] = {}

    def __enter__(self) -> "LvisEvaluator":
        return self

    def __exit__(self, *exc) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=exc[0] is None, cancel_futures=exc[0] is not None)
            self._pool = None

    def _executor(self) -> ProcessPoolExecutor:
        if self._pool is None:
            ctx = multiprocessing.get_context("spawn")
            self._pool = ProcessPoolExecutor(max_workers=self.workers, mp_context=ctx, initializer=_init_worker,
                                             initargs=(self.gt,))
        return self._pool

    def submit(self, name: str, results: list[dict] | str | os.PathLike[str]) -> None:
        """Validate ``results`` (LVIS results format) and start evaluating them as ``name``."""
        if name in self._runs:
            raise ConfigError(f"result set {name!r} submitted twice; give each one its own name")
        res = _load_results(results)
        _check_results(self.gt, res)
        notes = self._notes[name] = [] if res else ["no detections: every category with ground truth scores AP 0"]
        runs = self._runs[name] = {}
        # segm first: it costs several times bbox, so the pool finishes its jobs together.
        for iou_type in _jobs_of(res, self.iou_types, notes):
            if self.workers == 1:
                runs[iou_type] = _run_one(self.gt, res, iou_type=iou_type, bins=self.bins, max_dets=self.max_dets,
                                          image_ids=self.ids)
            else:  # send only the fields this IoU type reads: pickling is the pool's main overhead
                runs[iou_type] = self._executor().submit(
                    _run_in_worker, [fields_for(r, iou_type) for r in res], iou_type, self.bins, self.max_dets, self.ids)

    def gather(self) -> dict[str, Metrics]:
        """Wait for every submitted set; ``{name: Metrics}`` in submission order."""
        out = {}
        for name, runs in self._runs.items():
            done = {t: (r.result() if isinstance(r, Future) else r) for t, r in runs.items()}
            out[name] = Metrics(segm=done.get("segm"), bbox=done.get("bbox"), bins=self.bins, num_images=len(self.ids),
                                max_dets=self.max_dets, notes=tuple(self._notes[name]))
        return out


def evaluate_lvis_many(
    *,
    gt_json: str | os.PathLike[str] | LVIS,
    results: Mapping[str, list[dict] | str | os.PathLike[str]],
    iou_types: Sequence[str] = ("segm", "bbox"),
    bins: BinSpec | None = None,
    max_dets: int = 300,
    image_ids: Sequence[int] | None = None,
    workers: int | None = None,
) -> dict[str, Metrics]:
    """:func:`evaluate_lvis` of several named result sets, spread over ``workers`` processes
    (default: the cores available); see :class:`LvisEvaluator`."""
    with LvisEvaluator(gt_json=gt_json, iou_types=iou_types, bins=bins, max_dets=max_dets, image_ids=image_ids,
                       workers=workers) as ev:
        for name, res in results.items():
            ev.submit(name, res)
        return ev.gather()


def evaluate_lvis(
    *,
    gt_json: str | os.PathLike[str] | LVIS,
    results: list[dict] | str | os.PathLike[str],
    iou_types: Sequence[str] = ("segm", "bbox"),
    bins: BinSpec | None = None,
    max_dets: int = 300,
    image_ids: Sequence[int] | None = None,
    workers: int = 1,
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
        workers: processes for the IoU types (1: in this process).
    Returns:
        :class:`Metrics`; with no results every category with ground truth scores 0 (and a note).
    """
    return evaluate_lvis_many(gt_json=gt_json, results={"": results}, iou_types=iou_types, bins=bins,
                              max_dets=max_dets, image_ids=image_ids, workers=workers)[""]

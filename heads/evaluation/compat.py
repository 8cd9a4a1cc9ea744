"""Everything needed to run the official ``lvis`` 0.5.3 API with numpy 2 and pycocotools 2.0.x.

What breaks, and where it is handled (all in this file):

1. ``LVISEval.accumulate`` calls ``.astype(dtype=np.float)``; the ``np.float`` alias was removed
   in numpy 1.24 -> :func:`patch_lvis_numpy` restores the alias (only if missing).
2. ``LVISResults`` reads ``results[0]`` and fails with ``IndexError`` on an empty list ->
   :func:`make_results` builds an empty results set by hand so ``LVISEval`` still runs and
   scores every category that has ground truth as 0.
3. ``LVISResults`` takes the *box* area as a detection's area whenever a result has a ``bbox``,
   even for mask evaluation, which changes the small/medium/large split of mask AP ->
   :func:`make_results` keeps only the fields the IoU type needs (``segmentation`` for segm,
   ``bbox`` for bbox), so mask results get their mask area.
4. ``LVISResults`` and ``LVISEval`` call the deprecated ``Logger.warn`` and log at INFO ->
   :func:`quiet_lvis` silences both while they run.

Checked and fine with numpy 2.4 / pycocotools 2.0.11: RLE ``counts`` given as ``str``
(pycocotools encodes it), ``np.where(iou == iou_thrs)`` for 0.5/0.75 (exact linspace values),
numpy-integer image ids as dict keys.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator
from copy import deepcopy

import numpy as np
from lvis import LVIS, LVISResults

IOU_TYPES = ("segm", "bbox")


def patch_lvis_numpy() -> None:
    """Restore ``np.float`` (= builtin ``float``) for ``lvis`` 0.5.3; idempotent.

    Why: lvis' ``accumulate`` uses ``np.float``, an alias of ``float`` that numpy removed;
    setting it only when missing never shadows a real numpy attribute.
    """
    if "float" not in np.__dict__:
        np.float = float  # type: ignore[attr-defined]


@contextlib.contextmanager
def quiet_lvis() -> Iterator[None]:
    """Silence lvis' logging (INFO chatter, and the "Assuming user provided the results in correct
    format" warning it logs for every in-memory results list) and its deprecated ``Logger.warn``."""
    logger = logging.getLogger("lvis")
    previous = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            yield
    finally:
        logger.setLevel(previous)


def result_key(iou_type: str) -> str:
    """The results field an IoU type evaluates: ``segmentation`` for segm, ``bbox`` for bbox."""
    return "segmentation" if iou_type == "segm" else "bbox"


def fields_for(result: dict, iou_type: str) -> dict:
    """A fresh dict holding only what ``iou_type`` evaluation needs (callers' dicts stay intact,
    since LVISResults writes ``area``/``id`` into the dicts it gets)."""
    key = result_key(iou_type)
    return {"image_id": result["image_id"], "category_id": result["category_id"], key: result[key], "score": result["score"]}


def make_results(gt: LVIS, results: list[dict], *, iou_type: str, max_dets: int) -> LVISResults:
    """``LVISResults`` for ``iou_type`` from LVIS-format result dicts (may be empty).

    Keeps at most ``max_dets`` highest-scoring results per image (LVISResults' own rule).
    """
    # LVISResults deep-copies the whole gt dataset and then replaces its annotations; handing it
    # a shell without annotations gives the same object without copying every gt polygon.
    shell = LVIS.__new__(LVIS)
    shell.dataset = {key: value for key, value in gt.dataset.items() if key != "annotations"}
    shell.dataset["annotations"] = []
    with quiet_lvis():
        if results:
            return LVISResults(shell, [fields_for(r, iou_type) for r in results], max_dets=max_dets)
        # LVISResults cannot take [], so build the same object state by hand: gt images and
        # categories, no annotations.
        empty = LVISResults.__new__(LVISResults)
        empty.logger = logging.getLogger("lvis.results")
        empty.dataset = deepcopy(shell.dataset)
        empty._create_index()
        return empty

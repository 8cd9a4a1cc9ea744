"""Label RoIs by IoU matching against an image's ground truth (DESIGN.md §2)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torchvision.ops import box_iou


@dataclass(frozen=True, kw_only=True)
class Matches:
    """Per-RoI matching result.

    Attributes:
        labels: int32 ``[R]``, class ``0..C-1`` of the best GT when IoU >= ``fg_iou``, else ``C``.
        ious: float32 ``[R]``, IoU with the best-overlapping GT (0 when the image has none).
        gt_index: int32 ``[R]``, row of that GT in the split's GT table, ``-1`` when none overlaps.
    """

    labels: np.ndarray
    ious: np.ndarray
    gt_index: np.ndarray


def match_rois(*, rois: np.ndarray, gt_boxes: np.ndarray, gt_labels: np.ndarray,
               gt_rows: np.ndarray, num_classes: int, fg_iou: float) -> Matches:
    """Match ``rois`` float32 ``[R,4]`` (xyxy px) to ``gt_boxes`` float32 ``[G,4]``.

    ``gt_labels`` int ``[G]`` are contiguous classes, ``gt_rows`` int ``[G]`` the GT rows in the
    split's GT table. Ties go to the lower GT row (``argmax`` takes the first maximum), so the
    result does not depend on anything but the inputs.
    """
    r = rois.shape[0]
    labels = np.full(r, num_classes, dtype=np.int32)
    ious = np.zeros(r, dtype=np.float32)
    gt_index = np.full(r, -1, dtype=np.int32)
    if r == 0 or gt_boxes.shape[0] == 0:
        return Matches(labels=labels, ious=ious, gt_index=gt_index)
    iou = box_iou(torch.from_numpy(rois).float(), torch.from_numpy(gt_boxes).float()).numpy()
    best = iou.argmax(axis=1)
    ious[:] = iou[np.arange(r), best]
    overlapping = ious > 0
    gt_index[overlapping] = np.asarray(gt_rows, dtype=np.int32)[best[overlapping]]
    fg = ious >= fg_iou
    labels[fg] = np.asarray(gt_labels, dtype=np.int32)[best[fg]]
    return Matches(labels=labels, ious=ious, gt_index=gt_index)


def keep_rows(labels: np.ndarray, *, num_classes: int, background: int | None, seed: int, image: int) -> np.ndarray:
    """Rows of one image's RoIs to store: every foreground RoI (``labels < num_classes``) and
    ``background`` of its background RoIs, drawn without replacement by
    ``numpy.random.default_rng((seed, image))`` (so the draw depends on the image alone, not on
    shards, batches or resumes); all of them when ``background`` is ``None`` or at least their
    count. int64 ``[n]``, ascending (the RoIs keep their order)."""
    labels = np.asarray(labels)
    bg = np.flatnonzero(labels >= num_classes)
    if background is None or len(bg) <= background:
        return np.arange(len(labels), dtype=np.int64)
    # Why subsample at all: calibration keeps every foreground RoI but draws background only to
    # match the positives (SimCal's 1:1), so most background rows would never be read.
    drawn = np.random.default_rng((int(seed), int(image))).choice(bg, size=int(background), replace=False)
    return np.sort(np.concatenate([np.flatnonzero(labels < num_classes), drawn])).astype(np.int64)


def stored_rows(labels: np.ndarray, *, num_classes: int, background: int | None, seed: int, image: int,
                sort_by_label: bool) -> np.ndarray:
    """Indices (int64) of an image's RoIs as the store holds them: the rows :func:`keep_rows` keeps
    (``background=None``: all), in label order when the split keeps that order (stable: ties keep
    the detector's order). One function for the writer and for whoever recomputes the RoIs
    (online calibration), so both agree row for row."""
    keep = np.arange(len(labels), dtype=np.int64) if background is None else keep_rows(
        labels, num_classes=num_classes, background=background, seed=seed, image=image)
    if sort_by_label:
        keep = keep[np.argsort(np.asarray(labels)[keep], kind="stable")]
    return keep

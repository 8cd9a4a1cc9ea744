"""Mask overlaps of the val RoIs: what fast cached mask evaluation reads (docs/cache.md).

Extraction writes them with every image; :func:`add_mask_overlaps` adds them to a store made
before they existed, from its stored mask logits and the annotation file it was built from (no
detector, no images). Crash-safe: the arrays are written first and the split's
``mask_overlaps`` attribute, which makes readers use them, last; a rerun starts over.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pycocotools.mask as mask_utils
import torch
from torchvision.ops import boxes as box_ops

from cache_schema import open_store
from cache_schema.errors import DatasetError, SchemaError
from cache_schema.eval_gt import EvalGroundTruth
from cache_schema.layout import MASK_DTYPE, split_layout
from cache_schema.masks import gt_rle, mask_overlaps
from cache_schema.inputs import resolve_annotation
from cache_schema.store import create_array
from extract.datasets.lvis_json import AnnotationSet, load_annotations


def image_overlaps(*, anns: Sequence[dict], height: int, width: int, reg_boxes: np.ndarray, mask_logits: np.ndarray,
                   columns: int) -> tuple[np.ndarray, np.ndarray]:
    """(int32 ``[R]`` mask areas, int32 ``[R, columns]`` intersections with each of ``anns``).

    The masks are pasted from the logits rounded to the stored float16, on the regressed boxes
    ``[R, 4]`` clipped to the (height, width) image, exactly as cached evaluation pastes them, so
    IoUs from these counts equal those of the pasted masks' RLEs.
    """
    size = (int(height), int(width))
    rles = [gt_rle(a["segmentation"], height, width) for a in anns]
    boxes = box_ops.clip_boxes_to_image(torch.as_tensor(np.asarray(reg_boxes), dtype=torch.float32), size)
    logits = torch.from_numpy(np.asarray(mask_logits, dtype=MASK_DTYPE))
    area, inter = mask_overlaps(mask_logits=logits, boxes=boxes, image_size=size, gt_rles=rles)
    padded = np.zeros((len(area), columns), dtype=np.int32)
    padded[:, : inter.shape[1]] = inter
    return area, padded


@dataclass(frozen=True, kw_only=True)
class OverlapReport:
    store: str
    split: str
    images: int
    columns: int
    added: bool


def add_mask_overlaps(store_path: str | Path, *, split: str = "val", progress: bool = True) -> OverlapReport:
    """Compute and store ``rois/mask_area`` / ``rois/mask_inter`` of ``split`` (needs its mask logits)."""
    store = open_store(store_path, mode="r+")
    if split not in store.splits:
        raise SchemaError(f"store {store.path} has no split {split!r}")
    target = store.split(split)
    if target.mask_overlaps:
        return OverlapReport(store=store.path, split=split, images=0, columns=target.mask_overlaps, added=False)
    if not target.with_masks:
        raise SchemaError(f"split {split} of {store.path} stores no mask logits, so there are no masks to overlap")
    if not store.is_complete:
        raise SchemaError(f"store {store.path} is incomplete; finish the extraction (extract --resume) first")
    source = store.meta.dataset.splits[split]
    json_path = resolve_annotation(store, split)
    annset = load_annotations(json_path, Path(source.image_root))
    gt = target.gt()
    counts = np.bincount(gt.image, minlength=target.num_images) if len(gt) else np.zeros(target.num_images, np.int64)
    if any(len(a) != int(c) for a, c in zip(annset.annotations, counts)):
        raise DatasetError(f"{json_path}: the annotations per image differ from the store's ground truth; re-extract")
    if any("segmentation" not in a for anns in annset.annotations for a in anns):
        raise DatasetError(f"{json_path}: some annotations have no segmentation, so mask IoUs are undefined")
    columns = int(counts.max()) if len(counts) else 0
    if columns == 0:
        raise DatasetError(f"split {split} has no ground truth, so there is nothing to overlap")
    layout = split_layout(num_images=target.num_images, stride=target.stride, num_gt=target.num_gt,
                          num_classes=store.meta.num_classes, levels={}, with_masks=True, mask_size=target.mask_size,
                          image_block=int(target.group.attrs["image_block"]), mask_overlaps=columns)
    arrays = {p: create_array(target.group, layout[p], overwrite=True) for p in ("rois/mask_area", "rois/mask_inter")}
    k = target.stride
    for i in _track(range(target.num_images), progress, f"mask overlaps ({split})"):
        block = target.image_block(i, columns=("reg_boxes", "mask_logits"))
        im = annset.images[i]
        area, inter = image_overlaps(anns=annset.annotations[i], height=im.height, width=im.width,
                                     reg_boxes=block.reg_boxes.numpy(), mask_logits=block.mask_logits.numpy(),
                                     columns=columns)
        full_area = np.zeros(k, dtype=np.int32)
        full_inter = np.zeros((k, columns), dtype=np.int32)
        full_area[: len(area)], full_inter[: len(area)] = area, inter
        arrays["rois/mask_area"][i * k:(i + 1) * k] = full_area
        arrays["rois/mask_inter"][i * k:(i + 1) * k] = full_inter
    target.group.attrs["mask_overlaps"] = columns  # last: readers use the arrays from now on
    return OverlapReport(store=store.path, split=split, images=target.num_images, columns=columns, added=True)


def _track(items, progress: bool, label: str):
    if not progress:
        return items
    from rich.progress import track

    return track(items, description=label, transient=True)


def eval_ground_truth(annset: AnnotationSet) -> EvalGroundTruth | None:
    """What LVIS evaluation reads from ``annset``'s json, for the store (:mod:`cache_schema.eval_gt`);
    ``None`` when some annotation was not loaded (crowd or empty boxes: the store's ground truth
    would then differ from what LVISEval sees) or lacks a segmentation."""
    if annset.skipped_crowd or annset.skipped_degenerate:
        return None
    anns = [(p, a) for p, per_image in enumerate(annset.annotations) for a in per_image]
    if any(k not in a for _, a in anns for k in ("segmentation", "area", "id")):
        return None
    ims = annset.images

    def pairs(field: str) -> np.ndarray:
        out = [(p, annset.index_of[c]) for p, im in enumerate(ims) for c in getattr(im, field) if c in annset.index_of]
        return np.asarray(out, dtype=np.int64).reshape(-1, 2)

    frequency = {"r": 0, "c": 1, "f": 2}
    return EvalGroundTruth(
        position=np.asarray([p for p, _ in anns], dtype=np.int64),
        ann_id=np.asarray([int(a["id"]) for _, a in anns], dtype=np.int64),
        cat=np.asarray([annset.index_of[a["category_id"]] for _, a in anns], dtype=np.int64),
        area=np.asarray([float(a["area"]) for _, a in anns], dtype=np.float64),
        ignore=np.asarray([bool(a.get("ignore", 0)) for _, a in anns], dtype=bool),
        bbox=np.asarray([[float(v) for v in a["bbox"]] for _, a in anns], dtype=np.float64).reshape(-1, 4),
        mask_area=np.asarray([int(mask_utils.area(gt_rle(a["segmentation"], ims[p].height, ims[p].width)))
                              for p, a in anns], dtype=np.int64),
        neg=pairs("neg_category_ids"), not_exhaustive=pairs("not_exhaustive_category_ids"),
        frequency=np.asarray([frequency[c.get("frequency", "f")] for c in annset.categories], dtype=np.uint8),
        instance_count=np.asarray([int(c.get("instance_count", 0)) for c in annset.categories], dtype=np.int64),
    )

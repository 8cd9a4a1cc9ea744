"""What LVIS evaluation needs of a split's annotation file, kept inside the store.

With it (group ``eval_gt/`` of a split, written at extraction next to the mask overlaps), cached
evaluation runs with LVISEval's rules on arrays without the json: on another machine, after the
json moved, or where only the store was copied. Every field is the json's own value (float64
boxes and areas as written there), so evaluation from it equals evaluation from the json.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np

from cache_schema.errors import SchemaError

GROUP = "eval_gt"
FREQUENCIES = ("r", "c", "f")


@dataclass(frozen=True, kw_only=True)
class EvalGroundTruth:
    """Every annotation of a split's images, in json order within each image.

    Attributes:
        position: int64 ``[G]`` split position of the annotation's image.
        ann_id: int64 ``[G]`` json annotation id.
        cat: int64 ``[G]`` contiguous class ``0..C-1``.
        area: float64 ``[G]`` json ``area``; ignore: bool ``[G]`` json ``ignore`` flag.
        bbox: float64 ``[G, 4]`` json ``bbox`` (x, y, w, h).
        mask_area: int64 ``[G]`` pixels of the annotation's mask RLE (as ``LVIS.ann_to_rle``).
        neg, not_exhaustive: int64 ``[P, 2]`` (split position, class) pairs of the images'
            ``neg_category_ids`` / ``not_exhaustive_category_ids``.
        frequency: uint8 ``[C]`` index into ``r, c, f`` of the json categories' ``frequency``;
        instance_count: int64 ``[C]`` the json categories' ``instance_count``.
    """

    position: np.ndarray
    ann_id: np.ndarray
    cat: np.ndarray
    area: np.ndarray
    ignore: np.ndarray
    bbox: np.ndarray
    mask_area: np.ndarray
    neg: np.ndarray
    not_exhaustive: np.ndarray
    frequency: np.ndarray
    instance_count: np.ndarray

    def __post_init__(self) -> None:
        g = len(self.position)
        for name in ("ann_id", "cat", "area", "ignore", "mask_area"):
            if len(getattr(self, name)) != g:
                raise SchemaError(f"eval_gt: {name} has {len(getattr(self, name))} rows, position {g}")
        if self.bbox.shape != (g, 4):
            raise SchemaError(f"eval_gt: bbox has shape {self.bbox.shape}, expected ({g}, 4)")
        for name in ("neg", "not_exhaustive"):
            if getattr(self, name).ndim != 2 or getattr(self, name).shape[1] != 2:
                raise SchemaError(f"eval_gt: {name} must be [P, 2] (position, class) pairs")
        if self.frequency.shape != self.instance_count.shape:
            raise SchemaError("eval_gt: frequency and instance_count differ in length")


def write_eval_gt(split_group, record: EvalGroundTruth) -> None:
    """Write ``record`` into a split's zarr group (one chunk per array; written once)."""
    group = split_group.require_group(GROUP)
    for f in fields(record):
        value = np.ascontiguousarray(getattr(record, f.name))
        chunks = tuple(max(1, s) for s in value.shape)
        arr = group.create_array(name=f.name, shape=value.shape, chunks=chunks, dtype=value.dtype, overwrite=True)
        if value.size:
            arr[...] = value
    group.attrs["complete"] = True  # last: a partly written group is never read


def read_eval_gt(split_group) -> EvalGroundTruth | None:
    """The split's stored evaluation ground truth, or ``None`` when the store has none."""
    try:
        group = split_group[GROUP]
    except (KeyError, FileNotFoundError):
        return None
    if not group.attrs.get("complete", False):
        return None
    try:
        return EvalGroundTruth(**{f.name: np.asarray(group[f.name][...]) for f in fields(EvalGroundTruth)})
    except SchemaError:
        raise
    except Exception as exc:  # noqa: BLE001 - a missing or undecodable chunk is damage
        raise SchemaError(f"the store's {GROUP}/ group is damaged ({type(exc).__name__}); evaluate with the "
                          "annotation file (--annotations val=PATH) or re-extract") from None

"""Typed metadata of a store: what built it (detector, dataset, settings) and what a split holds.

Every record is a frozen, keyword-only dataclass validated on construction, with ``to_dict`` /
``from_dict`` to and from plain JSON-able dicts (the store keeps ``StoreMeta.to_dict()`` in the
root group's ``"roicache"`` attribute).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata as _pkg_metadata
from typing import Any

import numpy as np

from cache_schema.errors import SchemaError
from cache_schema.postprocess import Postprocess

SCHEMA_VERSION = 2
"""Version of the on-disk layout this code writes (docs/cache.md)."""
READABLE_VERSIONS = (1, 2)
"""Versions this code reads (``roicache cache migrate`` converts version 1)."""
ROW_ORDERS = ("proposal", "label")
"""An image's RoI order: the detector's, or stably by matched label (schema 2 train)."""

_NAME = re.compile(r"^[a-z][a-z0-9_]*$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
# Group names at the store root that a split may not take.
_RESERVED = ("classes", "detector_head")


def _code_version() -> str:
    try:
        return _pkg_metadata.version("roicache")
    except _pkg_metadata.PackageNotFoundError:  # pragma: no cover - running from a bare checkout
        return "unknown"


def _utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _check_name(kind: str, name: str) -> None:
    if not isinstance(name, str) or not _NAME.match(name):
        raise SchemaError(f"{kind} name {name!r} is invalid; use lowercase letters, digits and '_' (e.g. 'train', 'fc')")


def _check_sha(kind: str, sha: str) -> None:
    if not isinstance(sha, str) or not _SHA256.match(sha):
        raise SchemaError(f"{kind} sha256 {sha!r} is not 64 lowercase hex digits; compute it with cache_schema.runtime.sha256_file")


def check_schema_version(version: Any) -> None:
    """Raise :class:`SchemaError` unless this code reads stores of ``version``."""
    if version not in READABLE_VERSIONS:
        have = ", ".join(str(v) for v in READABLE_VERSIONS)
        raise SchemaError(
            f"store schema version {version} is not supported by this roicache (reads {have}); re-extract it or upgrade roicache"
        )


@dataclass(frozen=True, kw_only=True)
class DetectorInfo:
    """The frozen detector that produced the RoIs.

    Attributes:
        backend: ``"torchvision"`` or ``"mmdet"`` (free text, recorded only).
        arch: JSON-able architecture/config dict (the checkpoint's ``arch``).
        checkpoint_sha256: hex sha256 of the checkpoint file — the detector's identity.
        checkpoint_path: where it was read from (informational; resume compares the sha only).
        levels: feature levels the detector can emit, name → per-RoI shape,
            e.g. ``{"fc": (1024,), "pooled": (256, 7, 7)}``.
        num_classes: ``C`` foreground classes.
        postprocess: the detector's test-time detection settings (``None`` in older stores).
        stage_fg_iou: for a cascade (Cascade R-CNN, HTC), the foreground IoU each stage's RoIs are
            labelled at (its training assigner's ``pos_iou_thr``), one per stage; empty for a
            single-stage box head. Its length is the number of stages the store holds.
    """

    backend: str
    arch: dict
    checkpoint_sha256: str
    checkpoint_path: str
    levels: dict[str, tuple[int, ...]]
    num_classes: int
    postprocess: Postprocess | None = None
    stage_fg_iou: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "stage_fg_iou", tuple(float(v) for v in self.stage_fg_iou))
        if len(self.stage_fg_iou) == 1 or any(not 0.0 < v <= 1.0 for v in self.stage_fg_iou):
            raise SchemaError(f"detector stage_fg_iou {list(self.stage_fg_iou)}: a cascade records one IoU in (0, 1] "
                              "per stage (at least two stages); single-stage detectors record none")
        if not self.backend:
            raise SchemaError("detector backend is empty; record e.g. 'torchvision' or 'mmdet'")
        try:
            json.dumps(self.arch)
        except (TypeError, ValueError) as exc:
            raise SchemaError(f"detector arch is not JSON-serialisable ({exc}); pass plain dicts, lists, numbers and strings") from None
        _check_sha("detector checkpoint", self.checkpoint_sha256)
        if not self.levels:
            raise SchemaError("detector levels are empty; record at least one feature level, e.g. {'fc': (1024,)}")
        levels = {}
        for name, shape in self.levels.items():
            _check_name("feature level", name)
            shape = tuple(int(s) for s in shape)
            if not shape or min(shape) < 1:
                raise SchemaError(f"feature level {name!r} has shape {shape}; every dimension must be >= 1")
            levels[name] = shape
        object.__setattr__(self, "levels", levels)  # normalise lists from JSON to tuples
        if self.num_classes < 1:
            raise SchemaError(f"detector num_classes is {self.num_classes}; it must be >= 1")

    def to_dict(self) -> dict:
        return {
            "backend": self.backend,
            "arch": self.arch,
            "checkpoint_sha256": self.checkpoint_sha256,
            "checkpoint_path": self.checkpoint_path,
            "levels": {k: list(v) for k, v in self.levels.items()},
            "num_classes": self.num_classes,
            **({"postprocess": self.postprocess.to_dict()} if self.postprocess else {}),
            **({"stage_fg_iou": list(self.stage_fg_iou)} if self.stage_fg_iou else {}),
        }

    @property
    def num_stages(self) -> int:
        """Classification stages the store holds (1 unless the detector is a cascade)."""
        return max(1, len(self.stage_fg_iou))

    @classmethod
    def from_dict(cls, d: dict) -> "DetectorInfo":
        post = d.get("postprocess")
        return cls(**{**d, "levels": {k: tuple(v) for k, v in d["levels"].items()},
                      "postprocess": None if post is None else Postprocess(**post)})


@dataclass(frozen=True, kw_only=True)
class SplitSource:
    """Where one split's annotations and images came from: the annotation file by content
    (sha256), by absolute path (a hint) and by path relative to the store (``None`` for stores
    behind a URL and stores made before it was recorded); see :mod:`cache_schema.inputs`."""

    annotation_path: str
    annotation_sha256: str
    image_root: str
    annotation_relpath: str | None = None

    def __post_init__(self) -> None:
        _check_sha("annotation", self.annotation_sha256)

    def to_dict(self) -> dict:
        out = {"annotation_path": self.annotation_path, "annotation_sha256": self.annotation_sha256,
               "image_root": self.image_root}
        return out if self.annotation_relpath is None else {**out, "annotation_relpath": self.annotation_relpath}


@dataclass(frozen=True, kw_only=True)
class DatasetInfo:
    """The dataset: per split its source files, and the json category ids (class ``k`` = ``category_ids[k]``)."""

    splits: dict[str, SplitSource]
    category_ids: tuple[int, ...]

    def __post_init__(self) -> None:
        for name in self.splits:
            _check_name("split", name)
        ids = tuple(int(c) for c in self.category_ids)
        if not ids:
            raise SchemaError("dataset category_ids is empty; the annotation file has no categories")
        if list(ids) != sorted(set(ids)):
            raise SchemaError("dataset category_ids must be unique and ascending (class k = k-th smallest json id)")
        object.__setattr__(self, "category_ids", ids)

    def to_dict(self) -> dict:
        return {"splits": {k: v.to_dict() for k, v in self.splits.items()}, "category_ids": list(self.category_ids)}

    @classmethod
    def from_dict(cls, d: dict) -> "DatasetInfo":
        return cls(splits={k: SplitSource(**v) for k, v in d["splits"].items()}, category_ids=tuple(d["category_ids"]))


@dataclass(frozen=True, kw_only=True)
class ExtractionSettings:
    """How RoIs were produced and labelled.

    Attributes:
        fg_iou: RoIs with IoU >= fg_iou take their best GT's class.
        bg_iou: RoIs with IoU < bg_iou are background (label ``C``).
        rois_per_image: proposals kept per image (before appending GT boxes).
        gt_as_proposals: GT boxes are appended as RoIs in the train split.
        with_masks: the val split stores class-agnostic mask logits.
        mask_size: side ``M`` of the stored mask logits.
        seed: seed of every random choice made during extraction.
        train_bg_per_image: background RoIs kept per train image (every foreground RoI is kept;
            image ``i``'s are drawn by ``numpy.random.default_rng((seed, i))``); ``None``: all.
        store_logits: the class logits are stored (``rois/logits``); ``False``: recomputed from
            ``feat/fc`` and the detector head on read (:mod:`cache_schema.derived`).
        created: ISO-8601 UTC time the store was created (not compared on resume).
        code_version: roicache version that wrote the store.
    """

    fg_iou: float = 0.5
    bg_iou: float = 0.5
    rois_per_image: int
    gt_as_proposals: bool = True
    with_masks: bool = True
    mask_size: int = 28
    seed: int
    train_bg_per_image: int | None = None
    store_logits: bool = True
    created: str = field(default_factory=_utc_now)
    code_version: str = field(default_factory=_code_version)

    def __post_init__(self) -> None:
        if not 0.0 <= self.bg_iou <= self.fg_iou <= 1.0:
            raise SchemaError(f"IoU thresholds bg_iou={self.bg_iou}, fg_iou={self.fg_iou} must satisfy 0 <= bg_iou <= fg_iou <= 1")
        if self.rois_per_image < 1:
            raise SchemaError(f"rois_per_image is {self.rois_per_image}; it must be >= 1")
        if self.mask_size < 1:
            raise SchemaError(f"mask_size is {self.mask_size}; it must be >= 1")
        if self.train_bg_per_image is not None and self.train_bg_per_image < 0:
            raise SchemaError(f"train_bg_per_image is {self.train_bg_per_image}; it must be >= 0")

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


@dataclass(frozen=True, kw_only=True)
class StoreMeta:
    """Everything recorded about a store; kept as ``attrs["roicache"]`` of the root group."""

    schema_version: int = SCHEMA_VERSION
    detector: DetectorInfo
    dataset: DatasetInfo
    extraction: ExtractionSettings
    splits: tuple[str, ...]
    num_classes: int

    def __post_init__(self) -> None:
        check_schema_version(self.schema_version)
        object.__setattr__(self, "splits", tuple(self.splits))
        if not self.splits or len(set(self.splits)) != len(self.splits):
            raise SchemaError(f"store splits {self.splits} must be non-empty and unique")
        for name in self.splits:
            _check_name("split", name)
            if name in _RESERVED:
                raise SchemaError(f"split name {name!r} is reserved for the store's own tables; pick another name")
            if name not in self.dataset.splits:
                raise SchemaError(f"split {name!r} has no entry in dataset.splits; record its annotation file and image root")
        c = self.num_classes
        if self.detector.num_classes != c or len(self.dataset.category_ids) != c:
            raise SchemaError(
                f"class counts disagree: store {c}, detector {self.detector.num_classes}, dataset {len(self.dataset.category_ids)}; "
                "use a detector trained on this dataset's categories"
            )

    def to_dict(self) -> dict:
        return {
            "schema_version": self.schema_version,
            "detector": self.detector.to_dict(),
            "dataset": self.dataset.to_dict(),
            "extraction": self.extraction.to_dict(),
            "splits": list(self.splits),
            "num_classes": self.num_classes,
        }

    @classmethod
    def from_dict(cls, d: dict) -> "StoreMeta":
        """Parse a dict written by :meth:`to_dict`; the version is checked before anything else."""
        if not isinstance(d, dict):
            raise SchemaError("store metadata is not a JSON object; the store is damaged, re-extract it")
        check_schema_version(d.get("schema_version"))
        try:
            return cls(
                schema_version=d["schema_version"],
                detector=DetectorInfo.from_dict(d["detector"]),
                dataset=DatasetInfo.from_dict(d["dataset"]),
                extraction=ExtractionSettings(**d["extraction"]),
                splits=tuple(d["splits"]),
                num_classes=d["num_classes"],
            )
        except (KeyError, TypeError) as exc:
            raise SchemaError(f"store metadata is malformed ({type(exc).__name__}: {exc}); the store is damaged, re-extract it") from None


# Fields that identify *content*; paths and the creation time may differ between resumes.
def _as(name: str, value: Any, dtype: Any, shape: tuple[int | None, ...]) -> np.ndarray:
    arr = np.asarray(value)
    if arr.ndim != len(shape) or any(s is not None and s != d for s, d in zip(shape, arr.shape)):
        raise SchemaError(f"{name} has shape {arr.shape}, expected {tuple('N' if s is None else s for s in shape)}")
    if arr.size and not np.can_cast(arr.dtype, dtype, casting="same_kind"):
        raise SchemaError(f"{name} has dtype {arr.dtype}, expected {np.dtype(dtype)}")
    return np.ascontiguousarray(arr, dtype=dtype)


@dataclass(frozen=True, kw_only=True)
class GtTable:
    """Ground truth of one split, ``G`` rows, stored dtypes.

    Attributes:
        boxes: float32 ``[G, 4]`` xyxy, input-image pixels.
        labels: int32 ``[G]`` contiguous class ``0..C-1``.
        image: int32 ``[G]`` position of the GT's image in the split.
        area: float32 ``[G]`` mask area in pixels (the json ``area``).
        ann_id: int64 ``[G]`` annotation id in the json (the segmentation reference).
    """

    boxes: np.ndarray
    labels: np.ndarray
    image: np.ndarray
    area: np.ndarray
    ann_id: np.ndarray

    def __post_init__(self) -> None:
        g = np.asarray(self.labels).shape[0] if np.asarray(self.labels).ndim == 1 else -1
        object.__setattr__(self, "boxes", _as("gt boxes", self.boxes, np.float32, (g, 4)))
        for name, dtype in (("labels", np.int32), ("image", np.int32), ("area", np.float32), ("ann_id", np.int64)):
            object.__setattr__(self, name, _as(f"gt {name}", getattr(self, name), dtype, (g,)))

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @classmethod
    def empty(cls) -> "GtTable":
        return cls(boxes=np.zeros((0, 4)), labels=np.zeros(0), image=np.zeros(0), area=np.zeros(0), ann_id=np.zeros(0))


@dataclass(frozen=True, kw_only=True)
class SplitSpec:
    """What :func:`cache_schema.create_store` needs to lay out one split.

    Attributes:
        name: split name (``train``, ``val``, ...), must be in ``StoreMeta.splits``.
        image_ids: int64 ``[I]`` json image ids, in split order.
        image_sizes: int32 ``[I, 2]`` (height, width) in pixels.
        file_names: ``I`` image file names (relative to the dataset directory).
        stride: ``K``, most RoIs any image may hold (proposals + appended GT boxes).
        levels: feature levels stored for this split (names from ``DetectorInfo.levels``).
        gt: the split's ground truth.
        with_masks: store ``rois/mask_logits`` (``[M, M]`` float16 per RoI).
        mask_overlaps: with masks, also store each RoI's pasted-mask area and its pixel
            intersection with each GT mask of its image; the value is the number of GT columns
            (at least the most GTs any image has); 0 stores neither.
        has_gt_proposals: GT boxes were appended as RoIs.
        image_block: ``B``, images per chunk of the image table arrays (``images/id`` etc.); in
            schema 2 also the images one writer commits together (one chunk of the completion
            marks and of the narrow RoI arrays; wide arrays shard within it).
        row_order: ``"proposal"`` or ``"label"`` (:data:`ROW_ORDERS`).
        store_logits: keep ``rois/logits``; ``False`` (schema 2, needs the ``fc`` level) recomputes
            them from ``feat/fc`` and the stored detector head on read.
    """

    name: str
    image_ids: np.ndarray
    image_sizes: np.ndarray
    file_names: tuple[str, ...]
    stride: int
    levels: tuple[str, ...]
    gt: GtTable
    with_masks: bool = False
    has_gt_proposals: bool = False
    image_block: int = 64
    mask_overlaps: int = 0
    row_order: str = "proposal"
    store_logits: bool = True

    def __post_init__(self) -> None:
        _check_name("split", self.name)
        ids = _as(f"split {self.name}: image_ids", self.image_ids, np.int64, (None,))
        n = ids.shape[0]
        if n == 0:
            raise SchemaError(f"split {self.name} has no images; check the annotation file")
        if len(np.unique(ids)) != n:
            raise SchemaError(f"split {self.name}: image_ids are not unique; check the annotation file")
        sizes = _as(f"split {self.name}: image_sizes", self.image_sizes, np.int32, (n, 2))
        if sizes.size and sizes.min() < 1:
            raise SchemaError(f"split {self.name}: image sizes must be >= 1 pixel; check images[].height/width")
        object.__setattr__(self, "image_ids", ids)
        object.__setattr__(self, "image_sizes", sizes)
        object.__setattr__(self, "file_names", tuple(str(f) for f in self.file_names))
        object.__setattr__(self, "levels", tuple(self.levels))
        if len(self.file_names) != n:
            raise SchemaError(f"split {self.name}: {len(self.file_names)} file names for {n} images")
        if self.stride < 1:
            raise SchemaError(f"split {self.name}: stride is {self.stride}; it must be >= 1 (rois_per_image + max GT per image)")
        if len(set(self.levels)) != len(self.levels):
            raise SchemaError(f"split {self.name}: levels {self.levels} repeat a name")
        if self.image_block < 1:
            raise SchemaError(f"split {self.name}: image_block is {self.image_block}; it must be >= 1")
        if self.row_order not in ROW_ORDERS:
            raise SchemaError(f"split {self.name}: row_order {self.row_order!r} is not one of {', '.join(ROW_ORDERS)}")
        if not self.store_logits and "fc" not in self.levels:
            raise SchemaError(f"split {self.name}: logits can be recomputed only from the fc level; store them or add fc to the levels")
        if self.mask_overlaps < 0 or (self.mask_overlaps and not self.with_masks):
            raise SchemaError(f"split {self.name}: mask_overlaps={self.mask_overlaps} needs with_masks and must be >= 0")
        most = int(np.bincount(self.gt.image, minlength=n).max()) if len(self.gt) else 0
        if self.mask_overlaps and self.mask_overlaps < most:
            raise SchemaError(f"split {self.name}: mask_overlaps={self.mask_overlaps} columns, but an image has {most} GTs")
        if len(self.gt) and (self.gt.image.min() < 0 or self.gt.image.max() >= n):
            raise SchemaError(f"split {self.name}: gt image positions must lie in [0, {n})")

    @property
    def num_images(self) -> int:
        return int(self.image_ids.shape[0])

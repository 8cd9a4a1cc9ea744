"""In-memory records that cross package boundaries: class statistics and tables of RoIs.

These are what ``heads/`` trains and evaluates on; the store readers (:mod:`cache_schema.store`)
produce them and tests may build them by hand. Class indices are contiguous ``0..C-1``;
background is ``C``.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace

import numpy as np
import torch

from cache_schema.errors import SchemaError

FREQUENCY_GROUPS = ("r", "c", "f")


@dataclass(frozen=True, kw_only=True)
class ClassInfo:
    """Per-class statistics of the *training* split, as bi-level and repeat-factor sampling need.

    Attributes:
        names: ``C`` category names.
        category_ids: ``C`` json category ids; index ``k`` is contiguous class ``k``.
        frequency: ``C`` LVIS frequency groups, each ``'r'``, ``'c'`` or ``'f'``.
        instance_count: int64 ``[C]`` training instances per class.
        image_count: int64 ``[C]`` training images containing the class.
        csr_indptr: int64 ``[C+1]``; the training images of class ``k`` are
            ``csr_images[csr_indptr[k]:csr_indptr[k+1]]`` (sorted positions in the train split).
        csr_images: int64 ``[nnz]``.
    """

    names: tuple[str, ...]
    category_ids: tuple[int, ...]
    frequency: tuple[str, ...]
    instance_count: np.ndarray
    image_count: np.ndarray
    csr_indptr: np.ndarray
    csr_images: np.ndarray

    def __post_init__(self) -> None:
        c = len(self.names)
        if c == 0:
            raise SchemaError("class table is empty: the store or annotation file has no categories")
        if len(self.category_ids) != c or len(self.frequency) != c:
            raise SchemaError(f"class table: names, category_ids and frequency differ in length (C={c})")
        bad = set(self.frequency) - set(FREQUENCY_GROUPS)
        if bad:
            raise SchemaError(f"class table: unknown frequency group(s) {sorted(bad)}; expected r, c or f")
        for name in ("instance_count", "image_count"):
            arr = getattr(self, name)
            if arr.shape != (c,):
                raise SchemaError(f"class table: {name} has shape {arr.shape}, expected ({c},)")
        if self.csr_indptr.shape != (c + 1,) or self.csr_indptr[-1] != len(self.csr_images):
            raise SchemaError("class table: csr_indptr does not index csr_images")
        if np.any(np.diff(self.csr_indptr) != self.image_count):
            raise SchemaError("class table: per-class image lists disagree with image_count")

    @property
    def num_classes(self) -> int:
        return len(self.names)

    def images_of(self, k: int) -> np.ndarray:
        """Positions (in the train split) of the training images that contain class ``k``."""
        return self.csr_images[self.csr_indptr[k] : self.csr_indptr[k + 1]]


# Optional per-RoI columns of a RoiSet, in the order they are documented.
ROI_COLUMNS = ("boxes", "objectness", "is_gt", "gt_index", "logits", "reg_boxes", "mask_logits", "mask_area", "mask_inter")


@dataclass(frozen=True, kw_only=True)
class RoiSet:
    """A table of ``N`` RoIs of one split, grouped by image, as torch tensors on one device.

    Rows of image ``j`` (the ``j``-th entry of ``image_index_of_block``) are
    ``image_offsets[j]:image_offsets[j+1]``; they are contiguous and in store order.

    Attributes:
        features: ``[N, *level_shape]`` float16 (as stored) or float32; ``None`` when no level
            was asked for.
        labels: int64 ``[N]``, matched class ``0..C-1`` when IoU >= the store's fg threshold,
            else ``C`` (background).
        ious: float32 ``[N]``, IoU with the best-overlapping ground truth (0 when none).
        image_index: int64 ``[N]``, position of each RoI's image within the split.
        image_offsets: int64 ``[B+1]``, row ranges of the ``B`` images in this set.
        images: int64 ``[B]``, split positions of those images.
        boxes: float32 ``[N, 4]`` proposal boxes, xyxy, input-image pixels.
        objectness: float32 ``[N]`` RPN objectness logit (``+inf`` for added GT boxes).
        is_gt: bool ``[N]``, the RoI is a ground-truth box added as a proposal.
        gt_index: int64 ``[N]``, row of the best GT in the split's GT table, ``-1`` when none.
        logits: float32 ``[N, C+1]``, the original head's class logits, background last.
        reg_boxes: float32 ``[N, 4]``, class-agnostic regressed boxes, xyxy, clipped to the image.
        mask_logits: float16 ``[N, M, M]``, class-agnostic mask logits on ``reg_boxes``.
        mask_area: int32 ``[N]``, pixels of the mask pasted from ``mask_logits`` (prob > 0.5).
        mask_inter: int32 ``[N, G]``, pixels that mask shares with the image's GT ``j`` (the
            ``j``-th GT row of the image; columns past its GT count are 0).
    """

    labels: torch.Tensor
    ious: torch.Tensor
    image_index: torch.Tensor
    image_offsets: torch.Tensor
    images: torch.Tensor
    features: torch.Tensor | None = None
    boxes: torch.Tensor | None = None
    objectness: torch.Tensor | None = None
    is_gt: torch.Tensor | None = None
    gt_index: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    reg_boxes: torch.Tensor | None = None
    mask_logits: torch.Tensor | None = None
    mask_area: torch.Tensor | None = None
    mask_inter: torch.Tensor | None = None
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        n = self.labels.shape[0]
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, torch.Tensor) and f.name not in ("image_offsets", "images"):
                if value.shape[0] != n:
                    raise SchemaError(f"RoiSet: column {f.name} has {value.shape[0]} rows, labels has {n}")
        if self.image_offsets.shape[0] != self.images.shape[0] + 1:
            raise SchemaError("RoiSet: image_offsets must have one more entry than images")
        if int(self.image_offsets[-1]) != n:
            raise SchemaError(f"RoiSet: image_offsets end at {int(self.image_offsets[-1])}, expected {n}")

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def num_images(self) -> int:
        return int(self.images.shape[0])

    def to(self, device: torch.device | str) -> "RoiSet":
        """The same table on ``device`` (tensors moved, non-blocking where possible)."""
        moved = {
            f.name: getattr(self, f.name).to(device)
            for f in fields(self)
            if isinstance(getattr(self, f.name), torch.Tensor)
        }
        return replace(self, **moved)

    def rows_of(self, j: int) -> slice:
        """Row range of the ``j``-th image of this set (``j`` indexes ``images``, not the split)."""
        return slice(int(self.image_offsets[j]), int(self.image_offsets[j + 1]))

    def select_images(self, js: torch.Tensor | np.ndarray | list[int]) -> "RoiSet":
        """A new RoiSet holding images ``js`` (indices into ``images``) in that order."""
        js = torch.as_tensor(js, dtype=torch.int64).cpu()
        offsets = self.image_offsets.cpu()
        starts, ends = offsets[js], offsets[js + 1]
        counts = ends - starts
        rows = torch.cat([torch.arange(int(s), int(e)) for s, e in zip(starts, ends)]) if len(js) else torch.zeros(0, dtype=torch.int64)
        new_offsets = torch.zeros(len(js) + 1, dtype=torch.int64)
        new_offsets[1:] = torch.cumsum(counts, 0)
        return self.take(rows, images=self.images.cpu()[js], image_offsets=new_offsets)

    def take(self, rows: torch.Tensor, *, images: torch.Tensor | None = None,
             image_offsets: torch.Tensor | None = None) -> "RoiSet":
        """Rows ``rows`` of every column. Without ``images``/``image_offsets`` the result is one
        pseudo-image holding all rows (use for training batches that mix images)."""
        n = len(self)
        rows_dev = {}
        picked = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, torch.Tensor) and f.name not in ("image_offsets", "images"):
                key = value.device
                if key not in rows_dev:
                    rows_dev[key] = rows.to(key)
                picked[f.name] = value[rows_dev[key]]
        if images is None:
            images = torch.full((1,), -1, dtype=torch.int64)
            image_offsets = torch.tensor([0, rows.shape[0]], dtype=torch.int64)
        del n
        dev = self.images.device
        return replace(self, **picked, images=images.to(dev), image_offsets=image_offsets.to(dev))

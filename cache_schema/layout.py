"""The on-disk layout: array names, dtypes, shapes, chunking and codecs of a store.

One place defines what every array of a split looks like; :mod:`cache_schema.store` creates
arrays from it and :mod:`cache_schema.validate` checks stores against it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from zarr.codecs import BloscCodec, Crc32cCodec, ZstdCodec

ROOT_ATTR = "roicache"
"""Root-group attribute holding ``StoreMeta.to_dict()``."""
COMPLETE_ATTR = "complete"
"""Root-group attribute, ``True`` once :func:`cache_schema.finalize` saw every image done."""
INITIALIZED_ATTR = "initialized"
"""Root-group attribute, ``True`` once :func:`cache_schema.create_store` wrote every table."""

# Blosc-zstd clevel for float16 features: clevel 1 compressed ReLU'd float16 as well as 3-5
# (~0.59 of raw) at a fraction of the time; only clevel >= 7 did better (~0.55) at 10-25x the cost.
FEATURE_CLEVEL = 1
OTHER_CLEVEL = 3
# Blosc-lz4 for the small per-RoI arrays (labels, ious, boxes, logits...): read on every load,
# they decoded ~10x faster than zstd (zstd's per-call set-up dominates ~0.5 KB chunks) for
# ~10% more bytes.
ROI_CNAME = "lz4"
ROI_CLEVEL = 5
# Per-RoI arrays with at least this many values per row (features, mask logits, class logits)
# use Blosc-zstd at FEATURE_CLEVEL: on C=1203 logits zstd stored ~25% fewer bytes than lz4.
WIDE_ROW = 16
# Rows per chunk of the ground-truth table (written once; large chunks keep the file count low).
GT_CHUNK = 65536
# Schema 2 (docs/scale.md): a wide array's shard (one object) holds the largest power-of-two
# number of images dividing the commit block whose raw bytes stay within SHARD_BYTES — a few MB
# per object once compressed, instead of one object per image per array.
SHARD_BYTES = 16 << 20
# ... and its inner chunks (what one read decodes) hold about INNER_BYTES raw, at least
# MIN_INNER_ROWS rows: small enough that a bi-level batch decodes little beyond the rows it uses,
# large enough that zarr's per-chunk cost (~0.3 ms) stays below the decoding cost.
INNER_BYTES = 128 << 10
MIN_INNER_ROWS = 8
#: Schema 2 rounds the RoI stride up to a multiple of this, so inner chunks align with images.
STRIDE_ALIGN = 16

KIND_TABLE = "table"  # written once at creation (image table, GT)
KIND_MARK = "mark"  # one element per image, one image per chunk (completion marks)
KIND_ROI = "roi"  # K rows per image, one image per chunk (RoI arrays and features)

# RoI arrays every split has: name -> (dtype, trailing shape); ``logits`` is [C+1], filled in below.
_ROI_BASE = {
    "boxes": (np.float32, (4,)),
    "objectness": (np.float32, ()),
    "is_gt": (np.bool_, ()),
    "labels": (np.int32, ()),
    "ious": (np.float32, ()),
    "gt_index": (np.int32, ()),
    "logits": (np.float32, None),
    "reg_boxes": (np.float32, (4,)),
}
FEATURE_DTYPE = np.dtype(np.float16)
MASK_DTYPE = np.dtype(np.float16)
# Mask overlaps (optional, splits with masks): each RoI's pasted-mask area and its intersection
# with each ground-truth mask of its image, in pixels; column j is the image's j-th GT row.
OVERLAP_DTYPE = np.dtype(np.int32)

GT_ARRAYS = {
    "boxes": (np.float32, (4,)),
    "labels": (np.int32, ()),
    "image": (np.int32, ()),
    "area": (np.float32, ()),
    "ann_id": (np.int64, ()),
}
IMAGE_TABLE = {"id": np.int64, "height": np.int32, "width": np.int32}
STRING_DTYPE = "str"
FREQUENCY_CODES = {"r": 0, "c": 1, "f": 2}
"""``classes/frequency`` codes (uint8) of the LVIS frequency groups."""

CLASS_ARRAYS = ("category_id", "instance_count", "image_count", "frequency", "name", "csr_indptr", "csr_images")


@dataclass(frozen=True, kw_only=True)
class ArraySpec:
    """One array of a store.

    Attributes:
        path: path inside its group, e.g. ``"rois/boxes"`` (split) or ``"name"`` (classes).
        shape: full shape; ``chunks``: chunk shape (whole trailing dims).
        dtype: numpy dtype, or ``"str"`` for variable-length UTF-8.
        kind: ``"table"``, ``"mark"`` or ``"roi"`` (see module constants).
        clevel: Blosc level, ``None`` for no Blosc (marks, strings).
        cname: Blosc compressor (``"zstd"`` or ``"lz4"``).
        shards: shard shape (zarr's sharding codec: one object holds several ``chunks``, which
            stay individually readable), ``None`` for one object per chunk.
    """

    path: str
    shape: tuple[int, ...]
    chunks: tuple[int, ...]
    dtype: object
    kind: str
    clevel: int | None
    cname: str = "zstd"
    shards: tuple[int, ...] | None = None

    @property
    def object_rows(self) -> int:
        """Rows (along axis 0) of one stored object: a shard, or a chunk when unsharded."""
        return (self.shards or self.chunks)[0]

    def compressors(self) -> list:
        """Codec chain after serialisation; every chunk ends with a crc32c so corruption is caught."""
        if self.dtype == STRING_DTYPE:
            return [ZstdCodec(level=OTHER_CLEVEL), Crc32cCodec()]
        if self.clevel is None:
            return [Crc32cCodec()]
        return [BloscCodec(cname=self.cname, clevel=self.clevel, shuffle="shuffle"), Crc32cCodec()]

    @property
    def np_dtype(self) -> np.dtype:
        return np.dtype(object) if self.dtype == STRING_DTYPE else np.dtype(self.dtype)


def roi_arrays(*, num_classes: int, with_masks: bool, mask_size: int, mask_overlaps: int = 0,
               store_logits: bool = True) -> dict[str, tuple[np.dtype, tuple[int, ...]]]:
    """Per-RoI arrays (without features) of a split: ``"rois/<name>"`` -> (dtype, trailing shape).

    ``mask_overlaps`` > 0 (needs ``with_masks``) adds ``rois/mask_area`` int32 ``[]`` and
    ``rois/mask_inter`` int32 ``[mask_overlaps]`` (one column per GT slot of the image).
    ``store_logits=False`` leaves out ``rois/logits`` (recomputed from ``feat/fc``).
    """
    out = {}
    for name, (dtype, trailing) in _ROI_BASE.items():
        if name == "logits" and not store_logits:
            continue
        out[f"rois/{name}"] = (np.dtype(dtype), (num_classes + 1,) if trailing is None else trailing)
    if with_masks:
        out["rois/mask_logits"] = (MASK_DTYPE, (mask_size, mask_size))
        if mask_overlaps > 0:
            out["rois/mask_area"] = (OVERLAP_DTYPE, ())
            out["rois/mask_inter"] = (OVERLAP_DTYPE, (int(mask_overlaps),))
    return out


#: Per-RoI arrays of stage ``k >= 1`` of a cascade detector, under ``stages/<k>/`` (rows aligned
#: with the split's own: row ``r`` of every stage descends from proposal ``r``). Stage 0 is the
#: split's own ``rois/*`` and ``feat/*`` except its logits: a cascade's ``rois/logits`` and
#: ``rois/reg_boxes`` hold the detector's *final* outputs (stage logits averaged, last stage's boxes),
#: so ``stages/0/rois/logits`` keeps stage 0's own.
STAGE_ROI = ("boxes", "labels", "ious", "gt_index", "logits")


def stage_prefix(stage: int) -> str:
    """Path prefix of a cascade stage's arrays inside a split (``""`` for stage 0's shared ones)."""
    return f"stages/{int(stage)}/"


def stage_arrays(*, num_classes: int, num_stages: int, levels: dict[str, tuple[int, ...]],
                 store_logits: bool = True) -> dict[str, tuple[np.dtype, tuple[int, ...]]]:
    """The per-stage arrays of a cascade with ``num_stages`` stages (none for ``num_stages <= 1``):
    ``stages/0/rois/logits`` and, for ``k >= 1``, ``stages/<k>/rois/<STAGE_ROI>`` and
    ``stages/<k>/feat/<level>`` (without the logits when ``store_logits`` is off)."""
    out: dict[str, tuple[np.dtype, tuple[int, ...]]] = {}
    if num_stages <= 1:
        return out
    names = STAGE_ROI if store_logits else tuple(n for n in STAGE_ROI if n != "logits")
    for k in range(num_stages):
        for name in (("logits",) if store_logits else ()) if k == 0 else names:
            dtype, trailing = _ROI_BASE[name]
            out[f"{stage_prefix(k)}rois/{name}"] = (np.dtype(dtype), (num_classes + 1,) if trailing is None else trailing)
        if k:
            out.update({f"{stage_prefix(k)}feat/{lv}": (FEATURE_DTYPE, tuple(shape)) for lv, shape in levels.items()})
    return out


def _pow2_floor(x: float) -> int:
    return 1 << max(0, int(np.floor(np.log2(max(x, 1.0)))))


def roi_chunking(*, version: int, stride: int, block: int, row_bytes: int,
                 wide: bool) -> tuple[tuple[int, ...] | None, int]:
    """(shard rows or ``None``, chunk rows) of a per-RoI array with ``row_bytes`` raw bytes a row.

    Version 1: one image (``stride`` rows) per chunk, no shards. Version 2: a narrow array is one
    chunk per commit ``block`` of images; a wide one shards ``p`` images (the largest power of two
    dividing ``block`` within :data:`SHARD_BYTES`) into inner chunks of about
    :data:`INNER_BYTES` (a power of two dividing the shard, at least :data:`MIN_INNER_ROWS` when
    the shard allows it).
    """
    if version == 1:
        return None, stride
    if not wide:
        return None, block * stride
    per_image = stride * row_bytes
    p = 1
    while block % (2 * p) == 0 and 2 * p * per_image <= SHARD_BYTES:
        p *= 2
    rows = p * stride
    inner = max(MIN_INNER_ROWS, _pow2_floor(INNER_BYTES / max(row_bytes, 1)))
    inner = min(inner, rows & -rows)  # the largest power of two dividing the shard's rows
    return (rows,), inner


def split_layout(
    *,
    num_images: int,
    stride: int,
    num_gt: int,
    num_classes: int,
    levels: dict[str, tuple[int, ...]],
    with_masks: bool,
    mask_size: int,
    image_block: int,
    mask_overlaps: int = 0,
    num_stages: int = 1,
    version: int = 2,
    store_logits: bool = True,
) -> dict[str, ArraySpec]:
    """Every array of one split, keyed by its path inside the split group (``num_stages`` > 1:
    a cascade's per-stage arrays too, :func:`stage_arrays`). ``version`` picks the chunking
    (:func:`roi_chunking`); names, shapes and dtypes are the same in both."""
    n, k = num_images, stride
    specs: dict[str, ArraySpec] = {}
    block = min(image_block, n)
    for name, dtype in IMAGE_TABLE.items():
        specs[f"images/{name}"] = ArraySpec(path=f"images/{name}", shape=(n,), chunks=(block,), dtype=np.dtype(dtype), kind=KIND_TABLE, clevel=OTHER_CLEVEL)
    specs["images/file_name"] = ArraySpec(path="images/file_name", shape=(n,), chunks=(block,), dtype=STRING_DTYPE, kind=KIND_TABLE, clevel=None)
    # Completion marks: version 1 one image per chunk; version 2 one commit block per chunk. Either
    # way concurrent shards (which own whole blocks) never write the same object.
    marks = 1 if version == 1 else block
    specs["images/num_rois"] = ArraySpec(path="images/num_rois", shape=(n,), chunks=(marks,), dtype=np.dtype(np.int32), kind=KIND_MARK, clevel=None)
    specs["images/done"] = ArraySpec(path="images/done", shape=(n,), chunks=(marks,), dtype=np.dtype(np.uint8), kind=KIND_MARK, clevel=None)
    rois = roi_arrays(num_classes=num_classes, with_masks=with_masks, mask_size=mask_size, mask_overlaps=mask_overlaps,
                      store_logits=store_logits)
    rois.update({f"feat/{lv}": (FEATURE_DTYPE, tuple(shape)) for lv, shape in levels.items()})
    rois.update(stage_arrays(num_classes=num_classes, num_stages=num_stages, levels=levels, store_logits=store_logits))
    for path, (dtype, trailing) in rois.items():
        # Wide rows (features, masks, logits) are most of the bytes: zstd; narrow ones: fast lz4.
        values = int(np.prod(trailing, dtype=np.int64))
        wide = values >= WIDE_ROW
        shards, rows = roi_chunking(version=version, stride=k, block=block, row_bytes=values * np.dtype(dtype).itemsize,
                                    wide=wide)
        specs[path] = ArraySpec(
            path=path, shape=(n * k, *trailing), chunks=(rows, *trailing), dtype=dtype, kind=KIND_ROI,
            clevel=FEATURE_CLEVEL if wide else ROI_CLEVEL, cname="zstd" if wide else ROI_CNAME,
            shards=None if shards is None else (shards[0], *trailing),
        )
    gchunk = max(1, min(num_gt, GT_CHUNK))
    for name, (dtype, trailing) in GT_ARRAYS.items():
        specs[f"gt/{name}"] = ArraySpec(
            path=f"gt/{name}", shape=(num_gt, *trailing), chunks=(gchunk, *trailing), dtype=np.dtype(dtype), kind=KIND_TABLE, clevel=OTHER_CLEVEL,
        )
    return specs


def classes_layout(*, num_classes: int, nnz: int) -> dict[str, ArraySpec]:
    """Arrays of the ``classes/`` group (one chunk each)."""
    c = num_classes
    shapes = {
        "category_id": ((c,), np.int64), "instance_count": ((c,), np.int64), "image_count": ((c,), np.int64),
        "frequency": ((c,), np.uint8), "name": ((c,), STRING_DTYPE), "csr_indptr": ((c + 1,), np.int64),
        "csr_images": ((nnz,), np.int64),
    }
    out = {}
    for name, (shape, dtype) in shapes.items():
        dt = dtype if dtype == STRING_DTYPE else np.dtype(dtype)
        out[name] = ArraySpec(path=name, shape=shape, chunks=(max(1, shape[0]),), dtype=dt, kind=KIND_TABLE, clevel=None if dt == STRING_DTYPE else OTHER_CLEVEL)
    return out


def split_attrs(*, num_images: int, stride: int, num_gt: int, levels: tuple[str, ...], with_masks: bool,
                mask_size: int, has_gt_proposals: bool, image_block: int, mask_overlaps: int = 0,
                row_order: str = "proposal", store_logits: bool = True) -> dict:
    """Attributes of a split group (what a reader needs before opening any array).

    ``mask_overlaps`` was added after the first stores: readers take a missing one as 0; so are
    ``row_order`` (``"proposal"``) and ``store_logits`` (``True``), added in schema 2.
    """
    return {
        "num_images": num_images, "roi_stride": stride, "num_gt": num_gt, "levels": list(levels),
        "with_masks": with_masks, "mask_size": mask_size, "has_gt_proposals": has_gt_proposals,
        "image_block": image_block, "mask_overlaps": mask_overlaps, "row_order": row_order,
        "store_logits": store_logits,
    }

"""One split of a store: its image table, ground truth, completion marks, RoI readers and writer.

Fixed-stride RoI axis: image ``i`` owns rows ``[i*K, i*K + num_rois[i])`` of every RoI array,
``K`` = the split's ``roi_stride``. How rows are chunked depends on the schema version
(:func:`cache_schema.layout.roi_chunking`). Writes, tables and marks go through zarr; RoI rows of
a local store are read by :class:`cache_schema.rowio.RowReader` (4-18x faster, tested equal),
of any other store through zarr.
"""

from __future__ import annotations

from functools import cached_property
from typing import TYPE_CHECKING, Iterator

import numpy as np
import torch
import zarr

from cache_schema.derived import recompute_logits
from cache_schema.rowio import RowReader, zarr_rows
from cache_schema.split_write import SplitWriter
from cache_schema.errors import ConfigError, SchemaError, StoreIncompleteError
from cache_schema.layout import FEATURE_DTYPE, STAGE_ROI, roi_arrays, stage_arrays, stage_prefix
from cache_schema.meta import GtTable
from cache_schema.records import ROI_COLUMNS, RoiSet

if TYPE_CHECKING:
    from cache_schema.store import Store



class SplitStore(SplitWriter):
    """Reader and writer of one split. Obtain it with ``Store.split(name)``.

    Attributes:
        name: split name; ``num_images``: ``I``; ``stride``: ``K``; ``levels``: stored feature
        levels; ``with_masks``; ``mask_size``; ``has_gt_proposals``; ``num_classes``: ``C``;
        ``mask_overlaps``: GT columns of ``rois/mask_inter`` (0: the split has no mask overlaps);
        ``commit_block``: ``B``, images a writer commits together (schema 2; attribute
        ``image_block``); ``row_order``: ``"proposal"`` or ``"label"``; ``store_logits``: whether
        ``rois/logits`` is stored (else recomputed from ``feat/fc``);
        ``num_stages``: classification stages (1 unless the detector is a cascade); ``stage``: the
        stage this reader reads (``None``: the detector's view — stage 0's RoIs and features
        with the final logits and boxes; see :meth:`at_stage`).
    """

    def __init__(self, *, group: zarr.Group, name: str, owner: "Store") -> None:
        self.group = group
        self.name = name
        self._owner = owner
        attrs = group.attrs.asdict()
        try:
            self.num_images = int(attrs["num_images"])
            self.stride = int(attrs["roi_stride"])
            self.num_gt = int(attrs["num_gt"])
            self.levels = tuple(attrs["levels"])
            self.with_masks = bool(attrs["with_masks"])
            self.mask_size = int(attrs["mask_size"])
            self.has_gt_proposals = bool(attrs["has_gt_proposals"])
            self.mask_overlaps = int(attrs.get("mask_overlaps", 0))  # absent in stores made before it
            self.commit_block = int(attrs.get("image_block", 1))
            self.row_order = str(attrs.get("row_order", "proposal"))  # schema 2 attributes
            self.store_logits = bool(attrs.get("store_logits", True))
        except KeyError as exc:
            raise SchemaError(f"split {name} lacks attribute {exc}; the store is damaged, re-extract it") from None
        self.num_classes = owner.meta.num_classes
        self._level_shapes = {lv: tuple(owner.meta.detector.levels[lv]) for lv in self.levels}
        self._roi_arrays = roi_arrays(num_classes=self.num_classes, with_masks=self.with_masks, mask_size=self.mask_size,
                                      mask_overlaps=self.mask_overlaps, store_logits=self.store_logits)
        self.num_stages = owner.meta.detector.num_stages
        self._roi_arrays.update(stage_arrays(num_classes=self.num_classes, num_stages=self.num_stages,
                                             levels=self._level_shapes, store_logits=self.store_logits))
        self.stage: int | None = None
        self._arrays: dict[str, zarr.Array] = {}
        self._readers: dict[str, RowReader | None] = {}
        self._writers: dict = {}

    # ----------------------------------------------------------------- arrays and tables
    def array(self, path: str) -> zarr.Array:
        """The zarr array at ``path`` inside the split (e.g. ``"rois/boxes"``, ``"feat/fc"``)."""
        if path not in self._arrays:
            try:
                node = self.group[path]
            except KeyError:
                raise SchemaError(f"split {self.name} lacks array {path}; the store is damaged, run `roicache cache validate`") from None
            # write_empty_chunks is a run-time setting, not stored. Unsharded chunks are always
            # written: zarr would skip (and delete) an all-zero one, which validation reports as
            # missing. Inside shards, all-zero inner chunks (padding rows, mostly) are skipped:
            # the shard index marks them empty and they read as zeros, at no encoding cost.
            self._arrays[path] = node.with_config({"write_empty_chunks": getattr(node, "shards", None) is None})
        return self._arrays[path]

    def _reader(self, path: str) -> RowReader | None:
        if path not in self._readers:
            self._readers[path] = RowReader.for_array(self.array(path))
        return self._readers[path]

    @property
    def store(self) -> "Store":
        """The store this split belongs to."""
        return self._owner

    def at_stage(self, stage: int) -> "SplitStore":
        """A reader of cascade stage ``stage``'s RoIs: its boxes, labels, IoUs, GT rows, logits and
        features (row ``r`` of every stage descends from proposal ``r``); other columns and every
        table are the split's. Stage 0 of a single-stage detector is the split itself."""
        if not 0 <= int(stage) < self.num_stages:
            have = "a single-stage detector: only stage 0" if self.num_stages == 1 else f"stages 0..{self.num_stages - 1}"
            raise ConfigError(f"split {self.name} holds {have}; choose --stage accordingly")
        view = SplitStore.__new__(SplitStore)
        view.__dict__.update(self.__dict__)  # shares the opened arrays and chunk readers
        view.stage = int(stage)
        return view

    def stage_path(self, path: str) -> str:
        """Where this reader's stage keeps the split-relative ``path`` (``rois/<name>`` or
        ``feat/<level>``): the path itself, or the stage group's copy of it."""
        if self.stage is None or self.num_stages == 1:
            return path
        group, _, name = path.partition("/")
        if self.stage == 0:
            return f"{stage_prefix(0)}{path}" if path == "rois/logits" else path
        return f"{stage_prefix(self.stage)}{path}" if group == "feat" or name in STAGE_ROI else path

    def roi_array_paths(self) -> dict[str, tuple[np.dtype, tuple[int, ...]]]:
        """Every per-RoI array (``rois/*`` and ``feat/*``) -> (dtype, trailing shape)."""
        out = dict(self._roi_arrays)
        out.update({f"feat/{lv}": (FEATURE_DTYPE, shape) for lv, shape in self._level_shapes.items()})
        return out

    @cached_property
    def image_ids(self) -> np.ndarray:
        """int64 ``[I]`` json image ids."""
        return np.asarray(self.array("images/id")[:], dtype=np.int64)

    @cached_property
    def image_sizes(self) -> np.ndarray:
        """int32 ``[I, 2]`` (height, width) in pixels."""
        return np.stack([self.array("images/height")[:], self.array("images/width")[:]], axis=1).astype(np.int32)

    @cached_property
    def file_names(self) -> tuple[str, ...]:
        return tuple(str(x) for x in self.array("images/file_name")[:])

    def num_rois(self) -> np.ndarray:
        """int64 ``[I]`` RoIs per image (0 for images not extracted yet). Re-read on each call."""
        return np.asarray(self.array("images/num_rois")[:], dtype=np.int64)

    def done(self) -> np.ndarray:
        """bool ``[I]``, image extraction finished. Re-read on each call."""
        return np.asarray(self.array("images/done")[:]) != 0

    def gt(self) -> GtTable:
        """The split's ground-truth table (stored dtypes)."""
        return GtTable(**{name: np.asarray(self.array(f"gt/{name}")[:]) for name in ("boxes", "labels", "image", "area", "ann_id")})

    def level_shape(self, level: str) -> tuple[int, ...]:
        self._check_level(level)
        return self._level_shapes[level]

    def nbytes(self, level: str) -> int:
        """Bytes the level takes in memory after :meth:`load` (finished images, float16)."""
        shape = self.level_shape(level)
        counts = self.num_rois()[self.done()]
        return int(counts.sum()) * int(np.prod(shape)) * FEATURE_DTYPE.itemsize

    def stored_nbytes(self, path: str) -> int:
        """Bytes array ``path`` takes in the store (compressed chunks plus metadata)."""
        return int(self.array(path).nbytes_stored())

    # ----------------------------------------------------------------- reading
    def _check_level(self, level: str) -> None:
        if level not in self._level_shapes:
            have = ", ".join(self.levels) or "none"
            raise SchemaError(f"split {self.name} has no feature level {level!r} (stored levels: {have}); re-extract with `extract --levels {level}`")

    def _paths_for(self, level: str | None, columns: tuple[str, ...]) -> dict[str, str]:
        """RoiSet field -> array path for the requested level and columns."""
        unknown = [c for c in columns if c not in ROI_COLUMNS]
        if unknown:
            raise ConfigError(f"unknown RoI column(s) {unknown}; choose from {', '.join(ROI_COLUMNS)}")
        if "mask_logits" in columns and not self.with_masks:
            raise SchemaError(f"split {self.name} stores no mask logits (extract stores them for the val split only); read masks from a split that has them")
        if {"mask_area", "mask_inter"} & set(columns) and not self.mask_overlaps:
            raise SchemaError(f"split {self.name} stores no mask overlaps (stores extracted before they were added lack them); re-extract it")
        paths = {"labels": "rois/labels", "ious": "rois/ious"}
        paths.update({c: f"rois/{c}" for c in columns})
        if level is not None:
            self._check_level(level)
            paths["features"] = f"feat/{level}"
        return {field: self.stage_path(path) for field, path in paths.items()}

    def select(self, images: np.ndarray | list[int] | None = None, *, require_complete: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """(image positions, int64 RoI counts) that :meth:`load` would read; unfinished images are
        refused (StoreIncompleteError) or, with ``require_complete=False``, dropped."""
        if images is None:
            sel = np.arange(self.num_images, dtype=np.int64)
        else:
            sel = np.asarray(images, dtype=np.int64).reshape(-1)
            if len(sel) and (sel.min() < 0 or sel.max() >= self.num_images):
                raise ConfigError(f"image positions must lie in [0, {self.num_images}) for split {self.name}")
            if len(np.unique(sel)) != len(sel):
                raise ConfigError(f"image positions for split {self.name} repeat an image; pass each image once")
        # Why per image for small selections: the whole-split marks are 2 file reads per image of
        # the split, which made a streaming step's 16-image read ~20x slower than its chunk reads.
        few = 4 * len(sel) < self.num_images
        finished = self._marks("images/done", sel) != 0 if few else self.done()[sel]
        if not finished.all():
            if require_complete:
                missing = sel[~finished]
                raise StoreIncompleteError(
                    f"split {self.name}: {len(missing)} of {len(sel)} requested images are not extracted yet "
                    f"({int(self.done().sum())}/{self.num_images} done, first missing image {int(missing[0])}); "
                    "finish the extraction (extract --resume)"
                )
            sel = sel[finished]
        if few:
            return sel, self._marks("images/num_rois", sel).astype(np.int64)
        return sel, self.num_rois()[sel]

    def _marks(self, path: str, sel: np.ndarray) -> np.ndarray:
        """Marks (``images/done`` or ``images/num_rois``) of the images ``sel`` only."""
        if len(sel) == 0:
            return np.zeros(0, dtype=self.array(path).dtype)
        return np.asarray(self.array(path).get_orthogonal_selection((np.asarray(sel, dtype=np.int64),)))

    def _read_array(self, path: str, sel: np.ndarray, counts: np.ndarray) -> np.ndarray:
        """Valid rows of ``sel``'s images from one array, compacted, in ``sel`` order."""
        return self._read_store_rows(path, self._rows(sel, counts))

    def _read_store_rows(self, path: str, rows: np.ndarray) -> np.ndarray:
        """Rows ``rows`` (int64 store rows, unique, any order) of array ``path``, in that order."""
        order = np.argsort(rows, kind="stable")
        ordered = rows[order]
        reader = self._reader(path)
        got = reader.read(ordered) if reader is not None else zarr_rows(self.array(path), ordered)
        if np.array_equal(order, np.arange(len(rows))):
            return got
        out = np.empty_like(got)
        out[order] = got
        return out

    def _rows(self, sel: np.ndarray, counts: np.ndarray) -> np.ndarray:
        """int64 store rows of the first ``counts[j]`` RoIs of each image ``sel[j]``."""
        if not len(sel):
            return np.zeros(0, dtype=np.int64)
        starts = np.repeat(sel * self.stride - np.concatenate([[0], np.cumsum(counts)[:-1]]), counts)
        return starts + np.arange(int(counts.sum()), dtype=np.int64)

    def read_rows(self, images: np.ndarray, rows: np.ndarray, *, level: str) -> np.ndarray:
        """Features of chosen RoIs only: float16 ``[n, *level_shape]`` for RoI ``rows[j]``
        (0-based within its image) of image ``images[j]``, in that order.

        Only the (inner) chunks holding those rows are decoded — what a streamed training batch
        uses, not every RoI of its images. The caller guarantees the images are done and the
        rows below their counts (e.g. from :meth:`load` with ``level=None``).
        """
        self._check_level(level)
        store_rows = np.asarray(images, dtype=np.int64) * self.stride + np.asarray(rows, dtype=np.int64)
        uniq, inverse = np.unique(store_rows, return_inverse=True)
        return self._read_store_rows(self.stage_path(f"feat/{level}"), uniq)[inverse]

    def _roiset(self, sel: np.ndarray, counts: np.ndarray, level: str | None, columns: tuple[str, ...], device: str | torch.device) -> RoiSet:
        paths = self._paths_for(level, tuple(columns))
        # numpy only, then zero-copy torch.from_numpy: no torch kernels run here, so the reader is
        # also safe in forked children whose parent already used torch's thread pool.
        cols = {}
        for field, path in paths.items():
            if field == "logits" and not self.store_logits:
                cols[field] = torch.from_numpy(recompute_logits(self, sel, counts))
                continue
            values = self._read_array(path, sel, counts)
            if field in ("labels", "gt_index"):  # RoiSet's index columns are int64
                values = values.astype(np.int64)
            cols[field] = torch.from_numpy(values)
        offsets = np.zeros(len(sel) + 1, dtype=np.int64)
        np.cumsum(counts, out=offsets[1:])
        image_index = np.repeat(sel, counts)
        roiset = RoiSet(image_index=torch.from_numpy(image_index), image_offsets=torch.from_numpy(offsets),
                        images=torch.from_numpy(sel.copy()), **cols)
        return roiset if torch.device(device).type == "cpu" else roiset.to(device)

    def image_block(self, i: int, *, level: str | None = None, columns: tuple[str, ...] = ()) -> RoiSet:
        """RoIs of image ``i`` alone. Raises StoreIncompleteError if
        the image is not extracted yet."""
        if not 0 <= i < self.num_images:
            raise ConfigError(f"image position {i} is outside split {self.name} (0..{self.num_images - 1})")
        sel = np.asarray([i], dtype=np.int64)
        if not self._marks("images/done", sel)[0]:
            raise StoreIncompleteError(f"image {i} of split {self.name} is not extracted yet; resume extraction")
        counts = self._marks("images/num_rois", sel).astype(np.int64)
        return self._roiset(sel, counts, level, columns, "cpu")

    def load(
        self,
        *,
        level: str | None = None,
        columns: tuple[str, ...] = (),
        device: str | torch.device = "cpu",
        images: np.ndarray | list[int] | None = None,
        require_complete: bool = True,
    ) -> RoiSet:
        """All valid rows (padding dropped) of the split, or of ``images`` in the given order.

        ``level`` goes to ``RoiSet.features`` as float16 ``[N, *level_shape]``; ``labels`` and
        ``ious`` are always read, ``columns`` (from ``records.ROI_COLUMNS``) on request. With
        ``require_complete=False`` unfinished images are skipped instead of refused.
        """
        sel, counts = self.select(images, require_complete=require_complete)
        return self._roiset(sel, counts, level, columns, device)

    def iter_blocks(
        self,
        *,
        level: str | None = None,
        columns: tuple[str, ...] = (),
        images_per_block: int = 256,
        images: np.ndarray | list[int] | None = None,
        require_complete: bool = True,
        device: str | torch.device = "cpu",
    ) -> Iterator[RoiSet]:
        """Like :meth:`load`, streamed as RoiSets of ``images_per_block`` consecutive selected images."""
        if images_per_block < 1:
            raise ConfigError(f"images_per_block is {images_per_block}; it must be >= 1")
        sel, counts = self.select(images, require_complete=require_complete)
        self._paths_for(level, tuple(columns))  # fail before the first block, not inside the loop
        for a in range(0, len(sel), images_per_block):
            yield self._roiset(sel[a:a + images_per_block], counts[a:a + images_per_block], level, columns, device)

    def __repr__(self) -> str:
        stage = "" if self.stage is None else f", stage={self.stage}"
        return f"SplitStore({self.name!r}, images={self.num_images}, stride={self.stride}, levels={list(self.levels)}{stage})"

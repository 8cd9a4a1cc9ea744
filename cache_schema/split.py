"""One split of a store: its image table, ground truth, completion marks, RoI readers and writer.

Fixed-stride RoI axis: image ``i`` owns rows ``[i*K, i*K + num_rois[i])`` of every RoI array,
``K`` = the split's ``roi_stride``; each image is exactly one chunk of each RoI array.
"""

from __future__ import annotations

import asyncio
from functools import cached_property
from typing import TYPE_CHECKING, Iterator

import numpy as np
import torch
import zarr
from zarr.core.sync import sync

from cache_schema.chunkio import ChunkFiles, read_marks, run_threaded
from cache_schema.errors import ChunkError, ConfigError, SchemaError, StoreIncompleteError
from cache_schema.layout import FEATURE_DTYPE, STAGE_ROI, roi_arrays, stage_arrays, stage_prefix
from cache_schema.meta import GtTable
from cache_schema.records import ROI_COLUMNS, RoiSet

if TYPE_CHECKING:
    from cache_schema.store import Store

# Images per zarr call on the fallback (non-local) read path: bounds the temporary copy.
_FALLBACK_WINDOW = 256


class SplitStore:
    """Reader and writer of one split. Obtain it with ``Store.split(name)``.

    Attributes:
        name: split name; ``num_images``: ``I``; ``stride``: ``K``; ``levels``: stored feature
        levels; ``with_masks``; ``mask_size``; ``has_gt_proposals``; ``num_classes``: ``C``;
        ``mask_overlaps``: GT columns of ``rois/mask_inter`` (0: the split has no mask overlaps);
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
        except KeyError as exc:
            raise SchemaError(f"split {name} lacks attribute {exc}; the store is damaged, re-extract it") from None
        self.num_classes = owner.meta.num_classes
        self._level_shapes = {lv: tuple(owner.meta.detector.levels[lv]) for lv in self.levels}
        self._roi_arrays = roi_arrays(num_classes=self.num_classes, with_masks=self.with_masks, mask_size=self.mask_size,
                                      mask_overlaps=self.mask_overlaps)
        self.num_stages = owner.meta.detector.num_stages
        self._roi_arrays.update(stage_arrays(num_classes=self.num_classes, num_stages=self.num_stages,
                                             levels=self._level_shapes))
        self.stage: int | None = None
        self._arrays: dict[str, zarr.Array] = {}
        self._files: dict[str, ChunkFiles | None] = {}

    # ----------------------------------------------------------------- arrays and tables
    def array(self, path: str) -> zarr.Array:
        """The zarr array at ``path`` inside the split (e.g. ``"rois/boxes"``, ``"feat/fc"``)."""
        if path not in self._arrays:
            try:
                node = self.group[path]
            except KeyError:
                raise SchemaError(f"split {self.name} lacks array {path}; the store is damaged, run `roicache cache validate`") from None
            # write_empty_chunks is a run-time setting, not stored: without it zarr skips (and
            # deletes) all-zero chunks, which validation would then report as missing.
            self._arrays[path] = node.with_config({"write_empty_chunks": True})
        return self._arrays[path]

    def _chunk_files(self, path: str) -> ChunkFiles | None:
        if path not in self._files:
            self._files[path] = ChunkFiles.for_array(self.array(path))
        return self._files[path]

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
        return read_marks(self.array("images/num_rois")).astype(np.int64)

    def done(self) -> np.ndarray:
        """bool ``[I]``, image extraction finished. Re-read on each call."""
        return read_marks(self.array("images/done")) != 0

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

    # ----------------------------------------------------------------- writing
    def write_image(self, i: int, *, arrays: dict[str, np.ndarray]) -> None:
        """Write image ``i``'s RoIs: every RoI array (keys ``"rois/<name>"`` and ``"feat/<level>"``,
        each ``[n, *trailing]``, ``n <= K``) together with ``num_rois[i]``, then ``done[i]`` last.

        Arrays are cast to the stored dtype when the cast is same-kind (e.g. float32 features to
        float16); padding rows are zeros. Each array write is one whole chunk, so processes
        writing different images never touch the same file.
        """
        if not self._owner.writable:
            raise ConfigError(f"store {self._owner.path} is open read-only; open it with mode='r+' or open_for_resume")
        if self._owner.is_complete:
            raise SchemaError(f"store {self._owner.path} is finalized; clear the images first with `roicache cache invalidate`")
        if not 0 <= i < self.num_images:
            raise SchemaError(f"image position {i} is outside split {self.name} (0..{self.num_images - 1})")
        padded, n = self._prepare(i, arrays)
        k = self.stride
        done = self.array("images/done")
        if self._mark("images/done", i):
            # Clear the mark first so that a crash while rewriting an image leaves it "not done".
            done[i] = 0
        counts = np.asarray([n], dtype=np.int32)
        targets = [(self.array(p).async_array, slice(i * k, (i + 1) * k), v) for p, v in padded.items()]
        targets.append((self.array("images/num_rois").async_array, slice(i, i + 1), counts))

        async def put_all() -> None:
            # Every array of the image (and its count) at once: zarr overlaps encoding and file
            # writes (~2x faster than one by one). Readers trust num_rois only once done is set.
            await asyncio.gather(*(arr.setitem(sel, v) for arr, sel, v in targets))

        sync(put_all())
        done[i] = 1

    def _mark(self, path: str, i: int) -> int:
        """One completion mark (``images/done`` or ``images/num_rois``) of image ``i``."""
        files = self._chunk_files(path)
        if files is None:
            return int(self.array(path)[i])
        value = files.read(i)
        return 0 if value is None else int(value[0])

    def _prepare(self, i: int, arrays: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], int]:
        expected = self.roi_array_paths()
        missing = sorted(set(expected) - set(arrays))
        extra = sorted(set(arrays) - set(expected))
        if missing or extra:
            raise SchemaError(f"write_image({self.name}, {i}): missing arrays {missing}, unexpected arrays {extra}; pass exactly {sorted(expected)}")
        n = int(np.asarray(arrays["rois/labels"]).shape[0])
        if n > self.stride:
            raise SchemaError(f"image {i} of split {self.name} has {n} RoIs, more than the stride K={self.stride}; create the store with a larger stride")
        padded = {}
        for path, (dtype, trailing) in expected.items():
            value = np.asarray(arrays[path])
            if value.shape != (n, *trailing):
                raise SchemaError(f"write_image({self.name}, {i}): {path} has shape {value.shape}, expected {(n, *trailing)}")
            if value.dtype != dtype and not (np.can_cast(value.dtype, dtype, casting="same_kind") and (value.dtype == np.bool_) == (dtype == np.bool_)):
                raise SchemaError(f"write_image({self.name}, {i}): {path} has dtype {value.dtype}, expected {dtype}")
            chunk = np.zeros((self.stride, *trailing), dtype=dtype)
            chunk[:n] = value
            padded[path] = chunk
        labels, gti = padded["rois/labels"][:n], padded["rois/gt_index"][:n]
        if n and (labels.min() < 0 or labels.max() > self.num_classes):
            raise SchemaError(f"write_image({self.name}, {i}): labels must lie in [0, {self.num_classes}] (background = {self.num_classes})")
        if n and (gti.min() < -1 or gti.max() >= self.num_gt):
            raise SchemaError(f"write_image({self.name}, {i}): gt_index must lie in [-1, {self.num_gt})")
        return padded, n

    def clear_done(self, images: np.ndarray | list[int]) -> None:
        """Reset the done marks of ``images`` (use ``Store.invalidate``, which also clears ``complete``)."""
        if not self._owner.writable:
            raise ConfigError(f"store {self._owner.path} is open read-only; open it with mode='r+'")
        done = self.array("images/done")
        for i in np.asarray(images, dtype=np.int64).reshape(-1):
            done[int(i)] = 0

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
        finished = np.array([self._mark("images/done", int(i)) != 0 for i in sel], dtype=bool) if few else self.done()[sel]
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
            return sel, np.array([self._mark("images/num_rois", int(i)) for i in sel], dtype=np.int64)
        return sel, self.num_rois()[sel]

    def _read_array(self, path: str, sel: np.ndarray, counts: np.ndarray) -> np.ndarray:
        """Valid rows of ``sel``'s images from one array, compacted, in ``sel`` order."""
        dtype, trailing = self.roi_array_paths()[path]
        offsets = np.zeros(len(sel) + 1, dtype=np.int64)
        np.cumsum(counts, out=offsets[1:])
        out = np.empty((int(offsets[-1]), *trailing), dtype=dtype)
        files = self._chunk_files(path)
        if files is not None:
            def one(j: int) -> None:
                chunk = files.read(int(sel[j]))
                if chunk is None:
                    raise ChunkError(f"split {self.name}: {path} has no chunk for finished image {int(sel[j])}; run `roicache cache validate`")
                out[offsets[j]:offsets[j + 1]] = chunk[: counts[j]]
            run_threaded(one, np.flatnonzero(counts))
            return out
        arr, k = self.array(path), self.stride
        for a in range(0, len(sel), _FALLBACK_WINDOW):
            b = min(a + _FALLBACK_WINDOW, len(sel))
            rows = np.concatenate([np.arange(s * k, s * k + c) for s, c in zip(sel[a:b], counts[a:b])] + [np.zeros(0, np.int64)])
            if len(rows):
                out[offsets[a]:offsets[b]] = arr.get_orthogonal_selection((rows,))
        return out

    def _roiset(self, sel: np.ndarray, counts: np.ndarray, level: str | None, columns: tuple[str, ...], device: str | torch.device) -> RoiSet:
        paths = self._paths_for(level, tuple(columns))
        # numpy only, then zero-copy torch.from_numpy: no torch kernels run here, so the reader is
        # also safe in forked children whose parent already used torch's thread pool.
        cols = {}
        for field, path in paths.items():
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
        """RoIs of image ``i`` alone (one chunk read per array). Raises StoreIncompleteError if
        the image is not extracted yet."""
        if not 0 <= i < self.num_images:
            raise ConfigError(f"image position {i} is outside split {self.name} (0..{self.num_images - 1})")
        sel = np.asarray([i], dtype=np.int64)
        if not self._mark("images/done", i):
            raise StoreIncompleteError(f"image {i} of split {self.name} is not extracted yet; resume extraction")
        counts = np.asarray([self._mark("images/num_rois", i)], dtype=np.int64)
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

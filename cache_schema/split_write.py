"""The write side of a split (:class:`cache_schema.split.SplitStore` inherits it): commit blocks
of images, their RoI arrays first and their completion marks last (docs/cache.md, Completion)."""

from __future__ import annotations

import asyncio

import numpy as np
from zarr.core.sync import sync

from cache_schema.errors import ConfigError, SchemaError
from cache_schema.rowio import BlockWriter, io_pool


class SplitWriter:
    """Writing methods of ``SplitStore``; they use its ``array``, ``roi_array_paths``, ``stride``,
    ``num_images``, ``num_classes``, ``num_gt``, ``row_order`` and owning store."""

    def write_image(self, i: int, *, arrays: dict[str, np.ndarray]) -> None:
        """Write image ``i``'s RoIs (one-image :meth:`write_block`; in schema 2 this rewrites the
        objects the image shares with its block, so writers of many images use ``write_block``)."""
        self.write_block(i, [arrays])

    def write_block(self, start: int, images: list[dict[str, np.ndarray]]) -> None:
        """Write images ``start .. start+len(images)-1``: every RoI array (keys ``"rois/<name>"`` and
        ``"feat/<level>"``, each ``[n, *trailing]``, ``n <= K``) with their ``num_rois``, then their
        ``done`` marks last.

        Arrays are cast to the stored dtype when the cast is same-kind (e.g. float32 features to
        float16); padding rows are zeros. Writers running concurrently must own whole commit blocks
        (``image_block`` images from a multiple of it): then no two write the same object, and a
        whole block is one write per array.
        """
        if not self._owner.writable:
            raise ConfigError(f"store {self._owner.path} is open read-only; open it with mode='r+' or open_for_resume")
        if self._owner.is_complete:
            raise SchemaError(f"store {self._owner.path} is finalized; clear the images first with `roicache cache invalidate`")
        n_img = len(images)
        if n_img == 0 or not (0 <= start and start + n_img <= self.num_images):
            raise SchemaError(f"images {start}..{start + n_img - 1} are outside split {self.name} (0..{self.num_images - 1})")
        k, stop = self.stride, start + n_img
        prepared = [self._prepare(start + j, arrays) for j, arrays in enumerate(images)]
        done = self.array("images/done")
        if np.asarray(done[start:stop]).any():
            # Clear the marks first so that a crash while rewriting leaves the images "not done".
            done[start:stop] = 0
        counts = np.asarray([n for _, n in prepared], dtype=np.int32)
        targets, direct = [], []
        for path, (dtype, trailing) in self.roi_array_paths().items():
            block = np.zeros((n_img * k, *trailing), dtype=dtype)
            for j, (values, n) in enumerate(prepared):
                block[j * k:j * k + n] = values[path]
            writer = self._writer(path)
            if writer is not None and writer.aligned(start * k, stop * k):
                direct.append((writer, block))
            else:
                targets.append((self.array(path).async_array, slice(start * k, stop * k), block))
        targets.append((self.array("images/num_rois").async_array, slice(start, stop), counts))

        async def put_all() -> None:
            # Every zarr-written array (and the counts) at once: zarr overlaps encoding and writes.
            # Readers trust num_rois only once done is set.
            await asyncio.gather(*(arr.setitem(sel, v) for arr, sel, v in targets))

        # Whole objects of a local store: encoded and written directly, one thread per array
        # (Blosc and crc32c release the GIL), while zarr writes the rest.
        futures = [io_pool().submit(w.write, start * k, b) for w, b in direct]
        sync(put_all())
        for f in futures:
            f.result()
        done[start:stop] = 1

    def _writer(self, path: str) -> BlockWriter | None:
        if path not in self._writers:
            self._writers[path] = BlockWriter.for_array(self.array(path))
        return self._writers[path]

    def _prepare(self, i: int, arrays: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], int]:
        expected = self.roi_array_paths()
        missing = sorted(set(expected) - set(arrays))
        extra = sorted(set(arrays) - set(expected))
        if missing or extra:
            raise SchemaError(f"write_image({self.name}, {i}): missing arrays {missing}, unexpected arrays {extra}; pass exactly {sorted(expected)}")
        n = int(np.asarray(arrays["rois/labels"]).shape[0])
        if n > self.stride:
            raise SchemaError(f"image {i} of split {self.name} has {n} RoIs, more than the stride K={self.stride}; create the store with a larger stride")
        checked = {}
        for path, (dtype, trailing) in expected.items():
            value = np.asarray(arrays[path])
            if value.shape != (n, *trailing):
                raise SchemaError(f"write_image({self.name}, {i}): {path} has shape {value.shape}, expected {(n, *trailing)}")
            if value.dtype != dtype and not (np.can_cast(value.dtype, dtype, casting="same_kind") and (value.dtype == np.bool_) == (dtype == np.bool_)):
                raise SchemaError(f"write_image({self.name}, {i}): {path} has dtype {value.dtype}, expected {dtype}")
            checked[path] = value
        labels, gti = checked["rois/labels"], checked["rois/gt_index"]
        if n and (labels.min() < 0 or labels.max() > self.num_classes):
            raise SchemaError(f"write_image({self.name}, {i}): labels must lie in [0, {self.num_classes}] (background = {self.num_classes})")
        if n and (gti.min() < -1 or gti.max() >= self.num_gt):
            raise SchemaError(f"write_image({self.name}, {i}): gt_index must lie in [-1, {self.num_gt})")
        if self.row_order == "label" and n and (np.diff(labels) < 0).any():
            raise SchemaError(f"write_image({self.name}, {i}): this split keeps rows sorted by label; sort them (stable) first")
        return checked, n

    def clear_done(self, images: np.ndarray | list[int]) -> None:
        """Reset the done marks of ``images`` (use ``Store.invalidate``, which also clears ``complete``)."""
        if not self._owner.writable:
            raise ConfigError(f"store {self._owner.path} is open read-only; open it with mode='r+'")
        done = self.array("images/done")
        for i in np.asarray(images, dtype=np.int64).reshape(-1):
            done[int(i)] = 0

"""Where head training reads cached RoIs from.

A :class:`RoiSource` is two things: a :class:`RoiIndex` (labels of *every* train RoI, grouped by
image — small, always in memory, what the samplers draw from) and ``gather(rows)``, which returns
the features of a list of RoI rows. Rows are *global*: positions in the index's concatenation of
images. Two implementations:

- :class:`InMemoryRoiSource` — one loaded :class:`~cache_schema.records.RoiSet` with features
  (CPU or GPU); ``gather`` is one indexing op.
- :class:`StreamingRoiSource` — a label-only RoiSet for the index plus either
  ``fetch_rows(positions, rows) -> features`` (the store's row reads: only the inner chunks
  holding the asked rows are decoded) or ``fetch_images(positions) -> RoiSet`` (whole images, e.g.
  the detector run online); ``gather`` picks the asked rows out.

Both return bit-identical features for the same rows, so a seed gives the same run on either.
:func:`gathered_batches` reads a streaming source's next batches on a background thread while
the current step computes (the sampler is a pure function of the step, so prefetching changes
nothing but the wall time).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from cache_schema.errors import SchemaError, StoreMismatchError
from cache_schema.records import RoiSet


class NonFiniteFeatureError(SchemaError):
    """Cached features contain NaN or infinity (a corrupt or half-written chunk)."""


@dataclass(frozen=True, eq=False)
class RoiIndex:
    """Labels of all train RoIs, grouped by image; what samplers draw rows from.

    Attributes:
        labels: int64 ``[N]``, ``0..C-1`` foreground class, ``C`` background.
        image_offsets: int64 ``[B+1]``; rows of block ``j`` are ``image_offsets[j]:image_offsets[j+1]``.
        images: int64 ``[B]``, split position of each block (the positions ClassInfo's CSR uses).
        num_classes: ``C``.
    """

    labels: np.ndarray
    image_offsets: np.ndarray
    images: np.ndarray
    num_classes: int

    def __post_init__(self) -> None:
        n = len(self.labels)
        if self.image_offsets.shape != (len(self.images) + 1,) or int(self.image_offsets[-1]) != n:
            raise SchemaError("RoiIndex: image_offsets do not partition the label rows; rebuild it from a RoiSet")
        if n and (int(self.labels.min()) < 0 or int(self.labels.max()) > self.num_classes):
            raise SchemaError(
                f"RoiIndex: labels span {int(self.labels.min())}..{int(self.labels.max())} but the class table "
                f"has C={self.num_classes} (background={self.num_classes}); the store and ClassInfo disagree")
        if len(np.unique(self.images)) != len(self.images):
            raise SchemaError("RoiIndex: an image position appears twice; load each train image once")

    @classmethod
    def from_roiset(cls, roiset: RoiSet, *, num_classes: int) -> "RoiIndex":
        """Index of ``roiset`` (features are not touched; a label-only RoiSet suffices)."""
        return cls(labels=roiset.labels.detach().cpu().numpy().astype(np.int64, copy=False),
                   image_offsets=roiset.image_offsets.detach().cpu().numpy().astype(np.int64, copy=False),
                   images=roiset.images.detach().cpu().numpy().astype(np.int64, copy=False),
                   num_classes=num_classes)

    @property
    def num_rows(self) -> int:
        return int(len(self.labels))

    @property
    def num_blocks(self) -> int:
        return int(len(self.images))

    def block_of_position(self) -> np.ndarray:
        """int64 lookup ``[max_position+1]``: block of a split position, ``-1`` when absent."""
        size = int(self.images.max()) + 1 if len(self.images) else 0
        lut = np.full(size, -1, dtype=np.int64)
        lut[self.images] = np.arange(len(self.images), dtype=np.int64)
        return lut

    def rows_of_blocks(self, blocks: np.ndarray) -> np.ndarray:
        """Global rows of ``blocks`` (int64), block after block, in store order."""
        blocks = np.asarray(blocks, dtype=np.int64)
        starts = self.image_offsets[blocks]
        counts = self.image_offsets[blocks + 1] - starts
        total = int(counts.sum())
        if total == 0:
            return np.zeros(0, dtype=np.int64)
        # Vectorised concat of ranges: a running index minus each range's shifted start.
        shift = np.repeat(starts - np.concatenate(([0], np.cumsum(counts)[:-1])), counts)
        return np.arange(total, dtype=np.int64) + shift

    def blocks_of_rows(self, rows: np.ndarray) -> np.ndarray:
        """Block of each global row (int64)."""
        return np.searchsorted(self.image_offsets, rows, side="right").astype(np.int64) - 1


class RoiSource(Protocol):
    """What :func:`heads.train.train_head` reads: an index and a row gatherer."""

    index: RoiIndex

    @property
    def feature_shape(self) -> tuple[int, ...]:
        """Per-RoI feature shape of the loaded level, e.g. ``(64, 7, 7)`` or ``(1024,)``."""

    def gather(self, rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Features ``[n, *feature_shape]`` (stored dtype, source device) and int64 labels ``[n]``
        of global rows ``rows`` (int64 ``[n]``), in that order."""


class InMemoryRoiSource:
    """All train RoIs in one RoiSet (features loaded; any device)."""

    def __init__(self, *, roiset: RoiSet, num_classes: int) -> None:
        if roiset.features is None:
            raise SchemaError("in-memory RoI source needs features; load the split with level='pooled' or 'fc'")
        self.roiset = roiset
        self.index = RoiIndex.from_roiset(roiset, num_classes=num_classes)

    @property
    def feature_shape(self) -> tuple[int, ...]:
        return tuple(int(s) for s in self.roiset.features.shape[1:])

    def gather(self, rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        feats = self.roiset.features
        idx = torch.from_numpy(np.ascontiguousarray(rows, dtype=np.int64)).to(feats.device)
        labels = torch.from_numpy(self.index.labels[rows])
        return feats[idx], labels


class StreamingRoiSource:
    """Train RoIs read from the store (or a detector) batch by batch.

    Args:
        index_roiset: label-only RoiSet of the whole train split (``load(level=None)``).
        fetch_rows: ``(positions int64 [n], rows int64 [n]) -> features [n, *shape]``: RoI
            ``rows[j]`` (0-based within its image) of image ``positions[j]`` (e.g.
            ``SplitStore.read_rows``).
        fetch_images: ``positions (int64 [k], ascending) -> RoiSet`` with features of exactly
            those images, in that order (used when ``fetch_rows`` is not given).
        num_classes: ``C``.
        feature_shape: per-RoI shape; read from the first non-empty image when ``None``.
        prefetch_depth: batches :func:`gathered_batches` reads ahead on a background thread.
    """

    def __init__(self, *, index_roiset: RoiSet, num_classes: int,
                 fetch_rows: Callable[[np.ndarray, np.ndarray], np.ndarray | torch.Tensor] | None = None,
                 fetch_images: Callable[[np.ndarray], RoiSet] | None = None,
                 feature_shape: tuple[int, ...] | None = None, prefetch_depth: int = 2) -> None:
        if (fetch_rows is None) == (fetch_images is None):
            raise ValueError("StreamingRoiSource needs exactly one of fetch_rows and fetch_images")
        self.index = RoiIndex.from_roiset(index_roiset, num_classes=num_classes)
        self.fetch_rows, self.fetch_images = fetch_rows, fetch_images
        self._feature_shape = tuple(feature_shape) if feature_shape is not None else None
        self.prefetch_depth = int(prefetch_depth)

    @classmethod
    def from_split(cls, split, *, level: str, num_classes: int) -> "StreamingRoiSource":
        """Bind to a store split (``cache_schema`` ``SplitStore``): the index from
        ``split.load(level=None)`` (labels only), features from ``split.read_rows``."""
        return cls(index_roiset=split.load(level=None),
                   fetch_rows=lambda positions, rows: split.read_rows(positions, rows, level=level),
                   num_classes=num_classes, feature_shape=tuple(split.level_shape(level)))

    @property
    def feature_shape(self) -> tuple[int, ...]:
        if self._feature_shape is None:
            counts = np.diff(self.index.image_offsets)
            nonempty = np.flatnonzero(counts)
            if len(nonempty) == 0:
                raise SchemaError("streaming RoI source: the train split has no RoIs; extract it first")
            feats, _ = self.gather(self.index.rows_of_blocks(nonempty[:1])[:1])
            self._feature_shape = tuple(int(s) for s in feats.shape[1:])
        return self._feature_shape

    def gather(self, rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        rows = np.asarray(rows, dtype=np.int64)
        index = self.index
        blocks = index.blocks_of_rows(rows)
        if self.fetch_rows is not None:
            feats = self.fetch_rows(index.images[blocks], rows - index.image_offsets[blocks])
            feats = torch.from_numpy(np.ascontiguousarray(feats)) if isinstance(feats, np.ndarray) else feats
            if tuple(feats.shape[:1]) != (len(rows),):
                raise StoreMismatchError("fetch_rows returned another number of rows than asked; bind it to the same split")
            return feats, torch.from_numpy(index.labels[rows])
        uniq, where = np.unique(blocks, return_inverse=True)
        positions = index.images[uniq]
        got = self.fetch_images(positions)
        self._check_fetched(got, uniq, positions)
        local_starts = got.image_offsets.detach().cpu().numpy()[:-1]
        local = local_starts[where] + (rows - index.image_offsets[blocks])
        idx = torch.from_numpy(local).to(got.features.device)
        return got.features[idx], torch.from_numpy(index.labels[rows])

    def _check_fetched(self, got: RoiSet, blocks: np.ndarray, positions: np.ndarray) -> None:
        # Why check: a fetch bound to another store or level would silently train on wrong rows.
        if got.features is None:
            raise SchemaError("fetch_images returned no features; bind it with level='pooled' or 'fc'")
        if not np.array_equal(got.images.detach().cpu().numpy(), positions):
            raise StoreMismatchError("fetch_images returned other images than asked; bind it to the same split")
        want = self.index.image_offsets[blocks + 1] - self.index.image_offsets[blocks]
        have = np.diff(got.image_offsets.detach().cpu().numpy())
        if not np.array_equal(want, have):
            raise StoreMismatchError("fetch_images returned other RoI counts than the index; the index and the "
                                     "fetch must come from the same store")


def gathered_batches(sampler, source: RoiSource, steps: range) -> Iterator[tuple[int, object, torch.Tensor, torch.Tensor]]:
    """``(step, batch, features, labels)`` for each step: ``sampler.batch(step)`` and
    ``source.gather(batch.rows)``. A source with ``prefetch_depth > 0`` is read that many steps
    ahead on one background thread (reads release the GIL in decompression and I/O, so they
    overlap the step's compute); an error in a read surfaces at its own step."""
    depth = int(getattr(source, "prefetch_depth", 0))

    def load(step: int) -> tuple:
        batch = sampler.batch(step)
        return (batch, *source.gather(batch.rows))

    if depth <= 0:
        for step in steps:
            yield (step, *load(step))
        return
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="roicache-prefetch")
    try:
        todo, pending = iter(steps), deque()
        for step in todo:
            pending.append((step, pool.submit(load, step)))
            if len(pending) >= depth:
                break
        while pending:
            step, future = pending.popleft()
            following = next(todo, None)
            if following is not None:
                pending.append((following, pool.submit(load, following)))
            yield (step, *future.result())
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def check_finite(features: torch.Tensor, *, what: str) -> None:
    """Raise :class:`NonFiniteFeatureError` when ``features`` holds NaN/inf.

    Why the sum first: a NaN or infinity anywhere makes the sum NaN or infinite, so a finite sum
    proves every element finite at the cost of one reduction; the element-wise test (~6 ms per
    training batch on one CPU thread, a fifth of a 3fc_ft step) runs only when the sum is not
    finite, which float32 overflow of large finite values can also cause.
    """
    if features.numel() and bool(torch.isfinite(features.sum())):
        return
    if not bool(torch.isfinite(features).all()):
        raise NonFiniteFeatureError(
            f"{what}: cached features contain NaN or infinity; re-extract the affected images "
            f"(or run `roicache cache validate`) before training")


__all__ = ["RoiIndex", "RoiSource", "InMemoryRoiSource", "StreamingRoiSource", "NonFiniteFeatureError",
           "check_finite"]

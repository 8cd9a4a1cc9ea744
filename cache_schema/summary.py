"""A human-readable summary of a store: sizes, foreground ratio, class bins, bytes per RoI."""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from cache_schema.store import open_store

BIN_EDGES = (10, 100, 1000)
"""Training-instance-count bins (0,10), [10,100), [100,1000), [1000,inf) — AP1..AP4 of SimCal."""
BIN_NAMES = ("<10", "10-99", "100-999", ">=1000")


def class_bins(instance_count: np.ndarray, edges: tuple[int, ...] = BIN_EDGES) -> np.ndarray:
    """Bin index (0-based) of each class by training instance count; counts below ``edges[0]``
    (including 0) fall in bin 0."""
    return np.searchsorted(np.asarray(edges), np.asarray(instance_count), side="right")


@dataclass(frozen=True, kw_only=True)
class LevelSummary:
    """One stored feature level: per-RoI shape and bytes (raw float16 vs compressed on disk)."""

    name: str
    shape: tuple[int, ...]
    raw_bytes_per_roi: float
    stored_bytes_per_roi: float | None  # None while the split has no RoIs


@dataclass(frozen=True, kw_only=True)
class SplitSummary:
    """One split. ``fg_rois_per_bin``: foreground RoIs whose class falls in each instance-count bin."""

    name: str
    num_images: int
    done_images: int
    stride: int
    num_rois: int
    foreground_ratio: float
    fg_rois_per_bin: tuple[int, ...]
    levels: tuple[LevelSummary, ...]
    with_masks: bool
    stored_bytes: int  # RoI and feature arrays on disk


@dataclass(frozen=True, kw_only=True)
class StoreSummary:
    """What :func:`inspect_store` found; ``format()`` renders it for a terminal."""

    path: str
    complete: bool
    num_classes: int
    detector: str
    classes_per_bin: tuple[int, ...]
    splits: tuple[SplitSummary, ...]

    def format(self) -> str:
        lines = [
            f"store {self.path}  ({'complete' if self.complete else 'INCOMPLETE'})",
            f"detector {self.detector}, {self.num_classes} classes",
            "classes per training-instance bin: " + ", ".join(f"{n} {c}" for n, c in zip(BIN_NAMES, self.classes_per_bin)),
        ]
        for s in self.splits:
            lines.append(
                f"[{s.name}] images {s.done_images}/{s.num_images} done, RoIs {s.num_rois:,} (stride {s.stride}), "
                f"foreground {100 * s.foreground_ratio:.1f}%, masks {'yes' if s.with_masks else 'no'}, "
                f"stored {s.stored_bytes / 2**20:.1f} MiB"
            )
            lines.append("  fg RoIs per bin: " + ", ".join(f"{n} {c:,}" for n, c in zip(BIN_NAMES, s.fg_rois_per_bin)))
            for lv in s.levels:
                stored = "n/a" if lv.stored_bytes_per_roi is None else f"{lv.stored_bytes_per_roi:,.0f} B"
                ratio = "" if lv.stored_bytes_per_roi is None else f" ({lv.stored_bytes_per_roi / lv.raw_bytes_per_roi:.2f} of raw)"
                lines.append(f"  level {lv.name} {list(lv.shape)}: {stored}/RoI stored{ratio}, {lv.raw_bytes_per_roi:,.0f} B/RoI raw float16")
        return "\n".join(lines)


def inspect_store(path: str | os.PathLike) -> StoreSummary:
    """Summarise a store (complete or not): reads the completion marks and RoI labels only."""
    store = open_store(path)
    classes = store.classes
    bins = class_bins(classes.instance_count)
    n_bins = len(BIN_EDGES) + 1
    c = store.meta.num_classes
    splits = []
    for name in store.splits:
        split = store.split(name)
        labels = split.load(require_complete=False).labels.numpy()
        n = int(labels.shape[0])
        fg = labels[labels < c]
        levels = []
        for lv in split.levels:
            shape = split.level_shape(lv)
            stored = split.stored_nbytes(f"feat/{lv}")
            levels.append(LevelSummary(
                name=lv, shape=shape, raw_bytes_per_roi=float(np.prod(shape) * 2),
                stored_bytes_per_roi=stored / n if n else None,
            ))
        splits.append(SplitSummary(
            name=name, num_images=split.num_images, done_images=int(split.done().sum()), stride=split.stride,
            num_rois=n, foreground_ratio=float(len(fg) / n) if n else 0.0,
            fg_rois_per_bin=tuple(int(x) for x in np.bincount(bins[fg], minlength=n_bins)),
            levels=tuple(levels), with_masks=split.with_masks, stored_bytes=sum(split.stored_nbytes(p) for p in split.roi_array_paths()),
        ))
    det = store.meta.detector
    return StoreSummary(
        path=store.path, complete=store.is_complete, num_classes=c,
        detector=f"{det.backend} (checkpoint sha256 {det.checkpoint_sha256[:12]}...)",
        classes_per_bin=tuple(int(x) for x in np.bincount(bins, minlength=n_bins)), splits=tuple(splits),
    )

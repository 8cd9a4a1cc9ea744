"""Locate the stored object (shard or chunk file) holding an image's rows, to damage it in tests."""

from __future__ import annotations

from pathlib import Path

from cache_schema import open_store
from cache_schema.validate import object_key


def object_of(path: Path, split: str, array: str, image: int) -> tuple[Path, list[int]]:
    """(file of the object holding ``image``'s rows of ``array``, every image with RoIs that object
    holds — the images validation names when it is lost)."""
    s = open_store(path).split(split)
    arr = s.array(array)
    rows = (arr.shards or arr.chunks)[0]
    per_image = 1 if array.startswith("images/") else s.stride
    counts = s.num_rois()
    holders = [i for i in range(s.num_images)
               if i * per_image // rows == image * per_image // rows and (per_image == 1 or counts[i] > 0)]
    return Path(path) / object_key(arr, image * per_image), holders


def describe(images: list[int], stride: int) -> str:
    """How validation names images, run by run: ``image 0 (rows 0-15), images 2-3 (rows 32-63)``."""
    runs: list[list[int]] = []
    for i in images:
        if runs and i == runs[-1][-1] + 1:
            runs[-1].append(i)
        else:
            runs.append([i])
    parts = []
    for run in runs:
        a, b = run[0], run[-1]
        name = f"image {a}" if a == b else f"images {a}-{b}"
        parts.append(f"{name} (rows {a * stride}-{(b + 1) * stride - 1})")
    return ", ".join(parts)

"""Export a complete store to one HDF5 file (h5py), for people who want a single file.

Same hierarchy as the store (``classes/``, ``<split>/images|rois|feat|gt``) with two
differences: RoI rows are *compact* (padding dropped; image ``i``'s rows are
``images/roi_offsets[i]:images/roi_offsets[i+1]``), and attributes are JSON strings
(root ``roicache``; each split group ``roicache_split``). Written to a temporary name and renamed,
so an interrupted export never leaves a file that looks complete.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

import h5py
import numpy as np

from cache_schema.layout import COMPLETE_ATTR, ROOT_ATTR, STAGE_ROI
from cache_schema.records import ROI_COLUMNS
from cache_schema.store import Store, open_store
from cache_schema.split import SplitStore

H5_LAYOUT = "compact-v1"
_BLOCK_IMAGES = 256


def _create(group: h5py.Group, name: str, shape: tuple[int, ...], dtype: np.dtype) -> h5py.Dataset:
    if shape[0] == 0:  # HDF5 cannot chunk (and so cannot compress) an empty dataset
        return group.create_dataset(name, shape=shape, dtype=dtype)
    row_bytes = max(1, int(np.prod(shape[1:], dtype=np.int64)) * np.dtype(dtype).itemsize)
    rows = int(max(1, min(shape[0], (1 << 20) // row_bytes)))  # ~1 MiB chunks
    return group.create_dataset(name, shape=shape, dtype=dtype, chunks=(rows, *shape[1:]), compression="gzip", compression_opts=4, shuffle=True)


def _write_table(group: h5py.Group, name: str, values: np.ndarray) -> None:
    if values.dtype.kind in "TUO":
        group.create_dataset(name, data=[str(v) for v in values], dtype=h5py.string_dtype("utf-8"))
    else:
        _create(group, name, values.shape, values.dtype)[...] = values


def _export_split(h5: h5py.File, split: SplitStore, levels: tuple[str, ...]) -> None:
    g = h5.create_group(split.name)
    g.attrs["roicache_split"] = json.dumps(split.group.attrs.asdict(), sort_keys=True)
    _, counts = split.select(require_complete=True)  # every image, in order; refuses an incomplete split
    offsets = np.zeros(split.num_images + 1, dtype=np.int64)
    np.cumsum(counts, out=offsets[1:])
    total = int(offsets[-1])
    for name in ("id", "height", "width", "file_name"):
        _write_table(g, f"images/{name}", np.asarray(split.array(f"images/{name}")[:]))
    _write_table(g, "images/num_rois", counts.astype(np.int32))
    _write_table(g, "images/roi_offsets", offsets)
    for name in ("boxes", "labels", "image", "area", "ann_id"):
        _write_table(g, f"gt/{name}", np.asarray(split.array(f"gt/{name}")[:]))
    specs = split.roi_array_paths()
    datasets = {path: _create(g, path, (total, *trailing), dtype) for path, (dtype, trailing) in specs.items()
                if "feat/" not in path or path.rsplit("/", 1)[1] in levels}
    columns = tuple(c for c in ROI_COLUMNS if f"rois/{c}" in specs)
    # First pass: every rois/* column plus the first level; one extra pass per further level.
    passes = [(split, levels[0] if levels else None, columns)] + [(split, lv, ()) for lv in levels[1:]]
    # A cascade's stage groups: stage 0's own logits, then each later stage's arrays and levels.
    for k in range(1, split.num_stages) if split.num_stages > 1 else ():
        stage = split.at_stage(k)
        stored = tuple(c for c in STAGE_ROI if stage.stage_path(f"rois/{c}") in specs)
        passes += [(stage, levels[0] if levels else None, stored)] + [(stage, lv, ()) for lv in levels[1:]]
    if split.num_stages > 1 and split.at_stage(0).stage_path("rois/logits") in specs:
        passes.append((split.at_stage(0), None, ("logits",)))
    for reader, level, cols in passes:
        for block in reader.iter_blocks(level=level, columns=tuple(c for c in cols if c not in ("labels", "ious")),
                                        images_per_block=_BLOCK_IMAGES):
            a = int(offsets[int(block.images[0])])
            b = a + len(block)
            values = {reader.stage_path(f"rois/{c}"): getattr(block, c) for c in dict.fromkeys(("labels", "ious", *cols))}
            if level is not None:
                values[reader.stage_path(f"feat/{level}")] = block.features
            for path, tensor in values.items():
                datasets[path][a:b] = tensor.numpy().astype(specs[path][0], copy=False)


def export_hdf5(
    store_path: str | os.PathLike,
    h5_path: str | os.PathLike,
    *,
    splits: tuple[str, ...] | list[str] | None = None,
    levels: tuple[str, ...] | list[str] | None = None,
) -> Path:
    """Write ``splits`` (default all) with ``levels`` (default each split's stored levels) of a
    store to ``h5_path``; every exported split must be complete. Returns the final path."""
    store: Store = open_store(store_path)
    names = tuple(splits) if splits is not None else store.splits
    for name in names:
        store.split(name)  # unknown split -> ConfigError before any file is created
    out = Path(h5_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f"{out.name}.partial-{uuid.uuid4().hex[:8]}")
    try:
        with h5py.File(tmp, "w") as h5:
            h5.attrs[ROOT_ATTR] = json.dumps(store.meta.to_dict(), sort_keys=True)
            h5.attrs[COMPLETE_ATTR] = store.is_complete
            h5.attrs["hdf5_layout"] = H5_LAYOUT
            h5.attrs["splits"] = json.dumps(list(names))
            classes = store.group["classes"]
            for name in classes.array_keys():
                _write_table(h5.require_group("classes"), name, np.asarray(classes[name][:]))
            for name in names:
                split = store.split(name)
                wanted = tuple(levels) if levels is not None else split.levels
                for lv in wanted:
                    split.level_shape(lv)  # unknown level -> SchemaError naming the stored ones
                _export_split(h5, split, wanted)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out

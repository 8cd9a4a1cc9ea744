"""``roicache cache migrate``: rewrite a store in the current layout (schema 2).

A version-1 store (one object per image per array) stays readable, but at LVIS size its ~12
objects per image cost a request each; migration copies every array value unchanged into the
schema-2 layout (commit blocks, shards): the same rows in the same order, the stored logits kept,
every table, the detector head and the evaluation ground truth copied as they are. Only the
chunking changes, so everything read from the new store equals what the old one gave (tested).

Resumable like extraction: blocks are committed with their done marks last, and a rerun with
``resume`` continues the blocks not yet done.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import zarr
from rich.progress import Progress

from cache_schema.errors import ConfigError, StoreIncompleteError
from cache_schema.layout import split_layout
from cache_schema.meta import SCHEMA_VERSION, SplitSpec
from cache_schema.split import SplitStore
from cache_schema.store import Store, create_store, finalize, open_for_resume, open_store


@dataclass(frozen=True, kw_only=True)
class MigrateReport:
    """What :func:`migrate_store` did: ``source_version``, images copied, and the stored objects
    (files or keys) of the source and the result."""

    source: str
    out: str
    source_version: int
    images_copied: int
    objects_before: int
    objects_after: int
    complete: bool


def _spec(split: SplitStore, block_images: int) -> SplitSpec:
    gt = split.gt()
    return SplitSpec(
        name=split.name, image_ids=split.image_ids, image_sizes=split.image_sizes, file_names=split.file_names,
        stride=split.stride, levels=split.levels, gt=gt, with_masks=split.with_masks,
        has_gt_proposals=split.has_gt_proposals, image_block=block_images, mask_overlaps=split.mask_overlaps,
        row_order=split.row_order, store_logits=split.store_logits,
    )


def _copy_node(node: zarr.Array | zarr.Group, parent: zarr.Group, name: str) -> None:
    """Copy an array (same chunking, codecs, values, attributes) or a group, recursively."""
    if isinstance(node, zarr.Group):
        group = parent.require_group(name)
        group.attrs.update(node.attrs.asdict())
        for child_name, child in node.members():
            _copy_node(child, group, child_name)
        return
    arr = parent.create_array(name=name, shape=node.shape, chunks=node.chunks, shards=node.shards, dtype=node.dtype,
                              compressors=node.compressors, fill_value=node.fill_value, overwrite=True)
    if node.size:
        arr[...] = node[...]
    arr.attrs.update(node.attrs.asdict())


def _extras(source: Store, out: Store) -> None:
    """Groups and arrays outside the layout (``detector_head/``, a split's ``eval_gt/``...)."""
    for name, node in source.group.members():
        if name == "classes":
            continue
        if name not in source.meta.splits:
            _copy_node(node, out.group, name)
            continue
        split = source.split(name)
        known = split_layout(num_images=split.num_images, stride=split.stride, num_gt=split.num_gt,
                             num_classes=split.num_classes, levels=dict(split._level_shapes),
                             with_masks=split.with_masks, mask_size=split.mask_size, image_block=1,
                             mask_overlaps=split.mask_overlaps, num_stages=split.num_stages,
                             version=source.meta.schema_version, store_logits=split.store_logits)
        tops = {path.split("/")[0] for path in known}
        for child_name, child in node.members():
            if child_name not in tops:
                _copy_node(child, out.group[name], child_name)


def _count_objects(store: Store) -> int:
    from zarr.core.sync import sync

    async def collect() -> int:
        return sum([1 async for _ in store.group.store.list_prefix("")])
    return int(sync(collect()))


def _copy_block(src: SplitStore, dst: SplitStore, start: int, stop: int) -> None:
    sel = np.arange(start, stop, dtype=np.int64)
    counts = src._marks("images/num_rois", sel).astype(np.int64)
    bounds = np.concatenate([[0], np.cumsum(counts)])
    images: list[dict[str, np.ndarray]] = [{} for _ in sel]
    for path in dst.roi_array_paths():
        values = src._read_array(path, sel, counts)
        for j in range(len(sel)):
            images[j][path] = values[bounds[j]:bounds[j + 1]]
    dst.write_block(start, images)


def migrate_store(source: str, out: str, *, block_images: int = 32, resume: bool = False,
                  progress: bool = True) -> MigrateReport:
    """Copy the complete store at ``source`` into a new schema-2 store at ``out`` (commit blocks of
    ``block_images`` images); ``resume`` continues an interrupted migration into ``out``."""
    if block_images < 1:
        raise ConfigError(f"--block-images must be >= 1, got {block_images}")
    src = open_store(source)
    if not src.is_complete:
        raise StoreIncompleteError(f"store {src.path} is not complete; finish its extraction (extract --resume) before migrating it")
    meta = replace(src.meta, schema_version=SCHEMA_VERSION)
    if resume:
        dst = open_for_resume(out, meta)
    else:
        dst = create_store(out, meta=meta, classes=src.classes, splits=[_spec(src.split(n), block_images) for n in src.splits])
    _extras(src, dst)  # small, and rewritten on resume: an interrupted copy is never left half done
    copied = 0
    with Progress(disable=not progress, transient=True) as bar:
        for name in src.splits:
            s, d = src.split(name), dst.split(name)
            done, block = d.done(), d.commit_block
            starts = [a for a in range(0, d.num_images, block) if not done[a:a + block].all()]
            task = bar.add_task(f"migrating {name}", total=len(starts))
            for a in starts:
                b = min(a + block, d.num_images)
                _copy_block(s, d, a, b)
                copied += b - a
                bar.advance(task)
    complete = finalize(dst)
    return MigrateReport(source=src.path, out=dst.path, source_version=src.meta.schema_version, images_copied=copied,
                         objects_before=_count_objects(src), objects_after=_count_objects(dst), complete=complete)

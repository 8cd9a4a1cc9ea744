"""Create, open, resume and finalize a store (one zarr v3 group; see docs/cache.md).

A store is usable for reading once ``attrs["initialized"]`` is true (every table written by
:func:`create_store`); it is *complete* once ``attrs["complete"]`` is true, which
:func:`finalize` sets only after every image of every split carries its done mark.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from functools import cached_property
from pathlib import Path

import numpy as np
import zarr

from cache_schema.errors import (ConfigError, SchemaError, StoreExistsError, StoreMismatchError, StoreNotFoundError,
                                 StoreUninitializedError)
from cache_schema.layout import (
    COMPLETE_ATTR,
    FREQUENCY_CODES,
    INITIALIZED_ATTR,
    ROOT_ATTR,
    STRIDE_ALIGN,
    ArraySpec,
    classes_layout,
    split_attrs,
    split_layout,
)
from cache_schema.differences import meta_differences
from cache_schema.object_store import has_objects, missing_bucket, object_store_error
from cache_schema.meta import SplitSpec, StoreMeta
from cache_schema.records import FREQUENCY_GROUPS, ClassInfo
from cache_schema.split import SplitStore

PathLike = str | os.PathLike


def _location(path_or_url: PathLike) -> str:
    """Local paths as plain strings (zarr picks LocalStore), URLs untouched (zarr picks fsspec)."""
    text = os.fspath(path_or_url)
    return text if "://" in text else str(Path(text).expanduser())


def _is_url(location: str) -> bool:
    return "://" in location


def create_array(group: zarr.Group, spec: ArraySpec, *, overwrite: bool = False) -> zarr.Array:
    """Create one (empty) array from its spec (``overwrite``: replace one already there).

    ``write_empty_chunks`` is on because zarr would otherwise skip (and delete) an all-zero chunk,
    and validation treats a missing chunk of a finished image as damage.
    """
    return group.create_array(
        name=spec.path, shape=spec.shape, chunks=spec.chunks, shards=spec.shards,
        dtype=str if spec.dtype == "str" else spec.dtype, compressors=spec.compressors(),
        fill_value="" if spec.dtype == "str" else 0, config={"write_empty_chunks": True}, overwrite=overwrite,
    )


def open_group(location: str, *, mode: str, attributes: dict | None = None) -> zarr.Group:
    """``zarr.open_group`` (format 3 when creating), with a missing fsspec backend and, for URLs,
    the object store's failures (credentials, permissions, missing bucket, endpoint) turned into
    one-line ConfigErrors. A location that simply holds no group still raises zarr's error (a
    ``FileNotFoundError``), which callers turn into "no store here"."""
    try:
        if mode == "w":
            return zarr.open_group(location, mode=mode, zarr_format=3, attributes=attributes)
        if _is_url(location):
            # Only format 3 is a store. Without the format zarr probes the v2 and v3 metadata
            # objects concurrently and, when one request fails, leaves the others to be reported
            # as "Exception ignored" tracebacks at exit; one request also means one round trip.
            return zarr.open_group(location, mode=mode, zarr_format=3)
        return zarr.open_group(location, mode=mode)
    except ImportError as exc:
        scheme = location.split("://", 1)[0]
        raise ConfigError(f"opening {location} needs the fsspec backend for '{scheme}://' ({exc}); install it, e.g. pip install s3fs or gcsfs") from None
    except Exception as exc:
        if not _is_url(location):
            raise
        problem = object_store_error(location, exc)
        if problem is None and isinstance(exc, FileNotFoundError):
            # zarr reads a missing bucket as an empty location: name the bucket, not "no store".
            problem = missing_bucket(location)
        if problem is None:
            raise
        raise problem from None


def _store_state(location: str) -> str:
    """``"absent"`` (nothing there / empty dir), ``"store"`` (a roicache store) or ``"other"``.

    Object-store failures (no credentials, missing bucket...) raise ConfigError from here, before
    anything is written."""
    if not _is_url(location):
        p = Path(location)
        if not p.exists() or (p.is_dir() and not any(p.iterdir())):
            return "absent"
        if not (p / "zarr.json").is_file():
            return "other"
    try:
        group = open_group(location, mode="r")
    except (FileNotFoundError, ValueError):
        if not _is_url(location):
            return "other"
        # No group, but objects under the prefix are someone's data: creating the store
        # (zarr's mode "w") would delete them, as it would a non-empty local directory.
        return "other" if has_objects(location) else "absent"
    return "store" if ROOT_ATTR in group.attrs else "other"


class Store:
    """An opened store. Use :func:`open_store`, :func:`create_store` or :func:`open_for_resume`.

    Attributes:
        path: the location it was opened from (local path or URL).
        mode: ``"r"`` (read only) or ``"r+"`` (extraction writers).
        group: the root ``zarr.Group`` (for tools; prefer the typed readers).
    """

    def __init__(self, *, group: zarr.Group, path: str, mode: str) -> None:
        self.group = group
        self.path = path
        self.mode = mode
        attrs = group.attrs.asdict()
        if ROOT_ATTR not in attrs:
            raise SchemaError(f"{path} is a zarr group but not a roicache store (no '{ROOT_ATTR}' attribute); create one with `extract`")
        self.meta = StoreMeta.from_dict(attrs[ROOT_ATTR])
        if not attrs.get(INITIALIZED_ATTR, False):
            raise StoreUninitializedError(f"store {path} is not initialized (its creation is running or was interrupted); wait for it, or create it again (--overwrite)")
        self._complete = bool(attrs.get(COMPLETE_ATTR, False))
        self._splits: dict[str, SplitStore] = {}

    @property
    def is_complete(self) -> bool:
        """``True`` once :func:`finalize` saw every image of every split done."""
        return self._complete

    @property
    def writable(self) -> bool:
        return self.mode == "r+"

    @property
    def splits(self) -> tuple[str, ...]:
        return self.meta.splits

    @cached_property
    def classes(self) -> ClassInfo:
        """Training-split class statistics (read once)."""
        return read_classes(self._group_at("classes"))

    def split(self, name: str) -> SplitStore:
        """The reader/writer of split ``name``."""
        if name not in self.meta.splits:
            raise ConfigError(f"store {self.path} has no split {name!r} (it has: {', '.join(self.meta.splits)})")
        if name not in self._splits:
            self._splits[name] = SplitStore(group=self._group_at(name), name=name, owner=self)
        return self._splits[name]

    def _group_at(self, name: str) -> zarr.Group:
        try:
            node = self.group[name]
        except KeyError:
            raise SchemaError(f"store {self.path} lacks its '{name}' group; the store is damaged, re-extract it") from None
        if not isinstance(node, zarr.Group):
            raise SchemaError(f"store {self.path}: '{name}' is not a group; the store is damaged, re-extract it")
        return node

    def _set_complete(self, value: bool) -> None:
        if not self.writable:
            raise ConfigError(f"store {self.path} is open read-only; open it with mode='r+'")
        self.group.attrs[COMPLETE_ATTR] = value
        self._complete = value

    def invalidate(self, *, split: str, images: np.ndarray | list[int]) -> None:
        """Clear the done marks of ``images`` of ``split`` (and the complete flag), so that resumed
        extraction rewrites them — the repair for chunks :func:`validate_store` reports damaged."""
        self._set_complete(False)
        self.split(split).clear_done(images)

    def __repr__(self) -> str:
        state = "complete" if self._complete else "incomplete"
        return f"Store({self.path!r}, splits={list(self.meta.splits)}, {state}, mode={self.mode!r})"


def open_store(path_or_url: PathLike, mode: str = "r") -> Store:
    """Open an existing store from a local path or an fsspec URL (``file://``, ``memory://``, ``s3://``...).

    ``mode`` is ``"r"`` for readers, ``"r+"`` for extraction writers. Raises SchemaError when the
    location holds no store, an unsupported schema version or an interrupted creation.
    """
    if mode not in ("r", "r+"):
        raise ConfigError(f"store mode {mode!r} is not supported; use 'r' (read) or 'r+' (write images)")
    location = _location(path_or_url)
    try:
        group = open_group(location, mode=mode)
    except (FileNotFoundError, ValueError):
        raise StoreNotFoundError(f"no roicache store at {location}; check the path or create one with `extract`") from None
    return Store(group=group, path=location, mode=mode)


def open_for_resume(path_or_url: PathLike, meta: StoreMeta) -> Store:
    """Open a store for writing the images it still lacks, after checking it was built from the
    same detector, dataset and settings as ``meta`` (paths and creation time may differ)."""
    store = open_store(path_or_url, mode="r+")
    if store.meta.schema_version != meta.schema_version:
        raise StoreMismatchError(
            f"store {store.path} has schema version {store.meta.schema_version} and this roicache writes "
            f"{meta.schema_version}; extract into a new store (or --overwrite), or, once it is complete, convert "
            "it with `roicache cache migrate`")
    diffs = meta_differences(store.meta, meta)
    if diffs:
        more = f" (+{len(diffs) - 3} more)" if len(diffs) > 3 else ""
        raise StoreMismatchError(
            f"store {store.path} was built with different inputs: {'; '.join(diffs[:3])}{more}; "
            "extract into a new store or overwrite it (--overwrite)"
        )
    return store


def finalize(store: Store) -> bool:
    """Mark the store complete if every image of every split is done; returns whether it is.

    Safe to call from every shard when it finishes: only the last one finds everything done.
    """
    if not all(store.split(name).done().all() for name in store.splits):
        return False
    writable = store if store.writable else open_store(store.path, mode="r+")
    writable._set_complete(True)
    store._complete = True
    return True


def _check_inputs(meta: StoreMeta, classes: ClassInfo, splits: list[SplitSpec]) -> None:
    names = [s.name for s in splits]
    if names != list(meta.splits):
        raise SchemaError(f"split specs {names} do not match meta.splits {list(meta.splits)} (same names, same order)")
    c = meta.num_classes
    if classes.num_classes != c or tuple(classes.category_ids) != meta.dataset.category_ids:
        raise SchemaError("class table and meta.dataset.category_ids disagree; build both from the same training annotation file")
    for s in splits:
        unknown = [lv for lv in s.levels if lv not in meta.detector.levels]
        if unknown:
            raise SchemaError(f"split {s.name}: levels {unknown} are not produced by the detector (it has: {', '.join(meta.detector.levels)})")
        if len(s.gt) and (s.gt.labels.min() < 0 or s.gt.labels.max() >= c):
            raise SchemaError(f"split {s.name}: gt labels must lie in [0, {c}); map json category ids to contiguous classes first")
    if "train" in meta.splits and len(classes.csr_images):
        n_train = splits[names.index("train")].num_images
        if classes.csr_images.min() < 0 or classes.csr_images.max() >= n_train:
            raise SchemaError(f"class table: csr_images must be train positions in [0, {n_train})")


def create_store(
    path_or_url: PathLike,
    *,
    meta: StoreMeta,
    classes: ClassInfo,
    splits: list[SplitSpec],
    overwrite: bool = False,
    extras: Callable[[zarr.Group], None] | None = None,
) -> Store:
    """Create an empty store: every array, the image/GT/class tables and the metadata.

    ``extras(root_group)`` writes whatever else belongs to a new store (the detector head, the
    evaluation ground truth) before it is marked initialized, so that a crash anywhere in
    creation leaves a store that reads as not initialized — never one that resumes without them.

    Refuses a location holding anything but a roicache store, and an existing store unless
    ``overwrite`` (to continue an interrupted extraction use :func:`open_for_resume`). The store
    reads as not initialized until the last table is written, and as incomplete until
    :func:`finalize`. Returns it opened ``"r+"``.
    """
    _check_inputs(meta, classes, splits)
    location = _location(path_or_url)
    state = _store_state(location)
    if state == "other":
        raise StoreExistsError(f"{location} exists and is not a roicache store; choose a new or empty location (refusing to overwrite it)")
    if state == "store" and not overwrite:
        raise StoreExistsError(f"a store already exists at {location}; pass overwrite (--overwrite) to replace it or resume it (--resume)")
    # The root node appears with its attributes in one write (a concurrent shard polling for the
    # store sees "not initialized", never a bare group); initialized turns True last, so a crash
    # in between leaves a store that open_store refuses, never one that looks usable.
    root = open_group(location, mode="w",
                      attributes={ROOT_ATTR: meta.to_dict(), INITIALIZED_ATTR: False, COMPLETE_ATTR: False})
    _write_classes(root.create_group("classes"), classes)
    for spec in splits:
        _create_split(root.create_group(spec.name), spec, meta)
    if extras is not None:
        extras(root)
    root.attrs[INITIALIZED_ATTR] = True
    return open_store(location, mode="r+")


def _write_classes(group: zarr.Group, classes: ClassInfo) -> None:
    layout = classes_layout(num_classes=classes.num_classes, nnz=len(classes.csr_images))
    values = {
        "category_id": np.asarray(classes.category_ids, dtype=np.int64),
        "instance_count": np.asarray(classes.instance_count, dtype=np.int64),
        "image_count": np.asarray(classes.image_count, dtype=np.int64),
        "frequency": np.asarray([FREQUENCY_CODES[f] for f in classes.frequency], dtype=np.uint8),
        "name": np.asarray(classes.names, dtype=str),
        "csr_indptr": np.asarray(classes.csr_indptr, dtype=np.int64),
        "csr_images": np.asarray(classes.csr_images, dtype=np.int64),
    }
    for name, spec in layout.items():
        arr = create_array(group, spec)
        if spec.shape[0]:
            arr[:] = values[name]


def read_classes(group: zarr.Group) -> ClassInfo:
    """The ``classes/`` group as a :class:`ClassInfo`."""
    try:
        v = {name: np.asarray(group[name][:]) for name in classes_layout(num_classes=1, nnz=0)}
    except KeyError as exc:
        raise SchemaError(f"classes group lacks array {exc}; the store is damaged, re-extract it") from None
    return ClassInfo(
        names=tuple(str(x) for x in v["name"]),
        category_ids=tuple(int(x) for x in v["category_id"]),
        frequency=tuple(FREQUENCY_GROUPS[int(x)] for x in v["frequency"]),
        instance_count=v["instance_count"].astype(np.int64),
        image_count=v["image_count"].astype(np.int64),
        csr_indptr=v["csr_indptr"].astype(np.int64),
        csr_images=v["csr_images"].astype(np.int64),
    )


def aligned_stride(stride: int, version: int) -> int:
    """The RoI stride a split of schema ``version`` is created with: schema 2 rounds it up to a
    multiple of :data:`STRIDE_ALIGN` so that inner chunks never straddle two images."""
    return stride if version == 1 else -(-stride // STRIDE_ALIGN) * STRIDE_ALIGN


def _create_split(group: zarr.Group, spec: SplitSpec, meta: StoreMeta) -> None:
    mask_size, version = meta.extraction.mask_size, meta.schema_version
    if version == 1 and (spec.row_order != "proposal" or not spec.store_logits):
        raise SchemaError(f"split {spec.name}: schema 1 stores keep proposal order and logits; create a schema 2 store")
    stride = aligned_stride(spec.stride, version)
    group.attrs.update(split_attrs(
        num_images=spec.num_images, stride=stride, num_gt=len(spec.gt), levels=spec.levels,
        with_masks=spec.with_masks, mask_size=mask_size, has_gt_proposals=spec.has_gt_proposals,
        image_block=spec.image_block, mask_overlaps=spec.mask_overlaps, row_order=spec.row_order,
        store_logits=spec.store_logits,
    ))
    layout = split_layout(
        num_images=spec.num_images, stride=stride, num_gt=len(spec.gt), num_classes=meta.num_classes,
        levels={lv: meta.detector.levels[lv] for lv in spec.levels}, with_masks=spec.with_masks,
        mask_size=mask_size, image_block=spec.image_block, mask_overlaps=spec.mask_overlaps,
        num_stages=meta.detector.num_stages, version=version, store_logits=spec.store_logits,
    )
    tables = {
        "images/id": spec.image_ids,
        "images/height": spec.image_sizes[:, 0],
        "images/width": spec.image_sizes[:, 1],
        "images/file_name": np.asarray(spec.file_names, dtype=str),
        **{f"gt/{name}": getattr(spec.gt, name) for name in ("boxes", "labels", "image", "area", "ann_id")},
    }
    for path, aspec in layout.items():
        arr = create_array(group, aspec)
        if path in tables and aspec.shape[0]:
            arr[:] = tables[path]


"""Check a store against the contract, its inputs and its own chunk files.

zarr reads a *missing* chunk as the fill value without complaint, so missing chunks are found by
listing the store's keys and comparing with the chunks every finished image must have; corrupt
or truncated chunks are found by decoding each one (every chunk carries a crc32c).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import zarr
from zarr.core.sync import sync

from cache_schema.errors import RoicacheError, SchemaError
from cache_schema.layout import (
    COMPLETE_ATTR, INITIALIZED_ATTR, KIND_MARK, KIND_ROI, ROOT_ATTR, STRING_DTYPE, ArraySpec, classes_layout, split_layout,
)
from cache_schema.meta import StoreMeta, check_schema_version
from cache_schema.runtime import sha256_file
from cache_schema.store import _location, open_group, read_classes

# Runs of damaged images listed per array before the rest is summarised, to keep output readable.
_MAX_RUNS = 5
#: Seed of the images ``sample`` decodes (the same images on every run: results are comparable).
SAMPLE_SEED = 0
#: Images per split decoded by default above :data:`FULL_BELOW` finished images (``sample="auto"``).
AUTO_SAMPLE = 2000
FULL_BELOW = 20000
#: Arrays whose stored RoI rows must be finite (objectness is +inf for appended GT boxes).
FINITE_PREFIXES = ("feat/", "rois/logits")
_REPAIR = "clear them with `roicache cache invalidate STORE --split SPLIT --images ...` and rerun extract with --resume"


@dataclass(frozen=True, kw_only=True)
class ValidationReport:
    """Outcome of :func:`validate_store`.

    Attributes:
        path: the store location.
        problems: one self-contained line per problem (what, where, how to fix).
        incomplete: split -> images without a done mark.
        chunks_checked: objects (chunk files or shards) decoded (0 when ``deep=False``).
        deep: whether objects were decoded.
    """

    path: str
    problems: list[str] = field(default_factory=list)
    incomplete: dict[str, int] = field(default_factory=dict)
    chunks_checked: int = 0
    deep: bool = True
    sampled: dict[str, int] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.problems

    def format(self) -> str:
        if self.ok:
            how = f"{self.chunks_checked} objects decoded" if self.deep else "object contents not decoded (deep=False)"
            if self.sampled:
                how += "; sampled images decoded: " + ", ".join(f"{k} {v}" for k, v in self.sampled.items())
            return f"{self.path}: OK ({how})"
        return "\n".join(f"{self.path}: {p}" for p in self.problems)


def _runs(idx: np.ndarray) -> list[tuple[int, int]]:
    """Consecutive runs ``[(first, last), ...]`` of sorted integers."""
    if len(idx) == 0:
        return []
    breaks = np.flatnonzero(np.diff(idx) != 1)
    starts = np.concatenate([[idx[0]], idx[breaks + 1]])
    ends = np.concatenate([idx[breaks], [idx[-1]]])
    return [(int(a), int(b)) for a, b in zip(starts, ends)]


def _describe(idx: list[int] | np.ndarray, spec: ArraySpec, unit: str, rows: int) -> str:
    """``"images 3-5 (rows 24-47)"`` style description of units (images of ``rows`` rows each, or
    table chunks), capped to a few runs."""
    parts = []
    runs = _runs(np.asarray(sorted(idx), dtype=np.int64))
    for a, b in runs[:_MAX_RUNS]:
        name = f"{unit} {a}" if a == b else f"{unit}s {a}-{b}"
        last_row = min((b + 1) * rows, spec.shape[0]) - 1
        parts.append(f"{name} (rows {a * rows}-{last_row})")
    more = f" and {len(runs) - _MAX_RUNS} more runs" if len(runs) > _MAX_RUNS else ""
    return ", ".join(parts) + more


def object_key(arr: zarr.Array, row: int) -> str:
    """Store key (relative to the store root) of the object holding row ``row`` of ``arr`` (a
    shard, or a chunk when unsharded): e.g. ``train/feat/fc/c/3/0``."""
    rows = (arr.shards or arr.chunks)[0]
    return f"{arr.path}/{arr.metadata.encode_chunk_key((int(row) // rows, *(0,) * (arr.ndim - 1)))}"


class _Checker:
    """Accumulates problems while walking one store."""

    def __init__(self, group: zarr.Group, meta: StoreMeta, deep: bool, sample: int | None = None) -> None:
        self.group = group
        self.meta = meta
        self.deep = deep
        self.sample = sample
        self.sampled: dict[str, int] = {}  # split -> images whose chunks were decoded, when sampled
        self.problems: list[str] = []
        self.chunks_checked = 0
        self._keys: set[str] | None = None

    def keys(self) -> set[str]:
        """Every key of the store (listed once)."""
        if self._keys is None:
            # fsspec filesystems are cached per process with their directory listings; an object
            # deleted since (by another process) must not be listed from that cache. s3fs 2026.9
            # lists afresh anyway; other backends (and older s3fs) may not.
            fs = getattr(self.group.store, "fs", None)
            if fs is not None:
                fs.invalidate_cache()

            async def collect() -> list[str]:
                return [k async for k in self.group.store.list_prefix("")]
            self._keys = set(sync(collect()))
        return self._keys

    def check_array(self, parent: zarr.Group, where: str, spec: ArraySpec) -> zarr.Array | None:
        """Presence, shape, dtype, chunking and sharding of one array; returns it when usable."""
        try:
            arr = parent[spec.path]
        except KeyError:
            self.problems.append(f"{where}/{spec.path}: array is missing; the store is damaged, re-extract it (--overwrite)")
            return None
        if not isinstance(arr, zarr.Array):
            self.problems.append(f"{where}/{spec.path}: is not an array; the store is damaged, re-extract it (--overwrite)")
            return None
        dtype_ok = arr.dtype.kind in "TUO" if spec.dtype == STRING_DTYPE else arr.dtype == spec.np_dtype
        shards = None if arr.shards is None else tuple(arr.shards)
        if tuple(arr.shape) != spec.shape or tuple(arr.chunks) != spec.chunks or shards != spec.shards or not dtype_ok:
            self.problems.append(
                f"{where}/{spec.path}: shape {tuple(arr.shape)} chunks {tuple(arr.chunks)} shards {shards} dtype {arr.dtype}, "
                f"expected shape {spec.shape} chunks {spec.chunks} shards {spec.shards} dtype {spec.dtype}; the store does not "
                f"follow schema {self.meta.schema_version}, re-extract it"
            )
            return None
        return arr

    def missing_objects(self, arr: zarr.Array, objects: np.ndarray) -> list[int]:
        """Object indices (shards, or chunks when unsharded; along axis 0) whose key is not in the store."""
        keys, rows = self.keys(), (arr.shards or arr.chunks)[0]
        return [int(o) for o in objects if object_key(arr, int(o) * rows) not in keys]

    def check_objects(self, where: str, arr: zarr.Array, spec: ArraySpec, units: np.ndarray, unit_rows: int,
                      unit: str, fix: str, counts: np.ndarray | None = None, decode: np.ndarray | None = None) -> None:
        """The objects holding ``units`` (images, or table chunks; unit ``u`` is rows
        ``[u*unit_rows, (u+1)*unit_rows)``) must exist; those holding the units ``decode``
        (default: all) must decode; with ``counts`` (valid rows per unit, indexed by unit id)
        those rows must be finite."""
        rows_per = spec.object_rows
        first_row = units * unit_rows
        obj = first_row // rows_per
        missing = set(self.missing_objects(arr, np.unique(obj)))
        if missing:
            lost = units[np.isin(obj, list(missing))]
            self.problems.append(f"{where}/{spec.path}: object(s) missing for {_describe(lost, spec, unit, unit_rows)}; {fix}")
        if not self.deep:
            return
        want = np.ones(len(units), bool) if decode is None else np.isin(units, decode)
        want &= ~np.isin(obj, list(missing))
        bad, nonfinite = [], []
        for o in np.unique(obj[want]):
            self.chunks_checked += 1
            members = np.flatnonzero(want & (obj == o))
            lo = int(o) * rows_per
            try:
                values = np.asarray(arr[lo:min(lo + rows_per, arr.shape[0])])
            except Exception:  # noqa: BLE001 - any decode failure (crc, blosc, zstd, utf-8) is damage
                bad.extend(units[members].tolist())
                continue
            if counts is not None:
                for j in members:
                    start = int(first_row[j]) - lo
                    if not np.isfinite(values[start:start + int(counts[units[j]])]).all():
                        nonfinite.append(int(units[j]))
        if bad:
            self.problems.append(f"{where}/{spec.path}: object(s) corrupt or truncated for {_describe(bad, spec, unit, unit_rows)}; {fix}")
        if nonfinite:
            self.problems.append(f"{where}/{spec.path}: NaN/Inf values for {_describe(nonfinite, spec, unit, unit_rows)}; {fix}")

    def check_table(self, parent: zarr.Group, where: str, spec: ArraySpec) -> zarr.Array | None:
        """A table written at creation: every chunk must exist and decode."""
        arr = self.check_array(parent, where, spec)
        if arr is not None and spec.shape[0]:
            chunks = np.arange(-(-spec.shape[0] // spec.chunks[0]))
            self.check_objects(where, arr, spec, chunks, spec.chunks[0], "chunk",
                               "the store's tables are damaged, re-extract it (--overwrite)")
        return arr

    def read_mark(self, where: str, arr: zarr.Array, spec: ArraySpec) -> np.ndarray:
        """A completion mark array, decoding object by object when one read fails."""
        try:
            return np.asarray(arr[:])
        except Exception:  # noqa: BLE001 - fall back to per-object reads to pinpoint damage
            out = np.zeros(spec.shape[0], dtype=spec.np_dtype)
            bad: list[int] = []
            rows = spec.object_rows
            for lo in range(0, spec.shape[0], rows):
                try:
                    out[lo:lo + rows] = arr[lo:lo + rows]
                except Exception:  # noqa: BLE001
                    bad.extend(range(lo, min(lo + rows, spec.shape[0])))
            self.problems.append(f"{where}/{spec.path}: object(s) corrupt for {_describe(bad, spec, 'image', 1)}; {_REPAIR}")
            return out

    def check_split(self, name: str) -> int:
        """All checks of one split; returns its number of unfinished images."""
        try:
            group = self.group[name]
            attrs = group.attrs.asdict()
            layout = split_layout(
                num_images=int(attrs["num_images"]), stride=int(attrs["roi_stride"]), num_gt=int(attrs["num_gt"]),
                num_classes=self.meta.num_classes, levels={lv: self.meta.detector.levels[lv] for lv in attrs["levels"]},
                with_masks=bool(attrs["with_masks"]), mask_size=int(attrs["mask_size"]), image_block=int(attrs["image_block"]),
                mask_overlaps=int(attrs.get("mask_overlaps", 0)), num_stages=self.meta.detector.num_stages,
                version=self.meta.schema_version, store_logits=bool(attrs.get("store_logits", True)),
            )
        except (KeyError, TypeError, ValueError) as exc:
            self.problems.append(f"{name}: split group or its attributes are missing or malformed ({exc}); re-extract the store")
            return 0
        n, k = int(attrs["num_images"]), int(attrs["roi_stride"])
        arrays = {}
        for path, spec in layout.items():
            check = self.check_array if spec.kind in (KIND_MARK, KIND_ROI) else self.check_table
            arrays[path] = check(group, name, spec)
        if arrays["images/done"] is None or arrays["images/num_rois"] is None:
            return n
        done = self.read_mark(name, arrays["images/done"], layout["images/done"]) != 0
        counts = self.read_mark(name, arrays["images/num_rois"], layout["images/num_rois"])
        finished = np.flatnonzero(done)
        over = finished[(counts[finished] < 0) | (counts[finished] > k)]
        if len(over):
            self.problems.append(f"{name}/images/num_rois: {len(over)} finished images have a count outside [0, {k}] (first: image {int(over[0])}); {_REPAIR}")
        self.check_objects(name, arrays["images/num_rois"], layout["images/num_rois"], finished, 1, "image", _REPAIR)
        decode = None
        if self.sample is not None and len(finished) > self.sample:
            # A seeded sample of images is decoded (every object's presence is still checked).
            decode = np.sort(np.random.default_rng(SAMPLE_SEED).choice(finished, self.sample, replace=False))
            self.sampled[name] = len(decode)
        safe = np.clip(counts, 0, k)
        # Images without RoIs need no RoI object: inside shards zarr writes no all-padding chunk,
        # and a shard of such images only.
        holding = finished[safe[finished] > 0]
        for path, spec in layout.items():
            if spec.kind == KIND_ROI and arrays[path] is not None:
                # Features and logits must be finite in every RoI an image holds.
                finite = safe if path.startswith(FINITE_PREFIXES) else None
                self.check_objects(name, arrays[path], spec, holding, k, "image", _REPAIR, counts=finite,
                                   decode=decode)
        return int(n - len(finished))


def _open(location: str) -> tuple[zarr.Group | None, str | None]:
    try:
        return open_group(location, mode="r"), None
    except (FileNotFoundError, ValueError):
        return None, f"no zarr store at {location}; check the path or create one with `extract`"
    except RoicacheError as exc:
        return None, str(exc)


def _check_inputs(meta: StoreMeta, checkpoint: str | os.PathLike | None, annotations: dict[str, str | os.PathLike] | None) -> list[str]:
    problems = []
    if checkpoint is not None:
        if not Path(checkpoint).is_file():
            problems.append(f"checkpoint {checkpoint} does not exist; pass the detector checkpoint file the store was built from")
        else:
            sha = sha256_file(checkpoint)
            want = meta.detector.checkpoint_sha256
            if sha != want:
                problems.append(f"checkpoint {checkpoint} (sha256 {sha[:12]}...) is not the detector the store was built from (sha256 {want[:12]}...); pass that checkpoint or re-extract")
    for split, path in (annotations or {}).items():
        source = meta.dataset.splits.get(split)
        if source is None:
            problems.append(f"annotations given for split {split!r}, which the store does not record (it has: {', '.join(meta.dataset.splits)})")
        elif not Path(path).is_file():
            problems.append(f"annotation file {path} for split {split} does not exist; pass the json the store was built from")
        else:
            sha = sha256_file(path)
            if sha != source.annotation_sha256:
                problems.append(f"annotation file {path} (sha256 {sha[:12]}...) differs from the one split {split} was built from (sha256 {source.annotation_sha256[:12]}...); pass that file or re-extract")
    return problems


def validate_store(
    path: str | os.PathLike,
    *,
    checkpoint: str | os.PathLike | None = None,
    annotations: dict[str, str | os.PathLike] | None = None,
    deep: bool = True,
    sample: int | str | None = None,
) -> ValidationReport:
    """Check schema version, layout, completion, chunk integrity and (when given) that the
    checkpoint and annotation files are the ones the store was built from. Never raises for a
    damaged store: every finding is one line in ``report.problems``.

    ``sample``: decode the chunks (and check the finiteness) of only this many seeded images per
    split; ``"auto"``: all of a split's images up to :data:`FULL_BELOW`, :data:`AUTO_SAMPLE`
    above; ``None``: all. Chunk presence is always checked for every image."""
    location = _location(path)
    group, problem = _open(location)
    if group is None:
        return ValidationReport(path=location, problems=[problem], deep=deep)
    attrs = group.attrs.asdict()
    if ROOT_ATTR not in attrs:
        return ValidationReport(path=location, problems=[f"not a roicache store (no '{ROOT_ATTR}' attribute); create one with `extract`"], deep=deep)
    try:
        check_schema_version(attrs[ROOT_ATTR].get("schema_version") if isinstance(attrs[ROOT_ATTR], dict) else None)
        meta = StoreMeta.from_dict(attrs[ROOT_ATTR])
    except SchemaError as exc:
        return ValidationReport(path=location, problems=[str(exc)], deep=deep)
    if not attrs.get(INITIALIZED_ATTR, False):
        return ValidationReport(path=location, problems=["store is not initialized (its creation is running or was interrupted); wait for it, or create it again (--overwrite)"], deep=deep)
    if sample == "auto":
        sample = AUTO_SAMPLE if any(int(group[s].attrs.get("num_images", 0)) > FULL_BELOW for s in meta.splits) else None
    checker = _Checker(group, meta, deep, sample)
    checker.problems.extend(_check_inputs(meta, checkpoint, annotations))
    classes_ok = True
    try:
        cgroup = group["classes"]
        nnz = int(cgroup["csr_images"].shape[0])
        for spec in classes_layout(num_classes=meta.num_classes, nnz=nnz).values():
            classes_ok &= checker.check_table(cgroup, "classes", spec) is not None
        if classes_ok:
            read_classes(cgroup)
    except KeyError:
        checker.problems.append("classes: group or arrays missing; the store is damaged, re-extract it (--overwrite)")
    except RoicacheError as exc:
        checker.problems.append(f"classes: {exc}")
    except Exception:  # noqa: BLE001 - a corrupt class chunk was already reported by check_table
        pass
    incomplete = {name: checker.check_split(name) for name in meta.splits}
    for name, count in incomplete.items():
        if count:
            total = int(group[name].attrs.get("num_images", 0))
            checker.problems.append(f"{name}: {count} of {total} images are not extracted yet; resume extraction (--resume)")
    if attrs.get(COMPLETE_ATTR, False) and any(incomplete.values()):
        checker.problems.append("store is marked complete but has unfinished images; the done marks were cleared without Store.invalidate, resume extraction")
    return ValidationReport(path=location, problems=checker.problems, incomplete=incomplete,
                            chunks_checked=checker.chunks_checked, deep=deep, sampled=checker.sampled)

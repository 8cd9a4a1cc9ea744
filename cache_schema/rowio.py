"""Direct row reads of a local store's per-RoI arrays, beside zarr's own reader.

Why it exists (bench/bench_store_read.py, bench/RESULTS.md): reading the rows a training batch
or a full load needs through zarr 3.1 costs ~1-10 ms of Python per inner chunk (its coordinate
indexer and per-chunk tasks), 4-18x the time of the file reads and Blosc decoding themselves.
This reader does only that work: it finds each needed chunk — a chunk file, or an inner chunk
of a shard through the shard's index — reads its bytes, checks the crc32c, decodes Blosc and
copies out the rows.

It handles exactly the codec chains :mod:`cache_schema.layout` writes — ``bytes -> [blosc] ->
crc32c`` unsharded, or a sharding codec around that chain with a ``bytes -> crc32c`` index at the
shard's end — on a ``zarr.storage.LocalStore``; :meth:`RowReader.for_array` returns ``None`` for
anything else and callers use zarr. Tested equal to zarr on every array of schema 1 and 2
stores (tests/test_rowio.py). One difference on purpose: an object missing for rows asked
raises :class:`ChunkError`, where zarr returns the fill value — callers ask only rows of
finished images, so a missing object there is damage, not padding.
"""

from __future__ import annotations

import asyncio
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import google_crc32c
import numpy as np
import zarr
from numcodecs import blosc as _blosc
from zarr.codecs import BloscCodec, BytesCodec, Crc32cCodec, ShardingCodec
from zarr.codecs.sharding import ShardingCodecIndexLocation
from zarr.core.sync import sync
from zarr.storage import LocalStore

from cache_schema.errors import ChunkError
from cache_schema.runtime import available_cores

# Row runs per batch of concurrent zarr reads (:func:`zarr_rows`).
_RUNS_PER_CALL = 256
_EMPTY = np.uint64(2**64 - 1)  # zarr's shard-index marker of an inner chunk that was not written
_POOL: tuple[int, ThreadPoolExecutor] | None = None


def _pool() -> ThreadPoolExecutor:
    """One pool per process (keyed by pid: a forked child inherits the object, not the threads)."""
    global _POOL
    if _POOL is None or _POOL[0] != os.getpid():
        # File reads and Blosc decoding release the GIL; two threads per core hide file latency.
        _POOL = (os.getpid(), ThreadPoolExecutor(max_workers=min(16, 2 * available_cores()), thread_name_prefix="roicache-io"))
    return _POOL[1]


def _plain_chain(codecs) -> bool | None:
    """``True``/``False`` (with/without Blosc) for ``bytes(little) -> [blosc] -> crc32c``, else ``None``."""
    if len(codecs) not in (2, 3) or not isinstance(codecs[0], BytesCodec) or not isinstance(codecs[-1], Crc32cCodec):
        return None
    if codecs[0].endian is not None and codecs[0].endian.value != "little":
        return None
    if len(codecs) == 3 and not isinstance(codecs[1], BloscCodec):
        return None
    return len(codecs) == 3


class RowReader:
    """Rows of one array chunked along axis 0 only (every chunk spans all trailing dimensions)."""

    def __init__(self, arr: zarr.Array, root: Path, *, chunk_rows: int, object_rows: int, blosc: bool,
                 sharded: bool) -> None:
        self.name = arr.path
        self.dtype = np.dtype(arr.dtype).newbyteorder("<")
        self.trailing = tuple(arr.shape[1:])
        self.chunk_rows, self.object_rows = chunk_rows, object_rows
        self.per_object = object_rows // chunk_rows
        self._root, self._blosc, self._sharded = root, blosc, sharded
        self._key = arr.metadata.encode_chunk_key
        self._tail = (0,) * (arr.ndim - 1)

    @classmethod
    def for_array(cls, arr: zarr.Array) -> "RowReader | None":
        """A direct reader of ``arr``, or ``None`` when zarr must read it."""
        if not isinstance(arr.store, LocalStore) or arr.metadata.zarr_format != 3 or not isinstance(arr.dtype, np.dtype):
            return None
        codecs = arr.metadata.codecs
        if len(codecs) == 1 and isinstance(codecs[0], ShardingCodec):
            shard = codecs[0]
            inner = _plain_chain(shard.codecs)
            index_ok = _plain_chain(shard.index_codecs) is False and shard.index_location == ShardingCodecIndexLocation.end
            if inner is None or not index_ok or tuple(shard.chunk_shape[1:]) != tuple(arr.shape[1:]):
                return None
            return cls(arr, Path(arr.store.root) / arr.path, chunk_rows=shard.chunk_shape[0], object_rows=arr.shards[0],
                       blosc=inner, sharded=True)
        chain = _plain_chain(codecs)
        if chain is None or tuple(arr.chunks[1:]) != tuple(arr.shape[1:]):
            return None
        return cls(arr, Path(arr.store.root) / arr.path, chunk_rows=arr.chunks[0], object_rows=arr.chunks[0],
                   blosc=chain, sharded=False)

    def _decode(self, raw: bytes, where: str) -> np.ndarray:
        if len(raw) < 4:
            raise ChunkError(f"{self.name}: {where} is truncated ({len(raw)} bytes); run `roicache cache validate`")
        body = np.frombuffer(raw, dtype=np.uint8)[:-4]  # zero-copy view
        if google_crc32c.value(body).to_bytes(4, "little") != raw[-4:]:
            raise ChunkError(f"{self.name}: {where} fails its crc32c check (corrupt or truncated); run `roicache cache validate`")
        out = np.empty((self.chunk_rows, *self.trailing), dtype=self.dtype)
        if self._blosc:
            try:
                _blosc.decompress(body, out)
            except (RuntimeError, ValueError) as exc:
                raise ChunkError(f"{self.name}: {where} cannot be decoded ({exc}); run `roicache cache validate`") from None
        else:
            flat = out.reshape(-1).view(np.uint8)
            if len(body) != flat.nbytes:
                raise ChunkError(f"{self.name}: {where} has {len(body)} bytes, expected {flat.nbytes}; run `roicache cache validate`")
            flat[:] = body
        return out

    def _object_chunks(self, obj: int, chunks: np.ndarray) -> list[np.ndarray]:
        """Decoded chunks ``chunks`` (global chunk indices, ascending) of object ``obj``."""
        path = self._root / self._key((obj, *self._tail))
        try:
            f = open(path, "rb")
        except FileNotFoundError:
            raise ChunkError(f"{self.name}: object {path.name} of rows {obj * self.object_rows}.. is missing; "
                             "run `roicache cache validate`") from None
        with f:
            if not self._sharded:
                return [self._decode(f.read(), f"chunk {obj}")]
            n_index = self.per_object * 16 + 4
            f.seek(0, os.SEEK_END)
            if f.tell() < n_index:
                raise ChunkError(f"{self.name}: shard {obj} is truncated; run `roicache cache validate`")
            f.seek(-n_index, os.SEEK_END)
            raw_index = f.read(n_index)
            if google_crc32c.value(raw_index[:-4]).to_bytes(4, "little") != raw_index[-4:]:
                raise ChunkError(f"{self.name}: shard {obj} has a corrupt index; run `roicache cache validate`")
            index = np.frombuffer(raw_index[:-4], dtype="<u8").reshape(self.per_object, 2)
            out = []
            for c in chunks:
                offset, nbytes = index[int(c) - obj * self.per_object]
                if offset == _EMPTY:
                    out.append(np.zeros((self.chunk_rows, *self.trailing), dtype=self.dtype))
                    continue
                f.seek(int(offset))
                out.append(self._decode(f.read(int(nbytes)), f"shard {obj} chunk {int(c)}"))
            return out

    def read(self, rows: np.ndarray) -> np.ndarray:
        """Rows ``rows`` (int64, ascending, unique) as ``[len(rows), *trailing]``."""
        rows = np.asarray(rows, dtype=np.int64)
        out = np.empty((len(rows), *self.trailing), dtype=self.dtype)
        if not len(rows):
            return out
        chunk_of = rows // self.chunk_rows
        chunks, first = np.unique(chunk_of, return_index=True)
        bounds = np.append(first, len(rows))  # rows of chunks[j]: rows[bounds[j]:bounds[j+1]]
        objects = chunks // self.per_object
        cut = np.flatnonzero(np.diff(objects)) + 1
        groups = np.split(np.arange(len(chunks)), cut)

        def one(group: np.ndarray) -> None:
            decoded = self._object_chunks(int(objects[group[0]]), chunks[group])
            for j, chunk in zip(group, decoded):
                a, b = bounds[j], bounds[j + 1]
                out[a:b] = chunk[rows[a:b] - chunks[j] * self.chunk_rows]

        if len(groups) <= 2:
            for g in groups:
                one(g)
        else:
            # A few contiguous batches per thread: per-task overhead exceeds a small chunk's read.
            n = min(len(groups), 4 * min(16, 2 * available_cores()))
            edges = np.linspace(0, len(groups), n + 1).astype(int)
            batches = [groups[a:b] for a, b in zip(edges[:-1], edges[1:])]
            for _ in _pool().map(lambda batch: [one(g) for g in batch], batches):
                pass
        return out


def zarr_rows(arr: zarr.Array, rows: np.ndarray) -> np.ndarray:
    """Rows ``rows`` (int64, ascending, unique) of ``arr`` through zarr (any store): one slice per
    run of consecutive rows, fetched concurrently — 4x faster than zarr's integer-array
    selection, whose coordinate indexer costs more than the reads (bench_store_read.py)."""
    out = np.empty((len(rows), *arr.shape[1:]), dtype=arr.dtype)
    if not len(rows):
        return out
    cut = np.flatnonzero(np.diff(rows) != 1) + 1
    runs = [(int(r[0]), int(r[-1]) + 1) for r in np.split(rows, cut)]
    offsets = np.concatenate([[0], np.cumsum([b - a for a, b in runs])])
    aa = arr.async_array
    for w in range(0, len(runs), _RUNS_PER_CALL):
        window = runs[w:w + _RUNS_PER_CALL]

        async def fetch(window: list[tuple[int, int]] = window) -> list:
            return await asyncio.gather(*(aa.getitem((slice(a, b),)) for a, b in window))

        for j, values in enumerate(sync(fetch()), start=w):
            out[offsets[j]:offsets[j + 1]] = np.asarray(values)
    return out

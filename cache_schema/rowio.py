"""Direct row reads (and whole-object writes) of a local store's per-RoI arrays, beside zarr's own.

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


def io_pool() -> ThreadPoolExecutor:
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
            for _ in io_pool().map(lambda batch: [one(g) for g in batch], batches):
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


_SHUFFLE = {"noshuffle": 0, "shuffle": 1, "bitshuffle": 2}


class BlockWriter:
    """Direct writes of whole objects (chunks, or shards) of one array of a local store: the
    same bytes zarr writes (tested byte for byte), without its per-chunk Python and event loop.

    Why (bench_extract.py, RESULTS.md): zarr's sharding encoder spent ~24 ms of CPU per image of
    the embedded detector committing its RoIs, most of it Python per inner chunk; here it is
    ~19 ms including labelling and padding, the bulk in Blosc and crc32c (which release the GIL),
    and one file write per object, atomically (a temporary file, then a rename, as zarr's local
    store does).
    """

    def __init__(self, arr: zarr.Array, reader: RowReader, blosc: BloscCodec | None, skip_empty: bool) -> None:
        self.reader, self.skip_empty = reader, skip_empty
        self.dtype = reader.dtype
        self._blosc = None if blosc is None else _blosc.Blosc(
            cname=blosc.cname.value, clevel=blosc.clevel, shuffle=_SHUFFLE[blosc.shuffle.value],
            blocksize=blosc.blocksize, typesize=blosc.typesize)
        self.rows = arr.shape[0]

    @classmethod
    def for_array(cls, arr: zarr.Array) -> "BlockWriter | None":
        """A direct writer of ``arr`` (as opened for writing: its ``write_empty_chunks`` decides
        whether all-zero inner chunks are left out of a shard), or ``None`` for zarr."""
        reader = RowReader.for_array(arr)
        if reader is None:
            return None
        chain = arr.metadata.codecs[0].codecs if reader._sharded else arr.metadata.codecs
        blosc = next((c for c in chain if isinstance(c, BloscCodec)), None)
        if blosc is not None and (blosc.typesize is None or blosc.shuffle.value not in _SHUFFLE):
            return None
        return cls(arr, reader, blosc, skip_empty=reader._sharded and not arr.config.write_empty_chunks)

    def aligned(self, start: int, stop: int) -> bool:
        """Whether rows ``[start, stop)`` are whole objects (the last may end at the array's end)."""
        per = self.reader.object_rows
        return start % per == 0 and (stop % per == 0 or stop == self.rows)

    def _chunk(self, values: np.ndarray) -> bytes:
        raw = np.ascontiguousarray(values, dtype=self.dtype).reshape(-1).view(np.uint8)
        body = raw.tobytes() if self._blosc is None else self._blosc.encode(raw)
        return bytes(body) + google_crc32c.value(body).to_bytes(4, "little")

    def _object(self, values: np.ndarray) -> bytes | None:
        """Encoded object of ``object_rows`` rows (zero-padded past the array's end)."""
        r = self.reader
        if not r._sharded:
            return self._chunk(values)
        index = np.full((r.per_object, 2), np.iinfo(np.uint64).max, dtype="<u8")
        parts, offset = [], 0
        for j in range(r.per_object):
            chunk = values[j * r.chunk_rows:(j + 1) * r.chunk_rows]
            if self.skip_empty and not chunk.any():
                continue  # zarr leaves all-fill inner chunks out; they read as zeros
            data = self._chunk(chunk)
            index[j] = (offset, len(data))
            parts.append(data)
            offset += len(data)
        if not parts:
            return None
        raw_index = index.tobytes()
        return b"".join(parts) + raw_index + google_crc32c.value(raw_index).to_bytes(4, "little")

    def write(self, start: int, values: np.ndarray) -> None:
        """Write rows ``[start, start + len(values))``, whole objects (:meth:`aligned`)."""
        r = self.reader
        per = r.object_rows
        for a in range(0, len(values), per):
            obj = (start + a) // per
            block = values[a:a + per]
            if len(block) < per:  # the array's last object: zarr stores it full-size
                block = np.concatenate([block, np.zeros((per - len(block), *block.shape[1:]), dtype=block.dtype)])
            data = self._object(block)
            path = r._root / r._key((obj, *r._tail))
            if data is None:
                path.unlink(missing_ok=True)  # as zarr deletes a shard left with nothing in it
                continue
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f"{path.name}.{os.getpid()}.{id(block)}.partial")
            tmp.write_bytes(data)
            os.replace(tmp, path)

"""The direct row reader equals zarr on every array and codec path the layouts write."""

from __future__ import annotations

import numpy as np
import pytest
import zarr

from cache_schema import create_store, finalize, open_store
from cache_schema.errors import ChunkError
from cache_schema.layout import ArraySpec, KIND_ROI
from cache_schema.rowio import BlockWriter, RowReader, zarr_rows
from cache_schema.store import create_array
from cache_schema.tiny import tiny_inputs, write_images
from tests.store_objects import object_of


def _store(tmp_path, version: int):
    inputs = tiny_inputs(seed=3, split_images=(("train", 9), ("val", 5)), schema_version=version)
    store = create_store(tmp_path / f"v{version}.zarr", meta=inputs.meta, classes=inputs.classes, splits=list(inputs.specs))
    for spec in inputs.specs:
        write_images(store, inputs, split=spec.name)
    assert finalize(store)
    return open_store(tmp_path / f"v{version}.zarr")


@pytest.mark.parametrize("version", [1, 2])
def test_direct_reads_equal_zarr_for_every_array(tmp_path, version):
    store = _store(tmp_path, version)
    rng = np.random.default_rng(0)
    checked = set()
    for name in store.splits:
        split = store.split(name)
        for path in split.roi_array_paths():
            arr = split.array(path)
            reader = RowReader.for_array(arr)
            assert reader is not None, path  # every array the layout writes takes the direct path
            n = arr.shape[0]
            for rows in (np.arange(n), np.sort(rng.choice(n, size=max(1, n // 3), replace=False)), np.array([n - 1])):
                want = arr.get_orthogonal_selection((rows,))
                np.testing.assert_array_equal(reader.read(rows), want, err_msg=f"{name}/{path}")
                np.testing.assert_array_equal(zarr_rows(arr, rows), want, err_msg=f"{name}/{path} (zarr_rows)")
            checked.add((arr.shards is not None, reader._blosc, str(arr.dtype)))
    # Both codec paths of the layout (sharded or not, Blosc or not) and several dtypes were covered.
    assert {sharded for sharded, _, _ in checked} == ({True, False} if version == 2 else {False})
    assert len({dtype for _, _, dtype in checked}) >= 4


def test_inner_chunks_never_written_read_as_zeros_like_zarr(tmp_path):
    group = zarr.open_group(tmp_path / "g.zarr", mode="w", zarr_format=3)
    spec = ArraySpec(path="a", shape=(64, 3), chunks=(8, 3), shards=(32, 3), dtype=np.dtype(np.float16), kind=KIND_ROI,
                     clevel=1)
    arr = group.create_array(name="a", shape=spec.shape, chunks=spec.chunks, shards=spec.shards, dtype=spec.dtype,
                             compressors=spec.compressors(), fill_value=0)  # zarr skips all-zero inner chunks here
    values = np.arange(64 * 3, dtype=np.float16).reshape(64, 3)
    values[8:24] = 0
    arr[:] = values
    rows = np.arange(64)
    np.testing.assert_array_equal(RowReader.for_array(arr).read(rows), arr[:])


def test_a_missing_or_truncated_object_is_an_error_not_zeros(tmp_path):
    store = _store(tmp_path, 2)
    split = store.split("train")
    path, holders = object_of(tmp_path / "v2.zarr", "train", "feat/pooled", 2)
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    fresh = open_store(tmp_path / "v2.zarr").split("train")
    with pytest.raises(ChunkError, match="run `roicache cache validate`"):
        fresh.load(level="pooled", images=[holders[0]])
    path.unlink()
    arr = fresh.array("feat/pooled")
    rows = np.arange(holders[0] * split.stride, holders[0] * split.stride + 1)
    assert not arr.get_orthogonal_selection((rows,)).any()  # zarr: silent zeros
    with pytest.raises(ChunkError, match="is missing"):
        RowReader.for_array(arr).read(rows)


def test_other_stores_and_codecs_fall_back_to_zarr(tmp_path):
    group = zarr.open_group("memory://rowio-test", mode="w", zarr_format=3)
    spec = ArraySpec(path="a", shape=(16, 2), chunks=(4, 2), dtype=np.dtype(np.float32), kind=KIND_ROI, clevel=5)
    assert RowReader.for_array(create_array(group, spec)) is None  # not a local store
    local = zarr.open_group(tmp_path / "z.zarr", mode="w", zarr_format=3)
    other = local.create_array(name="b", shape=(16, 2), chunks=(4, 2), dtype=np.float32, compressors=[zarr.codecs.ZstdCodec()])
    assert RowReader.for_array(other) is None  # a codec chain the layout does not write


def test_direct_block_writes_are_the_bytes_zarr_writes(tmp_path):
    """Commit blocks written by BlockWriter and the same blocks written through zarr's own API:
    the same object files, byte for byte (sharded and unsharded arrays, padding, empty images)."""
    inputs = tiny_inputs(seed=4, split_images=(("train", 9), ("val", 5)))
    stores = {}
    for how in ("direct", "zarr"):
        store = create_store(tmp_path / f"{how}.zarr", meta=inputs.meta, classes=inputs.classes, splits=list(inputs.specs))
        for spec in inputs.specs:
            split = store.split(spec.name)
            rows = inputs.rows[spec.name]
            for a in range(0, split.num_images, split.commit_block):
                images = list(rows[a:a + split.commit_block])
                if how == "direct":
                    assert all(BlockWriter.for_array(split.array(p)) is not None for p in split.roi_array_paths())
                    split.write_block(a, images)
                    continue
                k = split.stride
                for path, (dtype, trailing) in split.roi_array_paths().items():
                    block = np.zeros((len(images) * k, *trailing), dtype=dtype)
                    for j, im in enumerate(images):
                        block[j * k:j * k + len(im[path])] = im[path]
                    split.array(path)[a * k:(a + len(images)) * k] = block
        stores[how] = tmp_path / f"{how}.zarr"

    def objects(root):
        return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*")
                if p.is_file() and "/c/" in p.as_posix() and "/images/" not in p.as_posix()}

    direct, via_zarr = objects(stores["direct"]), objects(stores["zarr"])
    assert sorted(direct) == sorted(via_zarr) and len(direct) > 10
    for key in via_zarr:
        assert direct[key] == via_zarr[key], key
    assert any("feat/pooled" in key for key in direct)  # sharded objects among them

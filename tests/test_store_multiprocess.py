"""Shards in separate processes fill one store exactly as one process would."""

from __future__ import annotations

import multiprocessing as mp

import numpy as np

from cache_schema import create_store, finalize, open_for_resume, open_store
from cache_schema.tiny import tiny_inputs, write_images

SEED = 11
SPLITS = (("train", 6), ("val", 4))


def _shard(path: str, rank: int, world: int) -> None:
    """One extraction shard: resume-open with the same meta, write the commit blocks b with
    b % world == rank (writers own whole blocks: the objects of a block are shared by its images)."""
    inputs = tiny_inputs(seed=SEED, split_images=SPLITS)
    store = open_for_resume(path, inputs.meta)
    for name, n in SPLITS:
        block = store.split(name).commit_block
        for b, a in enumerate(range(0, n, block)):
            if b % world == rank:
                store.split(name).write_block(a, list(inputs.rows[name][a:a + block]))
    finalize(store)


def _all_arrays(path) -> dict[str, np.ndarray]:
    store = open_store(path)
    out = {}
    for name in store.splits:
        group = store.split(name).group
        for key, arr in group.arrays():
            out[f"{name}/{key}"] = arr[:]
        for sub in ("images", "rois", "feat", "gt"):
            for key, arr in group[sub].arrays():
                out[f"{name}/{sub}/{key}"] = arr[:]
    return out


def test_two_spawned_processes_equal_one(tmp_path):
    inputs = tiny_inputs(seed=SEED, split_images=SPLITS)
    args = dict(meta=inputs.meta, classes=inputs.classes, splits=list(inputs.specs))
    single = create_store(tmp_path / "one.zarr", **args)
    for name, _ in SPLITS:
        write_images(single, inputs, split=name)
    assert finalize(single)

    create_store(tmp_path / "two.zarr", **args)
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_shard, args=(str(tmp_path / "two.zarr"), rank, 2)) for rank in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert [p.exitcode for p in procs] == [0, 0]

    two = open_store(tmp_path / "two.zarr")
    # Whichever shard finished last saw every image done and marked the store complete.
    assert two.is_complete
    a, b = _all_arrays(tmp_path / "one.zarr"), _all_arrays(tmp_path / "two.zarr")
    assert sorted(a) == sorted(b) and len(a) > 20
    for key in a:
        assert a[key].dtype == b[key].dtype and np.array_equal(a[key], b[key]), key
    # No temporary files of zarr's atomic writes were left behind.
    assert not list((tmp_path / "two.zarr").rglob("*.partial"))

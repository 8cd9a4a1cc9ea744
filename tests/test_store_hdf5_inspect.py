"""HDF5 export equals the store; inspect reports hand-checkable counts."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest

from cache_schema import create_store, export_hdf5, finalize, inspect_store, open_store
from cache_schema.errors import StoreIncompleteError
from cache_schema.summary import class_bins
from cache_schema.tiny import tiny_inputs, write_images


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    inputs = tiny_inputs(seed=9)
    path = tmp_path_factory.mktemp("h5") / "s.zarr"
    store = create_store(path, meta=inputs.meta, classes=inputs.classes, splits=list(inputs.specs))
    for name in store.splits:
        write_images(store, inputs, split=name)
    assert finalize(store)
    return inputs, path


def test_hdf5_export_equals_store(built, tmp_path):
    inputs, path = built
    out = export_hdf5(path, tmp_path / "out" / "s.h5")
    assert out == tmp_path / "out" / "s.h5" and not list(out.parent.glob("*.partial-*"))
    store = open_store(path)
    with h5py.File(out, "r") as h5:
        assert json.loads(h5.attrs["roicache"]) == store.meta.to_dict()
        assert bool(h5.attrs["complete"]) is True
        for name in ("category_id", "instance_count", "csr_indptr", "csr_images"):
            assert np.array_equal(h5[f"classes/{name}"][:], store.group["classes"][name][:])
        assert [s.decode() for s in h5["classes/name"][:]] == list(store.classes.names)
        for spec in inputs.specs:
            split = store.split(spec.name)
            g = h5[spec.name]
            assert json.loads(g.attrs["roicache_split"])["roi_stride"] == split.stride
            counts = split.num_rois()
            assert np.array_equal(g["images/roi_offsets"][:], np.concatenate([[0], np.cumsum(counts)]))
            assert np.array_equal(g["images/id"][:], spec.image_ids)
            assert [s.decode() for s in g["images/file_name"][:]] == list(spec.file_names)
            assert np.array_equal(g["gt/boxes"][:], spec.gt.boxes)
            for path_, (dtype, _) in split.roi_array_paths().items():
                expected = np.concatenate([r[path_] for r in inputs.rows[spec.name]])
                got = g[path_][:]
                assert got.dtype == dtype and got.shape == expected.shape, path_
                assert np.array_equal(got.view(np.uint8), expected.view(np.uint8)), path_


def test_hdf5_export_subset_and_refuses_incomplete(built, tmp_path):
    inputs, path = built
    out = export_hdf5(path, tmp_path / "val.h5", splits=["val"], levels=["fc"])
    with h5py.File(out, "r") as h5:
        assert list(h5.keys()) == ["classes", "val"]
        assert list(h5["val/feat"].keys()) == ["fc"]
    partial = tmp_path / "partial.zarr"
    store = create_store(partial, meta=inputs.meta, classes=inputs.classes, splits=list(inputs.specs))
    write_images(store, inputs, split="train", images=[0])
    with pytest.raises(StoreIncompleteError):
        export_hdf5(partial, tmp_path / "p.h5")
    assert not (tmp_path / "p.h5").exists() and not list(tmp_path.glob("p.h5.partial-*"))


def test_inspect_counts(built):
    inputs, path = built
    summary = inspect_store(path)
    c = inputs.meta.num_classes
    bins = class_bins(inputs.classes.instance_count)
    assert summary.complete and summary.num_classes == c
    assert summary.classes_per_bin == tuple(np.bincount(bins, minlength=4))
    for s, spec in zip(summary.splits, inputs.specs):
        labels = np.concatenate([r["rois/labels"] for r in inputs.rows[spec.name]])
        fg = labels[labels < c]
        assert s.num_rois == len(labels) and s.done_images == spec.num_images
        assert s.foreground_ratio == pytest.approx(len(fg) / len(labels))
        assert s.fg_rois_per_bin == tuple(np.bincount(bins[fg], minlength=4))
        assert [lv.name for lv in s.levels] == ["fc", "pooled"]
        assert s.levels[0].raw_bytes_per_roi == 16 * 2 and s.levels[0].stored_bytes_per_roi > 0
    text = summary.format()
    assert "complete" in text and "[train]" in text and "level fc [16]" in text


def test_class_bins_edges():
    assert class_bins(np.array([0, 9, 10, 99, 100, 999, 1000, 10**6])).tolist() == [0, 0, 1, 1, 2, 2, 3, 3]

"""Round trips through a real zarr store: what is written is read back bit-identically."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cache_schema import ROI_COLUMNS, create_store, finalize, open_store, validate_store
from cache_schema.errors import ConfigError, SchemaError, StoreExistsError, StoreIncompleteError
from cache_schema.tiny import tiny_inputs, write_images


def _expected(inputs, split: str, images: list[int], path: str) -> np.ndarray:
    return np.concatenate([inputs.rows[split][i][path] for i in images])


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    inputs = tiny_inputs(seed=3)
    path = tmp_path_factory.mktemp("rt") / "store.zarr"
    store = create_store(path, meta=inputs.meta, classes=inputs.classes, splits=list(inputs.specs))
    for name in store.splits:
        write_images(store, inputs, split=name)
    assert finalize(store)
    return inputs, path


def test_load_is_bit_identical_and_compacted(built):
    inputs, path = built
    store = open_store(path)
    assert store.is_complete
    for spec in inputs.specs:
        split = store.split(spec.name)
        counts = np.asarray([len(r["rois/labels"]) for r in inputs.rows[spec.name]])
        mask_cols = ("mask_logits", "mask_area", "mask_inter") if spec.with_masks else ()
        cols = tuple(c for c in ROI_COLUMNS if not c.startswith("mask_") or c in mask_cols)
        for level in spec.levels:
            rs = split.load(level=level, columns=cols)
            everything = list(range(spec.num_images))
            assert len(rs) == counts.sum()
            assert rs.features.dtype == torch.float16
            assert np.array_equal(rs.features.numpy().view(np.uint16), _expected(inputs, spec.name, everything, f"feat/{level}").view(np.uint16))
            for col in ("boxes", "objectness", "is_gt", "logits", "reg_boxes") + mask_cols:
                assert np.array_equal(getattr(rs, col).numpy(), _expected(inputs, spec.name, everything, f"rois/{col}")), col
            assert rs.labels.dtype == torch.int64 and rs.gt_index.dtype == torch.int64
            assert np.array_equal(rs.labels.numpy(), _expected(inputs, spec.name, everything, "rois/labels"))
            assert np.array_equal(rs.gt_index.numpy(), _expected(inputs, spec.name, everything, "rois/gt_index"))
            assert np.array_equal(rs.ious.numpy(), _expected(inputs, spec.name, everything, "rois/ious"))
            # Offsets are the cumulative counts; image 1 has 0 RoIs, the last has exactly K.
            assert rs.image_offsets.tolist() == [0, *np.cumsum(counts).tolist()]
            assert rs.images.tolist() == everything
            assert rs.image_index.tolist() == np.repeat(everything, counts).tolist()
            assert counts[1] == 0 and counts[-1] == spec.stride


def test_padding_rows_are_zero_in_the_raw_arrays(built):
    inputs, path = built
    split = open_store(path).split("train")
    k = split.stride
    raw = split.array("feat/fc")[:]
    for i, rows in enumerate(inputs.rows["train"]):
        n = len(rows["rois/labels"])
        assert not raw[i * k + n:(i + 1) * k].any()


def test_image_block_equals_rows_of_load(built):
    inputs, path = built
    split = open_store(path).split("val")
    cols = ("boxes", "logits", "mask_logits", "gt_index")
    full = split.load(level="pooled", columns=cols)
    for j in range(split.num_images):
        block = split.image_block(j, level="pooled", columns=cols)
        rows = full.rows_of(j)
        assert block.images.tolist() == [j]
        for name in ("features", "labels", "ious", *cols):
            assert torch.equal(getattr(block, name), getattr(full, name)[rows]), name


def test_load_subset_in_given_order_and_iter_blocks(built):
    inputs, path = built
    split = open_store(path).split("train")
    rs = split.load(level="fc", images=[4, 0, 5])
    assert rs.images.tolist() == [4, 0, 5]
    assert np.array_equal(rs.features.numpy(), _expected(inputs, "train", [4, 0, 5], "feat/fc"))
    blocks = list(split.iter_blocks(level="fc", columns=("boxes",), images_per_block=4))
    assert [b.images.tolist() for b in blocks] == [[0, 1, 2, 3], [4, 5]]
    full = split.load(level="fc", columns=("boxes",))
    assert torch.equal(torch.cat([b.features for b in blocks]), full.features)
    assert torch.equal(torch.cat([b.boxes for b in blocks]), full.boxes)
    assert split.nbytes("fc") == len(full) * 16 * 2


def test_tables_and_classes_round_trip(built):
    inputs, path = built
    store = open_store(path)
    c = store.classes
    ref = inputs.classes
    assert c.names == ref.names and c.category_ids == ref.category_ids and c.frequency == ref.frequency
    for name in ("instance_count", "image_count", "csr_indptr", "csr_images"):
        assert np.array_equal(getattr(c, name), getattr(ref, name)) and getattr(c, name).dtype == np.int64
    assert store.meta == inputs.meta
    for spec in inputs.specs:
        split = store.split(spec.name)
        assert np.array_equal(split.image_ids, spec.image_ids)
        assert np.array_equal(split.image_sizes, spec.image_sizes)
        assert split.file_names == spec.file_names
        gt = split.gt()
        for name in ("boxes", "labels", "image", "area", "ann_id"):
            assert np.array_equal(getattr(gt, name), getattr(spec.gt, name)) and getattr(gt, name).dtype == getattr(spec.gt, name).dtype
        assert split.has_gt_proposals == spec.has_gt_proposals and split.with_masks == spec.with_masks


def test_missing_level_and_masks_name_the_fix(built):
    _, path = built
    split = open_store(path).split("train")
    with pytest.raises(SchemaError, match=r"no feature level 'c5'.*stored levels: fc, pooled.*extract --levels c5"):
        split.load(level="c5")
    with pytest.raises(SchemaError, match="stores no mask logits"):
        split.load(columns=("mask_logits",))
    with pytest.raises(ConfigError, match="unknown RoI column"):
        split.load(columns=("scores",))


def test_incomplete_split_refused_then_read_partially(tmp_path):
    inputs = tiny_inputs(seed=1)
    store = create_store(tmp_path / "s.zarr", meta=inputs.meta, classes=inputs.classes, splits=list(inputs.specs))
    write_images(store, inputs, split="train", images=[0, 2, 5])
    assert not finalize(store) and not open_store(tmp_path / "s.zarr").is_complete
    split = open_store(tmp_path / "s.zarr").split("train")
    with pytest.raises(StoreIncompleteError, match=r"3 of 6 requested images are not extracted yet \(3/6 done"):
        split.load(level="fc")
    with pytest.raises(StoreIncompleteError):
        split.image_block(1)
    rs = split.load(level="fc", require_complete=False)
    assert rs.images.tolist() == [0, 2, 5]
    assert np.array_equal(rs.features.numpy(), _expected(inputs, "train", [0, 2, 5], "feat/fc"))
    assert split.done().tolist() == [True, False, True, False, False, True]


def test_write_image_validates_rows_dtypes_and_names(tmp_path):
    inputs = tiny_inputs(seed=2)
    store = create_store(tmp_path / "s.zarr", meta=inputs.meta, classes=inputs.classes, splits=list(inputs.specs))
    split = store.split("train")
    good = inputs.rows["train"][0]
    too_many = {p: np.concatenate([v] * 20) for p, v in good.items()}
    with pytest.raises(SchemaError, match=f"more than the stride K={split.stride}"):
        split.write_image(0, arrays=too_many)
    with pytest.raises(SchemaError, match=r"missing arrays \['feat/fc'\]"):
        split.write_image(0, arrays={p: v for p, v in good.items() if p != "feat/fc"})
    with pytest.raises(SchemaError, match="rois/labels has dtype float32"):
        split.write_image(0, arrays={**good, "rois/labels": good["rois/labels"].astype(np.float32)})
    with pytest.raises(SchemaError, match="labels must lie in"):
        split.write_image(0, arrays={**good, "rois/labels": good["rois/labels"] + 10})
    # float32 features are accepted and stored as float16 (same-kind cast).
    split.write_image(0, arrays={**good, "feat/fc": good["feat/fc"].astype(np.float32)})
    assert split.done()[0] and not split.done()[1:].any()
    with pytest.raises(ConfigError, match="read-only"):
        open_store(tmp_path / "s.zarr").split("train").write_image(0, arrays=good)


def test_create_refuses_existing_and_foreign_paths(tmp_path):
    inputs = tiny_inputs(seed=4, split_images=(("train", 2),))
    args = dict(meta=inputs.meta, classes=inputs.classes, splits=list(inputs.specs))
    create_store(tmp_path / "s.zarr", **args)
    with pytest.raises(StoreExistsError, match="already exists"):
        create_store(tmp_path / "s.zarr", **args)
    fresh = create_store(tmp_path / "s.zarr", overwrite=True, **args)
    assert not fresh.split("train").done().any()
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("keep me")
    with pytest.raises(StoreExistsError, match="not a roicache store"):
        create_store(tmp_path / "other", overwrite=True, **args)
    assert (tmp_path / "other" / "notes.txt").read_text() == "keep me"
    with pytest.raises(SchemaError, match="no roicache store"):
        open_store(tmp_path / "missing.zarr")


def test_file_and_memory_urls(tmp_path):
    inputs = tiny_inputs(seed=5, split_images=(("train", 3),))
    store = create_store(tmp_path / "s.zarr", meta=inputs.meta, classes=inputs.classes, splits=list(inputs.specs))
    write_images(store, inputs, split="train")
    by_url = open_store(f"file://{tmp_path / 's.zarr'}")
    assert type(by_url.group.store).__name__ == "FsspecStore"
    local = open_store(tmp_path / "s.zarr").split("train").load(level="pooled", columns=("boxes",))
    remote = by_url.split("train").load(level="pooled", columns=("boxes",))
    assert torch.equal(local.features, remote.features) and torch.equal(local.boxes, remote.boxes)
    # memory:// goes through zarr's generic (non-file) read and write paths end to end.
    url = f"memory://roicache-test-{tmp_path.name}/s.zarr"
    mem = create_store(url, meta=inputs.meta, classes=inputs.classes, splits=list(inputs.specs))
    write_images(mem, inputs, split="train")
    assert finalize(mem)
    again = open_store(url)
    assert again.is_complete
    rs = again.split("train").load(level="pooled", columns=("boxes",), images=[2, 0])
    assert np.array_equal(rs.features.numpy(), _expected(inputs, "train", [2, 0], "feat/pooled"))
    assert torch.equal(again.split("train").image_block(2, level="fc").features, torch.from_numpy(inputs.rows["train"][2]["feat/fc"]))
    report = validate_store(url)
    # Every object decoded: tables, classes, marks, 7 narrow RoI arrays, 2 wide ones (3 shards each).
    assert report.ok and report.chunks_checked > 20


def test_interrupted_creation_is_refused(tmp_path):
    inputs = tiny_inputs(seed=6, split_images=(("train", 2),))
    store = create_store(tmp_path / "s.zarr", meta=inputs.meta, classes=inputs.classes, splits=list(inputs.specs))
    store.group.attrs["initialized"] = False  # what a crash inside create_store leaves behind
    with pytest.raises(SchemaError, match="is not initialized"):
        open_store(tmp_path / "s.zarr")
    store = create_store(tmp_path / "s.zarr", meta=inputs.meta, classes=inputs.classes, splits=list(inputs.specs), overwrite=True)
    assert open_store(tmp_path / "s.zarr").split("train").num_images == 2


def _load_sum(path: str, queue) -> None:
    rs = open_store(path).split("train").load(level="fc")
    queue.put(float(rs.features.numpy().astype(np.float64).sum()))  # numpy: no torch kernels in the child


def test_reader_works_in_a_forked_child(built):
    """A forked child (like a DataLoader worker) inherits the parent's reader pool object but not
    its threads, nor torch's; the reader must neither reuse the dead pool nor run torch kernels."""
    import multiprocessing as mp

    _, path = built
    parent = float(open_store(path).split("train").load(level="fc").features.numpy().astype(np.float64).sum())
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_load_sum, args=(str(path), queue))
    child.start()
    child.join(timeout=60)
    assert child.exitcode == 0
    assert queue.get(timeout=5) == parent

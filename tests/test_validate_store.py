"""validate_store finds real damage, each finding on one line that names where and how to fix it."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cache_schema import create_store, finalize, open_store, validate_store
from cache_schema.errors import SchemaError
from cache_schema.runtime import sha256_file
from cache_schema.tiny import tiny_inputs, write_images
from tests.store_objects import describe, object_of


@pytest.fixture()
def store_dir(tmp_path):
    """A complete tiny store built from a real checkpoint and annotation file (hashed)."""
    ckpt = tmp_path / "detector.pt"
    ckpt.write_bytes(b"weights" * 100)
    ann = tmp_path / "train.json"
    ann.write_text(json.dumps({"images": [], "annotations": []}))
    inputs = tiny_inputs(seed=7, split_images=(("train", 5),), checkpoint_sha256=sha256_file(ckpt), annotation_sha256=sha256_file(ann))
    path = tmp_path / "s.zarr"
    store = create_store(path, meta=inputs.meta, classes=inputs.classes, splits=list(inputs.specs))
    write_images(store, inputs, split="train")
    assert finalize(store)
    return path, ckpt, ann, inputs


def _one_line(report) -> None:
    assert not report.ok
    assert all("\n" not in p and p for p in report.problems)
    assert report.format().count("\n") == len(report.problems) - 1


def test_clean_store_is_ok_with_matching_inputs(store_dir):
    path, ckpt, ann, _ = store_dir
    report = validate_store(path, checkpoint=ckpt, annotations={"train": ann})
    assert report.ok, report.problems
    # Every object decoded: 2 commit blocks x (7 narrow RoI arrays + 2 wide + 2 marks) at least.
    assert report.chunks_checked > 2 * 11
    assert report.incomplete == {"train": 0}


def test_deleted_chunk_is_reported_with_array_and_rows(store_dir):
    path, *_ = store_dir
    obj, holders = object_of(path, "train", "feat/fc", 3)
    obj.unlink()
    report = validate_store(path)
    _one_line(report)
    stride = open_store(path).split("train").stride
    assert report.problems == [
        f"train/feat/fc: object(s) missing for {describe(holders, stride)}; "
        "clear them with `roicache cache invalidate STORE --split SPLIT --images ...` and rerun extract with --resume"
    ]
    assert 3 in holders and len(holders) > 1  # one object holds a block of images


def test_truncated_chunk_is_reported(store_dir):
    path, *_ = store_dir
    chunk, holders = object_of(path, "train", "rois/logits", 2)
    chunk.write_bytes(chunk.read_bytes()[:-7])
    report = validate_store(path)
    _one_line(report)
    assert len(report.problems) == 1
    stride = open_store(path).split("train").stride
    assert report.problems[0].startswith(f"train/rois/logits: object(s) corrupt or truncated for {describe(holders, stride)}")
    # A shallow check lists files only and so cannot see it.
    assert validate_store(path, deep=False).ok


def test_flipped_byte_in_a_table_is_reported(store_dir):
    path, *_ = store_dir
    chunk = path / "train" / "gt" / "boxes" / "c" / "0" / "0"
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0xFF
    chunk.write_bytes(bytes(data))
    report = validate_store(path)
    assert len(report.problems) == 1 and report.problems[0].startswith("train/gt/boxes: object(s) corrupt or truncated for chunk 0")


def test_wrong_schema_version(store_dir):
    path, *_ = store_dir
    meta_file = path / "zarr.json"
    doc = json.loads(meta_file.read_text())
    doc["attributes"]["roicache"]["schema_version"] = 99
    meta_file.write_text(json.dumps(doc))
    report = validate_store(path)
    assert report.problems == ["store schema version 99 is not supported by this roicache (reads 1, 2); re-extract it or upgrade roicache"]
    with pytest.raises(SchemaError, match="schema version 99 is not supported"):
        open_store(path)


def test_mismatched_checkpoint_and_annotation(store_dir, tmp_path):
    path, ckpt, ann, _ = store_dir
    other_ckpt = tmp_path / "other.pt"
    other_ckpt.write_bytes(b"other weights")
    other_ann = tmp_path / "other.json"
    other_ann.write_text("{}")
    report = validate_store(path, checkpoint=other_ckpt, annotations={"train": other_ann, "val": ann})
    _one_line(report)
    assert len(report.problems) == 3
    assert report.problems[0].startswith(f"checkpoint {other_ckpt} (sha256 {sha256_file(other_ckpt)[:12]}...) is not the detector")
    assert report.problems[1].startswith(f"annotation file {other_ann} (sha256")
    assert "split 'val', which the store does not record" in report.problems[2]


def test_incomplete_store_reports_counts_and_invalidate_repairs(store_dir):
    path, _, _, inputs = store_dir
    store = open_store(path, mode="r+")
    store.invalidate(split="train", images=[1, 4])
    report = validate_store(path)
    assert report.incomplete == {"train": 2}
    assert report.problems == ["train: 2 of 5 images are not extracted yet; resume extraction (--resume)"]
    assert not open_store(path).is_complete
    write_images(store, inputs, split="train", images=[1, 4])
    assert finalize(store) and validate_store(path).ok


def test_not_a_store(tmp_path):
    report = validate_store(tmp_path / "nothing")
    assert not report.ok and len(report.problems) == 1 and "no zarr store" in report.problems[0]
    np.testing.assert_equal(report.chunks_checked, 0)

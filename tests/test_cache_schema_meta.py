"""Metadata records: validation, dict round trips, resume matching."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest

from cache_schema import (
    SCHEMA_VERSION,
    ExtractionSettings,
    GtTable,
    SplitSpec,
    StoreMeta,
    create_store,
    meta_differences,
    open_for_resume,
)
from cache_schema.errors import SchemaError, StoreMismatchError
from cache_schema.layout import split_layout
from cache_schema.tiny import fake_sha, tiny_inputs


def test_store_meta_round_trips_through_json():
    meta = tiny_inputs(seed=1).meta
    again = StoreMeta.from_dict(json.loads(json.dumps(meta.to_dict())))
    assert again == meta
    assert again.detector.levels == {"fc": (16,), "pooled": (4, 2, 2)}
    assert again.schema_version == SCHEMA_VERSION == 2


def test_unknown_schema_version_message():
    d = tiny_inputs().meta.to_dict()
    d["schema_version"] = 3
    with pytest.raises(SchemaError) as err:
        StoreMeta.from_dict(d)
    assert str(err.value) == "store schema version 3 is not supported by this roicache (reads 1, 2); re-extract it or upgrade roicache"
    d["schema_version"] = 1  # version 1 stays readable
    assert StoreMeta.from_dict(d).schema_version == 1


def test_records_reject_bad_values():
    meta = tiny_inputs().meta
    with pytest.raises(SchemaError, match="64 lowercase hex"):
        replace(meta.detector, checkpoint_sha256="abc")
    with pytest.raises(SchemaError, match="class counts disagree"):
        replace(meta, num_classes=5)
    with pytest.raises(SchemaError, match="bg_iou=0.6, fg_iou=0.5"):
        ExtractionSettings(rois_per_image=10, seed=0, bg_iou=0.6, fg_iou=0.5)
    with pytest.raises(SchemaError, match="reserved"):
        replace(meta, splits=("classes",))
    with pytest.raises(SchemaError, match="feature level name 'FC' is invalid"):
        replace(meta.detector, levels={"FC": (3,)})


def test_gt_table_and_split_spec_validation():
    gt = GtTable(boxes=[[0, 0, 1, 1]], labels=[2], image=[0], area=[1.0], ann_id=[5])
    assert gt.boxes.dtype == np.float32 and gt.labels.dtype == np.int32 and gt.ann_id.dtype == np.int64 and len(gt) == 1
    with pytest.raises(SchemaError, match=r"gt boxes has shape \(1, 3\)"):
        GtTable(boxes=[[0, 0, 1]], labels=[2], image=[0], area=[1.0], ann_id=[5])
    base = dict(name="train", image_ids=[1, 2], image_sizes=[[4, 4], [5, 5]], file_names=("a", "b"), stride=8, levels=("fc",), gt=gt)
    assert SplitSpec(**base).num_images == 2
    with pytest.raises(SchemaError, match="stride is 0"):
        SplitSpec(**{**base, "stride": 0})
    with pytest.raises(SchemaError, match="not unique"):
        SplitSpec(**{**base, "image_ids": [1, 1]})
    with pytest.raises(SchemaError, match=r"gt image positions must lie in \[0, 1\)"):
        SplitSpec(**{**base, "image_ids": [1], "image_sizes": [[4, 4]], "file_names": ("a",), "gt": replace(gt, image=np.array([1], np.int32))})


def test_layout_shapes_and_chunks_version_1():
    layout = split_layout(num_images=3, stride=8, num_gt=5, num_classes=4, levels={"fc": (16,)}, with_masks=True, mask_size=4,
                          image_block=64, version=1)
    assert layout["rois/logits"].shape == (24, 5) and layout["rois/logits"].chunks == (8, 5)
    assert layout["rois/mask_logits"].shape == (24, 4, 4) and layout["rois/mask_logits"].np_dtype == np.float16
    assert layout["feat/fc"].chunks == (8, 16) and layout["feat/fc"].clevel == 1 and layout["feat/fc"].shards is None
    assert layout["images/done"].chunks == (1,) and layout["images/id"].chunks == (3,)
    assert layout["gt/boxes"].shape == (5, 4)


def test_layout_version_2_shards_wide_arrays_and_blocks_narrow_ones():
    # LVIS-like sizes: 1,024 images, stride 320, commit block 32, R50-FPN levels, 1,203 classes.
    k, b = 320, 32
    layout = split_layout(num_images=1024, stride=k, num_gt=10, num_classes=1203,
                          levels={"fc": (1024,), "pooled": (256, 7, 7)}, with_masks=True, mask_size=28, image_block=b)
    # Narrow arrays and marks: one object per commit block.
    assert layout["rois/labels"].chunks == (b * k,) and layout["rois/labels"].shards is None
    assert layout["images/done"].chunks == (b,) and layout["images/num_rois"].chunks == (b,)
    # pooled: 25,088 B/row -> 8 MB per image; the largest power of two of images within 16 MiB
    # dividing the block is 2 -> shards of 640 rows; inner chunks of 128 KiB / 25,088 B -> 5 -> 4,
    # raised to the 8-row minimum.
    assert layout["feat/pooled"].shards == (2 * k, 256, 7, 7) and layout["feat/pooled"].chunks == (8, 256, 7, 7)
    # fc: 2,048 B/row -> 655 KB per image -> 16 images (10.5 MB) per shard (32 would pass 16 MiB);
    # inner chunks of 128 KiB / 2,048 B = 64 rows.
    assert layout["feat/fc"].shards == (16 * k, 1024) and layout["feat/fc"].chunks == (64, 1024)
    # logits (float32, 1,204 wide: 4,816 B/row): 1.5 MB per image -> 8 images (12.3 MB) per
    # shard; inner chunks of 128 KiB / 4,816 B = 27 -> 16 rows.
    assert layout["rois/logits"].shards == (8 * k, 1204) and layout["rois/logits"].chunks == (16, 1204)
    assert "rois/logits" not in split_layout(num_images=4, stride=16, num_gt=1, num_classes=3, levels={"fc": (8,)},
                                             with_masks=False, mask_size=4, image_block=4, store_logits=False)


def test_meta_differences_ignore_paths_and_time():
    meta = tiny_inputs().meta
    moved = replace(
        meta,
        detector=replace(meta.detector, checkpoint_path="/elsewhere/ckpt.pt"),
        extraction=replace(meta.extraction, created="2030-01-01T00:00:00+00:00"),
    )
    assert meta_differences(meta, moved) == []
    other = replace(meta, detector=replace(meta.detector, checkpoint_sha256=fake_sha("other")))
    diffs = meta_differences(meta, other)
    assert len(diffs) == 1 and diffs[0].startswith("detector.checkpoint_sha256: ")
    seeded = replace(meta, extraction=replace(meta.extraction, seed=123))
    assert meta_differences(meta, seeded) == ["extraction.seed: 0 != 123"]


def test_open_for_resume_checks_meta(tmp_path):
    inputs = tiny_inputs(seed=0, split_images=(("train", 2),))
    create_store(tmp_path / "s.zarr", meta=inputs.meta, classes=inputs.classes, splits=list(inputs.specs))
    later = replace(inputs.meta, extraction=replace(inputs.meta.extraction, created="2031-05-05T00:00:00+00:00"))
    assert open_for_resume(tmp_path / "s.zarr", later).writable
    changed = replace(inputs.meta, extraction=replace(inputs.meta.extraction, fg_iou=0.7))
    with pytest.raises(StoreMismatchError) as err:
        open_for_resume(tmp_path / "s.zarr", changed)
    msg = str(err.value)
    assert "\n" not in msg and "extraction.fg_iou: 0.5 != 0.7" in msg and "--overwrite" in msg

"""A store built by ``extract`` holds exactly what the detector computes, labelled as the json says.

Everything here is checked against values derived independently of the writer: the adapter run
again on the same image batches, and ground truth / class statistics read straight from the json.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.ops import box_iou

from cache_schema import open_store, validate_store
from cache_schema.head_init import read_head_weights
from cache_schema.layout import STRIDE_ALIGN
from extract.detectors.adapter import TorchvisionAdapter
from extract.matching import match_rois
from extract.sharding import Shard, batch_groups
from tests.pipeline_fixtures import TINY_DATA, TINY_EXTRACT

C = TINY_DATA.num_classes
K = TINY_EXTRACT.rois_per_image
ROI_COLUMNS_TRAIN = ("boxes", "objectness", "is_gt", "gt_index", "logits", "reg_boxes")


def _json_split(data: Path, split: str) -> dict:
    """GT of a split straight from its json: images sorted by id, annotations in json order.

    Returns dict with ``ids`` int64 [I], ``files`` [I], ``cat_ids`` ascending [C], ``rows`` (per
    image the int64 GT-table rows), ``boxes`` float32 [G,4] xyxy, ``labels`` int64 [G],
    ``ann_id`` int64 [G], ``image`` int64 [G] (image position), ``doc`` (the parsed json).
    """
    doc = json.loads((data / f"{split}.json").read_text())
    cat_ids = sorted(c["id"] for c in doc["categories"])
    images = sorted(doc["images"], key=lambda im: im["id"])
    pos = {im["id"]: p for p, im in enumerate(images)}
    per_image = [[] for _ in images]
    for a in doc["annotations"]:
        if not a.get("iscrowd", 0) and a["bbox"][2] > 0 and a["bbox"][3] > 0:
            per_image[pos[a["image_id"]]].append(a)
    boxes, labels, ann_id, image, rows = [], [], [], [], []
    for p, anns in enumerate(per_image):
        rows.append(np.arange(len(labels), len(labels) + len(anns), dtype=np.int64))
        for a in anns:
            x, y, w, h = a["bbox"]
            boxes.append((x, y, x + w, y + h))
            labels.append(cat_ids.index(a["category_id"]))
            ann_id.append(a["id"])
            image.append(p)
    return {"ids": np.array([im["id"] for im in images], np.int64), "files": [im["file_name"] for im in images],
            "cat_ids": cat_ids, "rows": rows, "boxes": np.asarray(boxes, np.float32).reshape(-1, 4),
            "labels": np.asarray(labels, np.int64), "ann_id": np.asarray(ann_id, np.int64),
            "image": np.asarray(image, np.int64), "doc": doc}


@pytest.fixture(scope="module")
def store(tiny_store):
    return open_store(tiny_store)


@pytest.fixture(scope="module")
def truth(tiny_data):
    return {s: _json_split(tiny_data, s) for s in ("train", "val")}


def test_store_is_complete_and_validates_against_its_inputs(store, tiny_store, tiny_ckpt, tiny_data):
    assert store.is_complete and store.splits == ("train", "val")
    report = validate_store(tiny_store, checkpoint=tiny_ckpt,
                            annotations={"train": tiny_data / "train.json", "val": tiny_data / "val.json"})
    assert report.ok, report.problems
    assert report.incomplete == {"train": 0, "val": 0}


def test_image_and_gt_tables_equal_the_json(store, truth):
    for name, t in truth.items():
        split = store.split(name)
        np.testing.assert_array_equal(split.image_ids, t["ids"])
        assert split.file_names == tuple(t["files"])
        gt = split.gt()
        np.testing.assert_array_equal(gt.boxes, t["boxes"])
        np.testing.assert_array_equal(gt.labels, t["labels"])
        np.testing.assert_array_equal(gt.ann_id, t["ann_id"])
        np.testing.assert_array_equal(gt.image, t["image"])
    # Stride: K proposals, plus room for the most crowded image's GT on train (GT appended there),
    # rounded up so that inner chunks align with images.
    def aligned(n: int) -> int:
        return -(-n // STRIDE_ALIGN) * STRIDE_ALIGN
    assert store.split("train").stride == aligned(K + max(len(r) for r in truth["train"]["rows"]))
    assert store.split("val").stride == aligned(K)
    assert store.split("train").has_gt_proposals and not store.split("val").has_gt_proposals
    assert store.split("val").with_masks and not store.split("train").with_masks


def test_class_csr_equals_the_json(store, truth):
    t = truth["train"]
    classes = store.classes
    assert classes.category_ids == tuple(t["cat_ids"])
    by_id = {c["id"]: c for c in t["doc"]["categories"]}
    assert classes.names == tuple(by_id[i]["name"] for i in t["cat_ids"])
    for k, cid in enumerate(t["cat_ids"]):
        holders = sorted({int(t["image"][g]) for g in np.flatnonzero(t["labels"] == k)})
        np.testing.assert_array_equal(classes.images_of(k), np.asarray(holders, np.int64))
        assert classes.instance_count[k] == int((t["labels"] == k).sum())
        assert classes.image_count[k] == len(holders)
        # LVIS groups: rare <= 10 training images < common <= 100 < frequent.
        expected = "r" if len(holders) <= 10 else ("c" if len(holders) <= 100 else "f")
        assert classes.frequency[k] == expected
    assert int(classes.instance_count.sum()) == len(t["labels"])


def _read_rgb(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"), dtype=np.uint8)


@pytest.mark.parametrize("name,group_index", [("train", 0), ("train", 3), ("val", 1)])
def test_adapter_outputs_equal_the_stored_rows_bit_for_bit(store, truth, tiny_ckpt, tiny_data, name, group_index):
    """Re-run the detector on one of the writer's fixed batches: the store holds exactly its outputs."""
    split = store.split(name)
    t = truth[name]
    group = batch_groups(split.num_images, TINY_EXTRACT.batch_size, Shard(), block=split.commit_block)[group_index]
    adapter = TorchvisionAdapter.from_checkpoint(tiny_ckpt, device="cpu")
    with_gt, with_masks = name == "train", name == "val"
    outs = adapter.run([_read_rgb(tiny_data / t["files"][p]) for p in group],
                       gt_boxes=[t["boxes"][t["rows"][p]] for p in group] if with_gt else None,
                       levels=("pooled", "fc"), max_proposals=store.meta.extraction.rois_per_image,
                       with_masks=with_masks)
    columns = ROI_COLUMNS_TRAIN + (("mask_logits",) if with_masks else ())
    head = read_head_weights(store)
    for p, out in zip(group, outs):
        n_gt = len(t["rows"][p]) if with_gt else 0
        assert split.num_rois()[p] == len(out) and len(out) <= K + n_gt
        assert int(out.is_gt.sum()) == n_gt and out.is_gt[len(out) - n_gt:].all()
        # Train rows are stored stably sorted by matched label (schema 2); val in proposal order.
        own = t["rows"][p]
        labels = match_rois(rois=out.boxes, gt_boxes=t["boxes"][own], gt_labels=t["labels"][own], gt_rows=own,
                            num_classes=C, fg_iou=0.5).labels
        order = np.argsort(labels, kind="stable") if name == "train" else np.arange(len(out))
        rows = split.image_block(p, level="fc", columns=columns)
        for col in ("boxes", "objectness", "is_gt", "reg_boxes"):
            np.testing.assert_array_equal(getattr(rows, col).numpy(), getattr(out, col)[order], err_msg=f"{name}[{p}] {col}")
        fc32 = out.features["fc"][order]
        np.testing.assert_array_equal(rows.features.numpy(), fc32.astype(np.float16))
        pooled = split.image_block(p, level="pooled").features.numpy()
        np.testing.assert_array_equal(pooled, out.features["pooled"][order].astype(np.float16))
        # Logits are not stored: recomputed from the float16 fc and the stored classifier, they
        # equal the detector's own up to that rounding: |dz| <= |W| |fc16 - fc32| (+ float32 sums).
        assert "rois/logits" not in split.roi_array_paths()
        rounding = np.abs(fc32.astype(np.float16).astype(np.float64) - fc32) @ np.abs(head["cls.weight"].T)
        diff = np.abs(rows.logits.numpy().astype(np.float64) - out.logits[order])
        assert (diff <= rounding + 1e-5).all() and rounding.max() > 0
        if with_masks:
            np.testing.assert_array_equal(rows.mask_logits.numpy(), out.mask_logits.astype(np.float16))
        # The detector really produced something: distinct boxes and non-constant features.
        assert len(np.unique(out.boxes, axis=0)) > 1 and out.features["fc"].std() > 0


def test_labels_ious_and_gt_index_match_a_direct_iou_computation(store, truth):
    for name, t in truth.items():
        split = store.split(name)
        gt_labels = t["labels"]
        for p in range(split.num_images):
            rows = split.image_block(p, columns=("boxes", "is_gt", "gt_index"))
            own = t["rows"][p]
            n = len(rows)
            if len(own) == 0:
                assert (rows.labels == C).all() and (rows.ious == 0).all() and (rows.gt_index == -1).all()
                continue
            iou = box_iou(rows.boxes.float(), torch.from_numpy(t["boxes"][own]))
            best_iou, best = iou.max(dim=1)
            np.testing.assert_array_equal(rows.ious.numpy(), best_iou.numpy())
            expected_index = np.where(best_iou.numpy() > 0, own[best.numpy()], -1)
            np.testing.assert_array_equal(rows.gt_index.numpy(), expected_index)
            fg = best_iou.numpy() >= 0.5
            expected_labels = np.where(fg, gt_labels[own[best.numpy()]], C)
            np.testing.assert_array_equal(rows.labels.numpy(), expected_labels)
            assert rows.labels.dtype == torch.int64 and n == split.num_rois()[p]
            gt_rows = np.flatnonzero(rows.is_gt.numpy())
            if name == "train":
                # Appended GT boxes are the image's GT (in label order, as every train row): IoU
                # exactly 1 with their own GT.
                assert len(gt_rows) == len(own)
                own = own[np.argsort(gt_labels[own], kind="stable")]
                np.testing.assert_array_equal(rows.boxes.numpy()[gt_rows], t["boxes"][own])
                np.testing.assert_array_equal(rows.ious.numpy()[gt_rows], np.ones(len(own), np.float32))
                np.testing.assert_array_equal(rows.labels.numpy()[gt_rows], gt_labels[own])
                np.testing.assert_array_equal(rows.gt_index.numpy()[gt_rows], own)
                assert (np.diff(rows.labels.numpy()) >= 0).all()
            else:
                assert len(gt_rows) == 0


def test_store_holds_both_foreground_and_background(store):
    """The tiny detector is trained enough for the matching to be meaningful on both sides."""
    for name in ("train", "val"):
        labels = store.split(name).load().labels.numpy()
        assert 0 < (labels < C).sum() < len(labels)
        assert (labels <= C).all()

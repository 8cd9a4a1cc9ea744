"""COCO-LT sampling (SimCal supplement C) on a small synthetic COCO-format file."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from cache_schema.errors import ConfigError, DatasetError
from extract.datasets import COCO_LT_BINS, build_coco_lt, convert_coco_val, group_bounds, load_annotations

# Scaled thresholds: top=64, ratio=4 -> group 2 n in (16, 64), group 3 (4, 16), group 4 (1, 4).
TOP, RATIO = 64, 4
# COCO-like ids with gaps (COCO's 80 ids run 1..90).
CAT_IDS = [i for i in range(1, 91) if i not in (12, 26, 29, 30, 45, 66, 68, 69, 71, 83)]
PER_GROUP = (10, 40, 20, 6)  # instances of each category, by group; group 2 often has fewer than n


def _source(tmp: Path) -> Path:
    """80 categories, two same-class instances per image, plus one crowd annotation on image 1."""
    assert len(CAT_IDS) == 80
    cats = [{"id": cid, "name": f"c{cid}"} for cid in CAT_IDS]
    images, anns = [], []
    for k, cid in enumerate(CAT_IDS):
        for j in range(PER_GROUP[k // 20]):
            # Two instances of a class per image, so sampling empties some images and not others.
            if j % 2 == 0:
                images.append({"id": len(images) + 1, "file_name": f"{len(images) + 1:012d}.jpg", "height": 8, "width": 8})
            anns.append({"id": len(anns) + 1, "image_id": images[-1]["id"], "category_id": cid,
                         "bbox": [0, 0, 2, 2], "area": 4, "iscrowd": 0,
                         "segmentation": [[0, 0, 2, 0, 2, 2, 0, 2]]})
    anns.append({"id": len(anns) + 1, "image_id": 1, "category_id": CAT_IDS[0], "bbox": [1, 1, 2, 2],
                 "area": 4, "iscrowd": 1, "segmentation": [[1, 1, 3, 1, 3, 3, 1, 3]]})
    path = tmp / "instances_train.json"
    path.write_text(json.dumps({"info": {"year": 2017}, "licenses": [], "categories": cats, "images": images, "annotations": anns}))
    return path


def test_paper_defaults():
    assert group_bounds() == [None, (801, 7999), (81, 799), (9, 79)]
    assert COCO_LT_BINS == ((1, 20), (20, 400), (400, 8000), (8000, None))
    assert group_bounds(top=TOP, ratio=RATIO) == [None, (17, 63), (5, 15), (2, 3)]
    with pytest.raises(ConfigError, match="holds no integer"):
        group_bounds(top=8, ratio=10)


def test_group_counts_within_ranges(tmp_path):
    src = _source(tmp_path)
    out = tmp_path / "lt.json"
    summary = build_coco_lt(src, out, seed=0, top=TOP, ratio=RATIO)
    data = json.loads(out.read_text())
    kept = np.bincount([a["category_id"] for a in data["annotations"]], minlength=91)[CAT_IDS]
    ranges = [None, (17, 63), (5, 15), (2, 3)]
    for g in range(4):
        counts = kept[g * 20 : (g + 1) * 20]
        if ranges[g] is None:
            assert (counts == PER_GROUP[0]).all()  # group 1 keeps every (non-crowd) instance
        else:
            lo, hi = ranges[g]
            assert counts.min() >= lo and counts.max() <= min(hi, PER_GROUP[g])
    # Where n exceeds a class's instances (group 2: n up to 63 of 40) the class keeps them all.
    assert any(r["target"] is not None and r["target"] > r["available"] for r in summary["categories"])
    for rec in summary["categories"]:
        assert rec["kept"] == (rec["available"] if rec["target"] is None else min(rec["target"], rec["available"]))
    assert all(a["iscrowd"] == 0 for a in data["annotations"])
    # Images left without instances are dropped; every kept image has at least one instance.
    with_anns = {a["image_id"] for a in data["annotations"]}
    assert {im["id"] for im in data["images"]} == with_anns
    assert len(data["images"]) < len(json.loads(src.read_text())["images"])
    # LVIS fields recomputed from the kept annotations.
    for cat in data["categories"]:
        anns = [a for a in data["annotations"] if a["category_id"] == cat["id"]]
        assert cat["instance_count"] == len(anns)
        assert cat["image_count"] == len({a["image_id"] for a in anns})
        assert cat["frequency"] == ("r" if cat["image_count"] <= 10 else "c" if cat["image_count"] <= 100 else "f")
    for im in data["images"]:
        present = {a["category_id"] for a in data["annotations"] if a["image_id"] == im["id"]}
        assert set(im["neg_category_ids"]) == set(CAT_IDS) - present and im["not_exhaustive_category_ids"] == []
    info = data["info"]["coco_lt"]
    assert info["seed"] == 0 and info["bins"] == [[1, 20], [20, 400], [400, 8000], [8000, None]]
    assert info["instances"] == len(data["annotations"]) == summary["instances"]


def test_seeded_and_loadable(tmp_path):
    from lvis import LVIS

    src = _source(tmp_path)
    a, b, c = tmp_path / "a.json", tmp_path / "b.json", tmp_path / "c.json"
    build_coco_lt(src, a, seed=5, top=TOP, ratio=RATIO)
    build_coco_lt(src, b, seed=5, top=TOP, ratio=RATIO)
    build_coco_lt(src, c, seed=6, top=TOP, ratio=RATIO)
    assert a.read_bytes() == b.read_bytes()
    assert a.read_bytes() != c.read_bytes()
    gt = LVIS(str(a))
    assert len(gt.get_cat_ids()) == 80
    ann = load_annotations(a)
    assert ann.cat_ids == tuple(CAT_IDS) and ann.skipped_crowd == 0


def test_convert_val_uses_train_counts(tmp_path):
    from lvis import LVIS

    src = _source(tmp_path)
    train = tmp_path / "lt.json"
    build_coco_lt(src, train, seed=0, top=TOP, ratio=RATIO)
    val = tmp_path / "val_lvis.json"
    summary = convert_coco_val(src, val, train_json=train)
    assert summary["dropped_crowd"] == 1
    data = json.loads(val.read_text())
    train_cats = {c["id"]: c for c in json.loads(train.read_text())["categories"]}
    for cat in data["categories"]:
        assert cat["instance_count"] == train_cats[cat["id"]]["instance_count"]
        assert cat["frequency"] == train_cats[cat["id"]]["frequency"]
    assert len(data["images"]) == len(json.loads(src.read_text())["images"])  # val is not sampled
    LVIS(str(val))


def test_bad_inputs(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        build_coco_lt(tmp_path / "none.json", tmp_path / "o.json")
    src = tmp_path / "few.json"
    src.write_text(json.dumps({"categories": [{"id": 1, "name": "a"}], "images": [], "annotations": []}))
    with pytest.raises(DatasetError, match="at least 4 categories"):
        build_coco_lt(src, tmp_path / "o.json")
    assert not (tmp_path / "o.json").exists()

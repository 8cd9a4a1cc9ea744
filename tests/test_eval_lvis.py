"""LVIS API evaluation against hand-computed AP values on a two-image, three-category set."""

from __future__ import annotations

import json
import math

import numpy as np
import pycocotools.mask as mask_utils
import pytest

from cache_schema.errors import ConfigError, DatasetError
from heads.evaluation.compat import patch_lvis_numpy
from heads.evaluation.lvis_eval import LvisEvaluator, evaluate_lvis, evaluate_lvis_many, load_gt
from heads.evaluation.metrics import BinSpec, format_table, read_metrics, write_metrics, write_results

H = W = 100


def rect_rle(x: int, y: int, w: int, h: int) -> dict:
    m = np.zeros((H, W), dtype=np.uint8, order="F")
    m[y : y + h, x : x + w] = 1
    rle = mask_utils.encode(m)
    return {"size": rle["size"], "counts": rle["counts"].decode("ascii")}


def rect_poly(x: int, y: int, w: int, h: int) -> list[list[float]]:
    # pycocotools rasterises this axis-aligned rectangle to exactly w*h pixels (checked by area).
    return [[x, y, x + w, y, x + w, y + h, x, y + h]]


def gt_dataset() -> dict:
    cats = [
        {"id": 1, "name": "one", "synonyms": [], "def": "", "frequency": "f", "image_count": 200, "instance_count": 1500},
        {"id": 2, "name": "two", "synonyms": [], "def": "", "frequency": "c", "image_count": 20, "instance_count": 50},
        {"id": 3, "name": "three", "synonyms": [], "def": "", "frequency": "r", "image_count": 3, "instance_count": 5},
    ]
    images = [
        {"id": 1, "height": H, "width": W, "file_name": "a.png", "neg_category_ids": [3], "not_exhaustive_category_ids": []},
        {"id": 2, "height": H, "width": W, "file_name": "b.png", "neg_category_ids": [2], "not_exhaustive_category_ids": []},
    ]
    boxes = [(1, 1, (10, 10, 50, 50), "rle"), (2, 1, (55, 55, 40, 40), "rle"),
             (3, 2, (20, 20, 50, 50), "poly"), (4, 2, (5, 5, 40, 40), "poly")]
    cat_of = {1: 1, 2: 2, 3: 1, 4: 3}
    anns = []
    for ann_id, img, box, kind in boxes:
        seg = rect_rle(*box) if kind == "rle" else rect_poly(*box)
        anns.append({"id": ann_id, "image_id": img, "category_id": cat_of[ann_id], "bbox": list(map(float, box)),
                     "area": float(box[2] * box[3]), "segmentation": seg})
    return {"images": images, "annotations": anns, "categories": cats}


def det(img: int, cat: int, box: tuple[int, int, int, int], score: float) -> dict:
    return {"image_id": img, "category_id": cat, "bbox": list(map(float, box)), "score": score, "segmentation": rect_rle(*box)}


RESULTS = [
    det(1, 1, (10, 10, 50, 50), 0.9),  # TP at every IoU
    det(2, 1, (20, 20, 50, 36), 0.8),  # IoU 1800/2500 = 0.72: TP for thresholds 0.50-0.70, FP from 0.75
    det(1, 1, (65, 0, 35, 35), 0.5),  # FP
    det(1, 2, (0, 60, 35, 35), 0.9),  # FP above the TP
    det(1, 2, (55, 55, 40, 40), 0.6),  # TP
    det(2, 3, (60, 60, 35, 35), 0.7),  # FP, the only cat-3 det of image 2
    det(1, 3, (5, 5, 40, 40), 0.95),  # FP: category 3 is a negative of image 1
]

# Hand values (101-point interpolated precision, 10 IoU thresholds).
# cat 1: thresholds <= 0.70: ranks TP, TP, FP -> AP 1. >= 0.75: TP, FP, FP with 2 gts -> precision 1
# up to recall 0.5 (recall points 0.00..0.50 = 51 of 101), 0 beyond -> 51/101.
CAT1 = (5 * 1.0 + 5 * 51 / 101) / 10
CAT2 = 0.5  # FP then TP: precision 1/2 at recall 1, interpolated to every recall point
CAT3 = 0.0


@pytest.fixture(scope="module")
def gt_path(tmp_path_factory):
    p = tmp_path_factory.mktemp("gt") / "val.json"
    p.write_text(json.dumps(gt_dataset()))
    return p


@pytest.mark.parametrize("iou_type", ["bbox", "segm"])
def test_hand_computed_ap(gt_path, iou_type):
    m = evaluate_lvis(gt_json=gt_path, results=RESULTS, iou_types=(iou_type,), bins=BinSpec.lvis())
    r = m.segm if iou_type == "segm" else m.bbox
    other = m.bbox if iou_type == "segm" else m.segm
    assert other is None and r is not None
    assert r.per_category == pytest.approx({1: CAT1, 2: CAT2, 3: CAT3}, abs=1e-12)
    assert r["AP"] == pytest.approx((CAT1 + CAT2 + CAT3) / 3, abs=1e-12)
    assert r["AP50"] == pytest.approx((1.0 + 0.5 + 0.0) / 3, abs=1e-12)
    assert r["AP75"] == pytest.approx((51 / 101 + 0.5 + 0.0) / 3, abs=1e-12)
    assert r["APm"] == pytest.approx(r["AP"], abs=1e-12)  # every gt and det is medium
    assert r["APs"] == -1.0 and r["APl"] == -1.0  # no gt in those ranges: LVIS' -1
    assert (r["APr"], r["APc"]) == pytest.approx((CAT3, CAT2), abs=1e-12)
    assert r["APf"] == pytest.approx(CAT1, abs=1e-12)
    # LVIS bins: cat 3 (5 train instances) AP1, cat 2 (50) AP2, none in AP3, cat 1 (1500) AP4.
    assert r["AP1"] == pytest.approx(CAT3) and r["AP2"] == pytest.approx(CAT2)
    assert r["AP3"] == -1.0 and r["AP4"] == pytest.approx(CAT1, abs=1e-12)
    assert r.num_detections == len(RESULTS)
    assert m.num_images == 2 and m.notes == ()


def test_custom_and_coco_lt_bins(gt_path):
    m = evaluate_lvis(gt_json=gt_path, results=RESULTS, iou_types=("bbox",), bins=BinSpec.coco_lt())
    assert [m.bbox[n] for n in ("AP1", "AP2", "AP3", "AP4")] == pytest.approx([CAT3, CAT2, CAT1, -1.0], abs=1e-12)
    two = BinSpec(edges=(0, 100, math.inf), names=("low", "high"))
    m = evaluate_lvis(gt_json=gt_path, results=RESULTS, iou_types=("bbox",), bins=two)
    assert m.bbox["low"] == pytest.approx((CAT3 + CAT2) / 2) and m.bbox["high"] == pytest.approx(CAT1)


def test_binspec_edges():
    counts = np.array([0, 1, 9, 10, 99, 100, 999, 1000, 10**6])
    assert BinSpec.lvis().assign(counts).tolist() == [-1, 0, 0, 1, 1, 2, 2, 3, 3]
    assert BinSpec.coco_lt().assign(np.array([0, 1, 19, 20, 399, 400, 7999, 8000])).tolist() == [-1, 0, 0, 1, 1, 2, 2, 3]
    with pytest.raises(ConfigError):
        BinSpec(edges=(0, 10, 5), names=("a", "b"))
    with pytest.raises(ConfigError):
        BinSpec(edges=(0, 10), names=("APr",))


def test_image_subset_and_max_dets(gt_path):
    m = evaluate_lvis(gt_json=gt_path, results=RESULTS, iou_types=("bbox",), image_ids=[1])
    # Image 1 alone: cat 1 TP then FP -> 1.0; cat 2 -> 0.5; cat 3 has no gt in image 1 -> -1.
    assert m.bbox.per_category == pytest.approx({1: 1.0, 2: 0.5, 3: -1.0})
    assert m.num_images == 1 and m.bbox.num_detections == 5
    # max_dets=1 keeps each image's top detection: image 1 -> the cat-3 FP, image 2 -> cat 1 IoU 0.72.
    m = evaluate_lvis(gt_json=gt_path, results=RESULTS, iou_types=("bbox",), max_dets=1)
    assert m.bbox.num_detections == 2
    # cat 1: one TP of 2 gts at rank 1 for IoU thresholds <= 0.70 -> recall points 0..0.5 -> 51/101.
    assert m.bbox.per_category == pytest.approx({1: 5 * (51 / 101) / 10, 2: 0.0, 3: 0.0})


def test_empty_results_are_zero_with_note(gt_path):
    m = evaluate_lvis(gt_json=gt_path, results=[], iou_types=("segm", "bbox"))
    for r in (m.segm, m.bbox):
        assert r.per_category == {1: 0.0, 2: 0.0, 3: 0.0}
        assert r["AP"] == 0.0 and r["AP1"] == 0.0 and r["AP3"] == -1.0 and r.num_detections == 0
    assert any("no detections" in n for n in m.notes)


def test_bbox_only_results_skip_segm(gt_path):
    boxes_only = [{k: v for k, v in r.items() if k != "segmentation"} for r in RESULTS]
    m = evaluate_lvis(gt_json=gt_path, results=boxes_only)
    assert m.segm is None and m.bbox["AP"] == pytest.approx((CAT1 + CAT2) / 3)
    assert any("segm not evaluated" in n for n in m.notes)
    with pytest.raises(DatasetError):
        evaluate_lvis(gt_json=gt_path, results=boxes_only, iou_types=("segm",))


def test_bad_inputs(gt_path, tmp_path):
    with pytest.raises(DatasetError, match="not in the annotation file"):
        evaluate_lvis(gt_json=gt_path, results=[det(7, 1, (0, 0, 5, 5), 0.5)])
    with pytest.raises(DatasetError, match="category_id"):
        evaluate_lvis(gt_json=gt_path, results=[det(1, 9, (0, 0, 5, 5), 0.5)])
    with pytest.raises(DatasetError, match="not found"):
        evaluate_lvis(gt_json=tmp_path / "nope.json", results=[])
    bad = gt_dataset()
    del bad["categories"][0]["instance_count"]
    p = tmp_path / "bad.json"
    p.write_text(json.dumps(bad))
    with pytest.raises(DatasetError, match="instance_count"):
        load_gt(p)
    with pytest.raises(ConfigError):
        evaluate_lvis(gt_json=gt_path, results=RESULTS, iou_types=("keypoints",))


def test_files_roundtrip_and_table(gt_path, tmp_path):
    res_path = write_results(tmp_path / "out" / "results.json", RESULTS)
    m = evaluate_lvis(gt_json=gt_path, results=res_path)
    assert m.segm["AP"] == pytest.approx(m.bbox["AP"])  # masks are the boxes' rectangles
    met_path = write_metrics(tmp_path / "out" / "metrics.json", m)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["metrics.json", "results.json"]  # no temp left
    back = read_metrics(met_path)
    assert back == m
    table = format_table({"orig": m})
    header, _, row = table.splitlines()
    assert header.split() == ["AP", "AP1", "AP2", "AP3", "AP4", "APr", "APc", "APf", "box", "AP"]
    cells = row.split()
    assert cells[0] == "orig" and cells[1] == f"{100 * (CAT1 + CAT2) / 3:.1f}" and cells[4] == "-"


def test_patch_is_idempotent():
    patch_lvis_numpy()
    patch_lvis_numpy()
    assert np.float is float


def test_parallel_evaluation_of_several_sets_equals_one_by_one(gt_path):
    """evaluate_lvis_many spreads (set, IoU type) runs over worker processes; every number must
    equal the in-process evaluation of that set alone."""
    sets = {"all": RESULTS, "first_three": RESULTS[:3], "rescored": [{**r, "score": 1 - r["score"]} for r in RESULTS],
            "none": []}
    parallel = evaluate_lvis_many(gt_json=gt_path, results=sets, bins=BinSpec.lvis(), workers=2)
    assert list(parallel) == list(sets)
    for name, res in sets.items():
        alone = evaluate_lvis(gt_json=gt_path, results=res, bins=BinSpec.lvis())
        assert parallel[name].to_dict() == alone.to_dict(), name
    assert parallel["all"].segm["AP"] != parallel["rescored"].segm["AP"]  # the sets really differ
    assert math.isclose(parallel["all"].segm.per_category[2], CAT2, abs_tol=1e-12)


def test_evaluator_refuses_a_name_twice(gt_path):
    with LvisEvaluator(gt_json=gt_path, workers=1) as ev:
        ev.submit("a", RESULTS)
        with pytest.raises(ConfigError, match="submitted twice"):
            ev.submit("a", RESULTS)

"""The array evaluation equals the official LVIS API, number for number.

Random LVIS-format ground truth and detections exercise every rule lvis 0.5.3 applies: the
per-image ``max_dets`` cut, zero-area annotations and empty masks (left out), ``ignore`` flags,
area ranges, ``neg_category_ids`` / ``not_exhaustive_category_ids``, perfect overlaps (IoU 1),
tied scores and tied IoUs.
"""

from __future__ import annotations

import json

import numpy as np
import pycocotools.mask as mask_utils
import pytest
import torch

from heads.evaluation import BinSpec, Detections, evaluate_lvis
from heads.evaluation.fast_inputs import det_arrays, evaluate_fast, gt_arrays, store_slots
from heads.evaluation.fast_lvis import DetArrays
from heads.evaluation.lvis_eval import load_gt

H, W = 160, 150
NUM_CATS = 7


def _rect(rng: np.random.Generator) -> tuple[float, float, float, float]:
    w, h = rng.integers(2, 120, size=2)
    x, y = rng.integers(0, W - w), rng.integers(0, H - h)
    return float(x), float(y), float(w), float(h)


def _mask(box) -> np.ndarray:
    x, y, w, h = (int(v) for v in box)
    m = np.zeros((H, W), dtype=np.uint8)
    m[y:y + h, x:x + w] = 1
    return m


def _rle(m: np.ndarray) -> dict:
    r = mask_utils.encode(np.asfortranarray(m))
    return {"size": list(r["size"]), "counts": r["counts"].decode("ascii")}


def _dataset(seed: int, tmp_path):
    rng = np.random.default_rng(seed)
    cats = [{"id": 10 + k, "name": f"c{k}", "frequency": "rcf"[k % 3], "instance_count": int(rng.integers(1, 2000)),
             "image_count": 5} for k in range(NUM_CATS)]
    images, anns, masks = [], [], {}
    for i in range(14):
        img_id = 100 + 3 * i
        present = set()
        for _ in range(int(rng.integers(0, 7))):
            box = _rect(rng)
            cat = 10 + int(rng.integers(0, NUM_CATS))
            present.add(cat)
            m = _mask(box)
            area = float(m.sum()) if rng.random() > 0.08 else 0.0  # some zero-area annotations
            ann = {"id": len(anns) + 1, "image_id": img_id, "category_id": cat, "bbox": list(box), "area": area,
                   "segmentation": [[box[0], box[1], box[0] + box[2], box[1], box[0] + box[2], box[1] + box[3], box[0], box[1] + box[3]]]}
            if rng.random() < 0.1:
                ann["ignore"] = 1
            anns.append(ann)
        others = [c["id"] for c in cats if c["id"] not in present]
        rng.shuffle(others)
        images.append({"id": img_id, "height": H, "width": W, "file_name": f"{img_id}.png",
                       "neg_category_ids": others[:3], "not_exhaustive_category_ids": sorted(present)[:1] if rng.random() < 0.4 else []})
    path = tmp_path / f"gt{seed}.json"
    path.write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
    gt = load_gt(path)
    for a in anns:  # the masks LVIS compares with: its own rasterisation of the polygons
        masks[a["id"]] = mask_utils.decode(gt.ann_to_rle(dict(a)))
    return path, gt, anns, masks


def _results(seed: int, anns: list[dict], image_ids: list[int]) -> list[dict]:
    rng = np.random.default_rng(seed + 1000)
    out = []
    for img in image_ids:
        mine = [a for a in anns if a["image_id"] == img]
        for _ in range(int(rng.integers(0, 12))):
            if mine and rng.random() < 0.5:
                src = mine[int(rng.integers(len(mine)))]
                box = list(src["bbox"]) if rng.random() < 0.5 else [v + float(rng.integers(-3, 4)) for v in src["bbox"]]
                cat = src["category_id"] if rng.random() < 0.8 else 10 + int(rng.integers(0, NUM_CATS))
            else:
                box, cat = list(_rect(rng)), 10 + int(rng.integers(0, NUM_CATS))
            box = [max(0.0, box[0]), max(0.0, box[1]), max(1.0, box[2]), max(1.0, box[3])]
            m = _mask(box) if rng.random() > 0.05 else np.zeros((H, W), np.uint8)  # some empty masks
            if rng.random() < 0.5:  # sub-pixel boxes: box IoUs then differ from mask IoUs
                box = [v + float(rng.uniform(0.0, 0.7)) for v in box]
            score = float(np.float32(round(float(rng.random()), 1)))  # many exact ties
            out.append({"image_id": img, "category_id": cat, "bbox": box, "score": score, "segmentation": _rle(m), "_mask": m})
    return out


def _det_arrays(results: list[dict], anns: list[dict], masks: dict, slots: dict) -> DetArrays:
    width = max(slots.values()) + 1
    inter = np.zeros((len(results), width), dtype=np.int32)
    for d, r in enumerate(results):
        for a in anns:
            if a["image_id"] == r["image_id"]:
                inter[d, slots[a["id"]]] = int((r["_mask"] & masks[a["id"]]).sum())
    return DetArrays(image=np.asarray([r["image_id"] for r in results], np.int64),
                     cat=np.asarray([r["category_id"] for r in results], np.int64),
                     score=np.asarray([r["score"] for r in results], np.float64),
                     bbox=np.asarray([r["bbox"] for r in results], np.float64).reshape(-1, 4),
                     mask_area=np.asarray([int(r["_mask"].sum()) for r in results], np.int64), mask_inter=inter)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("max_dets", [300, 4])
def test_array_evaluation_equals_the_lvis_api(tmp_path, seed, max_dets):
    path, gt, anns, masks = _dataset(seed, tmp_path)
    image_ids = sorted(gt.imgs)[:-2]  # evaluate a subset: results of the other images are dropped
    results = _results(seed, anns, sorted(gt.imgs))
    slots = store_slots(np.asarray([a["image_id"] for a in anns]), np.asarray([a["id"] for a in anns]))
    bins = BinSpec()
    official = evaluate_lvis(gt_json=path, results=[{k: v for k, v in r.items() if k != "_mask"} for r in results],
                             bins=bins, max_dets=max_dets, image_ids=image_ids)
    fast = evaluate_fast(gt=gt_arrays(load_gt(path), image_ids, slots=slots),
                         dets=_det_arrays(results, anns, masks, slots), bins=bins, max_dets=max_dets)
    for iou_type in ("segm", "bbox"):
        a, b = getattr(official, iou_type), getattr(fast, iou_type)
        assert a.summary == b.summary, iou_type  # bit-identical, not approximately
        assert a.per_category == b.per_category, iou_type
        assert a.num_detections == b.num_detections
    assert 0.0 < fast.segm["AP"] < 1.0 and fast.bbox["AP"] != fast.segm["AP"]
    assert fast.num_images == official.num_images == len(image_ids)


def test_det_arrays_follow_the_results_format():
    dets = Detections(roi_index=torch.tensor([2, 0]), labels=torch.tensor([1, 0]), scores=torch.tensor([0.9, 0.4]),
                      boxes=torch.tensor([[1.0, 2.0, 5.5, 9.0], [0.0, 0.0, 3.0, 3.0]]), stream=torch.zeros(2, dtype=torch.int64))
    area = torch.tensor([5, 6, 7, 8, 9], dtype=torch.int32)
    inter = torch.arange(10, dtype=torch.int32).reshape(5, 2)
    out = det_arrays(dets=[dets, dets.take(torch.tensor([1]))], image_ids=[7, 9], category_ids=[30, 40],
                     row_offsets=[0, 3], mask_area=area, mask_inter=inter)
    assert out.image.tolist() == [7, 7, 9] and out.cat.tolist() == [40, 30, 30]
    assert out.bbox[0].tolist() == [1.0, 2.0, 4.5, 7.0]
    assert out.mask_area.tolist() == [7, 5, 8]  # rows 2, 0 of image 0; row 0 of image 1 (offset 3)
    assert out.mask_inter.tolist() == [[4, 5], [0, 1], [6, 7]]
    assert out.score.dtype == np.float64 and out.score[1] == float(np.float32(0.4))


def test_summary_of_the_precision_equals_lvis_evals_own(tmp_path):
    from lvis import LVISEval

    from heads.evaluation.compat import make_results, patch_lvis_numpy, quiet_lvis
    from heads.evaluation.metrics import SUMMARY_KEYS, summarize_precision

    patch_lvis_numpy()
    path, gt, anns, _ = _dataset(4, tmp_path)
    results = [{k: v for k, v in r.items() if k != "_mask"} for r in _results(4, anns, sorted(gt.imgs))]
    with quiet_lvis():
        ev = LVISEval(gt, make_results(gt, results, iou_type="bbox", max_dets=300), iou_type="bbox")
        ev.run()
    cat_ids = list(ev.params.cat_ids)
    ours = summarize_precision(ev.eval["precision"], iou_thrs=ev.params.iou_thrs, area_labels=ev.params.area_rng_lbl,
                               cat_ids=cat_ids, frequency=[gt.cats[c]["frequency"] for c in cat_ids],
                               instance_count=[gt.cats[c]["instance_count"] for c in cat_ids], bins=BinSpec(),
                               num_detections=len(results))
    assert {k: ours.summary[k] for k in SUMMARY_KEYS} == {k: float(ev.results[k]) for k in SUMMARY_KEYS}
    assert -1.0 < ours["AP"] < 1.0

"""Cached evaluation on a tiny hand-built RoiSet: a perfect head scores AP 1, a wrong one less."""

from __future__ import annotations

import json

import numpy as np
import pycocotools.mask as mask_utils
import pytest
import torch

from cache_schema.errors import ConfigError, SchemaError
from cache_schema.records import ClassInfo, RoiSet
from heads.combine import Combination
from heads.evaluation.cached import evaluate_cached
from heads.evaluation.detections import paste_roi_masks

H, W, M = 48, 64, 8
CAT_IDS = (11, 22, 33)
COUNTS = np.array([5, 50, 500], dtype=np.int64)  # AP1, AP2, AP3 with LVIS bins
IMAGE_IDS = np.array([101, 102, 103, 104])  # split positions 0..3
SIZES = np.array([[H, W]] * 4)
POSITIONS = [2, 0, 3]  # the RoiSet holds these split positions (104's neighbour 102 is left out)
# gt objects per split position: (class, xyxy box)
OBJECTS = {
    0: [(0, (4, 4, 24, 20)), (2, (30, 10, 60, 40))],
    1: [(1, (5, 5, 40, 40))],
    2: [(1, (10, 12, 30, 44)), (2, (36, 2, 62, 30))],
    3: [(2, (8, 8, 28, 28)), (0, (34, 20, 58, 46))],
}
NUM_BG = 4
FULL_MASK = torch.full((M, M), 10.0)  # every cell "inside": the pasted mask is the box's mask


def class_info() -> ClassInfo:
    img_count = np.array([1, 1, 1])
    return ClassInfo(names=("a", "b", "c"), category_ids=CAT_IDS, frequency=("r", "c", "f"), instance_count=COUNTS,
                     image_count=img_count, csr_indptr=np.array([0, 1, 2, 3]), csr_images=np.array([0, 1, 2]))


def gt_json(tmp_path) -> str:
    freq = {11: "r", 22: "c", 33: "f"}
    cats = [{"id": c, "name": str(c), "synonyms": [], "def": "", "frequency": freq[c], "image_count": 1,
             "instance_count": int(n)} for c, n in zip(CAT_IDS, COUNTS)]
    images, anns = [], []
    for pos, objs in OBJECTS.items():
        present = {CAT_IDS[k] for k, _ in objs}
        images.append({"id": int(IMAGE_IDS[pos]), "height": H, "width": W, "file_name": f"{pos}.png",
                       "neg_category_ids": sorted(set(CAT_IDS) - present), "not_exhaustive_category_ids": []})
        for k, box in objs:
            # The gt mask is what a perfect class-agnostic mask head pastes into the gt box.
            mask = paste_roi_masks(mask_logits=FULL_MASK[None], boxes=torch.tensor([box], dtype=torch.float32),
                                   image_size=(H, W))[0]
            rle = mask_utils.encode(np.asfortranarray(mask.numpy().astype(np.uint8)))
            x1, y1, x2, y2 = box
            anns.append({"id": len(anns) + 1, "image_id": int(IMAGE_IDS[pos]), "category_id": CAT_IDS[k],
                         "bbox": [x1, y1, x2 - x1, y2 - y1], "area": int(mask.sum()),
                         "segmentation": {"size": rle["size"], "counts": rle["counts"].decode()}})
    p = tmp_path / "val.json"
    p.write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
    return str(p)


def build_roiset(confuse: dict[int, int] | None = None) -> RoiSet:
    """One RoI per gt object (exact box) + NUM_BG background RoIs per image; the 'head' puts
    logit 10 on the true class (or on ``confuse[true]``), background RoIs on background."""
    g = torch.Generator().manual_seed(0)
    logits, boxes, labels, index, offsets = [], [], [], [], [0]
    for j, pos in enumerate(POSITIONS):
        for k, box in OBJECTS[pos]:
            row = torch.zeros(4)
            row[(confuse or {}).get(k, k)] = 10.0
            logits.append(row), boxes.append(torch.tensor(box, dtype=torch.float32)), labels.append(k)
        for _ in range(NUM_BG):
            xy = torch.rand(2, generator=g) * torch.tensor([W - 12.0, H - 12.0])
            boxes.append(torch.cat([xy, xy + 10])), logits.append(torch.tensor([0.0, 0.0, 0.0, 10.0])), labels.append(3)
        index += [j] * (len(OBJECTS[pos]) + NUM_BG)
        offsets.append(len(labels))
    n = len(labels)
    return RoiSet(labels=torch.tensor(labels), ious=torch.ones(n), image_index=torch.tensor(index),
                  image_offsets=torch.tensor(offsets), images=torch.tensor(POSITIONS),
                  logits=torch.stack(logits), reg_boxes=torch.stack(boxes),
                  mask_logits=FULL_MASK.expand(n, M, M).half().clone())


def run(tmp_path, roiset, cal_logits=None, combine="orig", T=300.0):
    return evaluate_cached(roiset=roiset, class_info=class_info(),
                           cal_probs=None if cal_logits is None else torch.softmax(cal_logits.float(), 1),
                           combination=Combination(rule=combine, T=T),
                           gt_json=gt_json(tmp_path), image_ids=IMAGE_IDS, image_sizes=SIZES, progress=False)


def test_perfect_head_scores_one(tmp_path):
    results, m = run(tmp_path, build_roiset())
    for r in (m.segm, m.bbox):
        assert r["AP"] == pytest.approx(1.0) and r["AP50"] == pytest.approx(1.0)
        assert [r[b] for b in ("AP1", "AP2", "AP3")] == pytest.approx([1.0, 1.0, 1.0]) and r["AP4"] == -1.0
        assert r.per_category == pytest.approx({11: 1.0, 22: 1.0, 33: 1.0})
    assert m.num_images == 3  # position 1 (id 102) is not evaluated although it has gt
    assert {r["image_id"] for r in results} == {101, 103, 104}
    top = max(results, key=lambda r: r["score"])
    assert top["score"] == pytest.approx(np.exp(10) / (np.exp(10) + 3), rel=1e-5) and "segmentation" in top


def test_wrong_head_scores_lower_and_sel_repairs_it(tmp_path):
    roiset = build_roiset(confuse={0: 1})  # the rare class 0 is called class 1
    _, wrong = run(tmp_path, roiset)
    # Class 0 is still detected, but only at the 4.5e-5 "other class" score it shares with the
    # background RoIs, so its true positives tie with false positives.
    assert wrong.segm.per_category[11] < 0.7 and wrong.segm["AP"] < 0.9
    assert wrong.segm["AP1"] == pytest.approx(wrong.segm.per_category[11]) and wrong.segm["AP3"] == pytest.approx(1.0)
    cal = build_roiset().logits  # a calibrated head that gets every class right
    _, sel = run(tmp_path, roiset, cal_logits=cal, combine="sel", T=10)  # only class 0 (5 instances) from cal
    # Class 0 is repaired; class 1 keeps the original head's confident false positives.
    assert sel.segm.per_category[11] == pytest.approx(1.0) and sel.segm["AP"] > wrong.segm["AP"]
    assert sel.segm.per_category[22] == pytest.approx(wrong.segm.per_category[22])
    assert wrong.segm.per_category[22] < 1.0
    _, sel_all = run(tmp_path, roiset, cal_logits=cal, combine="sel", T=1000)  # every class from cal
    assert sel_all.segm["AP"] == pytest.approx(1.0)
    _, sel_none = run(tmp_path, roiset, cal_logits=cal, combine="sel", T=1)  # nothing from cal
    assert sel_none.segm["AP"] == pytest.approx(wrong.segm["AP"])
    results, det = run(tmp_path, roiset, cal_logits=cal, combine="det")
    assert det.bbox.per_category[11] == pytest.approx(1.0)  # the cal stream's detection survives the merge


def test_without_masks_only_boxes(tmp_path):
    roiset = build_roiset()
    no_masks = RoiSet(labels=roiset.labels, ious=roiset.ious, image_index=roiset.image_index,
                      image_offsets=roiset.image_offsets, images=roiset.images, logits=roiset.logits,
                      reg_boxes=roiset.reg_boxes)
    results, m = run(tmp_path, no_masks)
    assert m.segm is None and m.bbox["AP"] == pytest.approx(1.0)
    assert all("segmentation" not in r for r in results)


def test_bad_inputs(tmp_path):
    roiset = build_roiset()
    with pytest.raises(ConfigError, match="cal_probs"):
        run(tmp_path, roiset, cal_logits=torch.zeros(3, 4), combine="sel")
    with pytest.raises(ConfigError, match="calibrated"):
        run(tmp_path, roiset, combine="sel")
    bare = RoiSet(labels=roiset.labels, ious=roiset.ious, image_index=roiset.image_index,
                  image_offsets=roiset.image_offsets, images=roiset.images)
    with pytest.raises(SchemaError, match="logits"):
        run(tmp_path, bare)

"""Loading LVIS/COCO annotation files, class statistics, and the torch detection dataset."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pycocotools.mask as mask_util
import pytest
import torch
from PIL import Image

from cache_schema.errors import DatasetError
from cache_schema.records import ClassInfo
from extract.datasets import (
    DetectionDataset,
    check_images_exist,
    class_statistics,
    collate,
    load_annotations,
    resolve_split,
)

H, W = 12, 16


def _rle(mask: np.ndarray) -> dict:
    rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")}


def _rect(y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
    m = np.zeros((H, W), np.uint8)
    m[y0:y1, x0:x1] = 1
    return m


def _coco(tmp: Path) -> dict:
    """Categories 7, 3, 9 (out of order), images 20 (LVIS coco_url), 10, 30 (no annotations)."""
    return {
        "categories": [{"id": 7, "name": "seven"}, {"id": 3, "name": "three"}, {"id": 9, "name": "nine"}],
        "images": [
            {"id": 20, "coco_url": "http://images.cocodataset.org/val2017/000000000020.jpg", "height": H, "width": W},
            {"id": 10, "file_name": "a/10.png", "height": H, "width": W},
            {"id": 30, "file_name": "a/30.png", "height": H, "width": W},
        ],
        "annotations": [
            # polygon: the rectangle x 2..6, y 1..5 (pycocotools fills [2,6) x [1,5))
            {"id": 1, "image_id": 10, "category_id": 7, "bbox": [2, 1, 4, 4],
             "segmentation": [[2, 1, 6, 1, 6, 5, 2, 5]]},
            {"id": 2, "image_id": 10, "category_id": 3, "bbox": [8, 3, 5, 6], "segmentation": _rle(_rect(3, 9, 8, 13))},
            {"id": 3, "image_id": 20, "category_id": 7, "bbox": [0, 0, 3, 2], "segmentation": _rle(_rect(0, 2, 0, 3))},
            {"id": 4, "image_id": 20, "category_id": 7, "bbox": [5, 5, 2, 2], "segmentation": _rle(_rect(5, 7, 5, 7))},
            {"id": 5, "image_id": 20, "category_id": 3, "bbox": [1, 1, 3, 3], "iscrowd": 1,
             "segmentation": _rle(_rect(1, 4, 1, 4))},
            {"id": 6, "image_id": 20, "category_id": 9, "bbox": [4, 4, 0, 3], "segmentation": []},
        ],
    }


def _write(tmp: Path, data: dict, name: str = "train.json") -> Path:
    path = tmp / name
    path.write_text(json.dumps(data))
    return path


def _images(tmp: Path) -> None:
    rng = np.random.default_rng(0)
    for rel in ("a/10.png", "val2017/000000000020.jpg", "a/30.png"):
        p = tmp / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        arr = rng.integers(0, 256, size=(H, W, 3), dtype=np.uint8)
        Image.fromarray(arr).save(p, format="PNG")  # PNG bytes under a .jpg name: PIL reads by content


def test_resolve_split(tmp_path):
    path = _write(tmp_path, _coco(tmp_path))
    assert resolve_split(tmp_path, "train") == (path, tmp_path)
    assert resolve_split(path, "ignored") == (path, tmp_path)
    with pytest.raises(DatasetError, match="val.json"):
        resolve_split(tmp_path, "val")
    with pytest.raises(DatasetError, match="does not exist"):
        resolve_split(tmp_path / "nope", "train")


def test_load_sorts_maps_and_groups(tmp_path):
    ann = load_annotations(_write(tmp_path, _coco(tmp_path)))
    assert ann.cat_ids == (3, 7, 9)
    assert ann.index_of == {3: 0, 7: 1, 9: 2}
    assert ann.names == ("three", "seven", "nine")
    assert [im.id for im in ann.images] == [10, 20, 30]
    assert ann.images[1].file_name == "val2017/000000000020.jpg"
    assert ann.position_of == {10: 0, 20: 1, 30: 2}
    assert [[a["id"] for a in anns] for anns in ann.annotations] == [[1, 2], [3, 4], []]
    assert ann.skipped_crowd == 1 and ann.skipped_degenerate == 1
    assert ann.image_root == tmp_path
    assert load_annotations(tmp_path / "train.json", image_root=tmp_path / "imgs").image_path(0) == tmp_path / "imgs/a/10.png"


def test_class_statistics_hand_derived(tmp_path):
    info = class_statistics(load_annotations(_write(tmp_path, _coco(tmp_path))))
    assert isinstance(info, ClassInfo)
    assert info.category_ids == (3, 7, 9)
    assert info.instance_count.tolist() == [1, 3, 0]  # crowd and zero-width boxes are not counted
    assert info.image_count.tolist() == [1, 2, 0]
    assert info.frequency == ("r", "r", "r")
    assert info.csr_indptr.tolist() == [0, 1, 3, 3]
    assert info.images_of(0).tolist() == [0] and info.images_of(1).tolist() == [0, 1]
    assert info.images_of(2).tolist() == []


def test_frequency_thresholds(tmp_path):
    data = {"categories": [{"id": i, "name": str(i)} for i in (1, 2, 3)], "images": [], "annotations": []}
    counts = {1: 10, 2: 11, 3: 101}  # images holding each category: r, c, f boundaries
    for cid, n in counts.items():
        for j in range(n):
            img_id = cid * 1000 + j
            data["images"].append({"id": img_id, "file_name": f"{img_id}.png", "height": 4, "width": 4})
            data["annotations"].append({"id": img_id, "image_id": img_id, "category_id": cid, "bbox": [0, 0, 1, 1]})
    info = class_statistics(load_annotations(_write(tmp_path, data)))
    assert info.frequency == ("r", "c", "f")
    assert info.image_count.tolist() == [10, 11, 101]
    assert np.all(np.diff(info.images_of(2)) > 0)


@pytest.mark.parametrize(
    ("mutate", "pattern"),
    [
        (lambda d: d.pop("categories"), "missing list"),
        (lambda d: d["images"][0].pop("height"), "lacks key"),
        (lambda d: d["annotations"][0].update(image_id=999), "unknown image_id 999"),
        (lambda d: d["annotations"][0].update(category_id=5), "unknown category_id 5"),
        (lambda d: d["images"][1].pop("file_name"), "neither file_name nor coco_url"),
        (lambda d: d["categories"].append({"id": 7, "name": "dup"}), "duplicate category"),
        (lambda d: d["annotations"][0].update(bbox=[1, 2]), "bbox"),
    ],
)
def test_bad_files_raise_one_line_dataset_errors(tmp_path, mutate, pattern):
    data = _coco(tmp_path)
    mutate(data)
    with pytest.raises(DatasetError, match=pattern) as err:
        load_annotations(_write(tmp_path, data))
    assert "\n" not in str(err.value)


def test_missing_and_invalid_json(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        load_annotations(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text('{"images": [')
    with pytest.raises(DatasetError, match="not valid JSON"):
        load_annotations(bad)


def test_check_images_exist_names_first_missing_and_count(tmp_path):
    ann = load_annotations(_write(tmp_path, _coco(tmp_path)))
    with pytest.raises(DatasetError, match=r"3 of 3 images are missing, first .*a/10\.png"):
        check_images_exist(ann)
    _images(tmp_path)
    (tmp_path / "a/30.png").unlink()
    with pytest.raises(DatasetError, match=r"1 of 3 images are missing, first .*a/30\.png"):
        check_images_exist(ann)


def test_detection_dataset_targets(tmp_path):
    _images(tmp_path)
    ds = DetectionDataset(load_annotations(_write(tmp_path, _coco(tmp_path))))
    assert len(ds) == 3
    image, target = ds[0]
    assert image.dtype == torch.float32 and image.shape == (3, H, W)
    expected = np.asarray(Image.open(tmp_path / "a/10.png").convert("RGB")).transpose(2, 0, 1) / 255.0
    assert torch.allclose(image, torch.from_numpy(expected).float())
    assert target["boxes"].dtype == torch.float32
    assert target["boxes"].tolist() == [[2, 1, 6, 5], [8, 3, 13, 9]]  # xywh -> xyxy
    assert target["labels"].tolist() == [1, 0]  # category 7 -> 1, 3 -> 0
    assert target["masks"].dtype == torch.uint8 and target["masks"].shape == (2, H, W)
    assert torch.equal(target["masks"][0], torch.from_numpy(_rect(1, 5, 2, 6)))  # from the polygon
    assert torch.equal(target["masks"][1], torch.from_numpy(_rect(3, 9, 8, 13)))  # from the RLE
    assert int(target["image_id"]) == 10 and int(target["index"]) == 0
    _, empty = ds[2]
    assert empty["boxes"].shape == (0, 4) and empty["masks"].shape == (0, H, W) and empty["labels"].shape == (0,)
    no_masks = DetectionDataset(ds.annset, with_masks=False)[1][1]
    assert "masks" not in no_masks and no_masks["labels"].tolist() == [1, 1]
    images, targets = collate([ds[0], ds[1]])
    assert len(images) == 2 and [int(t["image_id"]) for t in targets] == [10, 20]


def test_detection_dataset_rejects_size_mismatch(tmp_path):
    _images(tmp_path)
    data = _coco(tmp_path)
    data["images"][1]["height"] = H + 1
    ds = DetectionDataset(load_annotations(_write(tmp_path, data)), with_masks=False)
    with pytest.raises(DatasetError, match="json says"):
        ds[0]

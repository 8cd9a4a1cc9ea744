"""The synthetic long-tailed benchmark: budgets, determinism, masks, LVIS compatibility, errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pycocotools.mask as mask_util
import pytest
from PIL import Image

from cache_schema.errors import ConfigError, DatasetError
from extract.datasets import SynthConfig, generate, plan_images, rerender, train_targets, val_targets
from extract.datasets.synthetic_config import rank_counts

TINY = SynthConfig(
    num_classes=6,
    train_images=10,
    val_images=10,
    image_size=80,
    min_objects=2,
    max_objects=5,
    min_object_frac=0.15,
    max_object_frac=0.45,
    min_visible_pixels=12,
    seed=3,
)


def _bytes_of(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    # Rendered with 2 worker processes; the determinism test re-renders in-process.
    return generate(TINY, tmp_path_factory.mktemp("synth") / "ds", progress=False, workers=2)


def _load(root: Path, split: str) -> dict:
    return json.loads((root / f"{split}.json").read_text())


def _bins(counts: np.ndarray) -> list[int]:
    edges = [(0, 10), (10, 100), (100, 1000), (1000, None)]
    return [int(((counts >= lo) & (counts < (hi or np.inf))).sum()) for lo, hi in edges]


def test_default_targets_fill_every_instance_bin():
    cfg = SynthConfig()
    t = train_targets(cfg)
    assert t.sum() == cfg.train_total() == 16000
    bins = _bins(t)
    assert bins == [119, 56, 21, 4]  # hand-checked Zipf-Mandelbrot budget, see synthetic_config
    assert bins[0] >= 15 and bins[1] >= 15 and bins[2] >= 15 and bins[3] >= 3
    assert t.min() >= 1
    # The seed only permutes which class gets which count.
    other = train_targets(SynthConfig(seed=11))
    assert not np.array_equal(other, t)
    assert np.array_equal(np.sort(other), np.sort(t))
    assert np.array_equal(np.sort(t)[::-1], rank_counts(cfg))
    v = val_targets(cfg)
    assert v.sum() == cfg.val_total() == 1850 and v.min() >= 3


def test_plan_uses_every_target_once_within_object_limits():
    plans = plan_images(TINY)
    for split, targets in (("train", train_targets(TINY)), ("val", val_targets(TINY))):
        labels = np.concatenate([np.asarray(t[2]) for t in plans[split]])
        assert np.array_equal(np.bincount(labels, minlength=TINY.num_classes), targets)
        sizes = [len(t[2]) for t in plans[split]]
        assert min(sizes) >= TINY.min_objects and max(sizes) <= TINY.max_objects


def test_files_and_counts_match_targets(tiny):
    meta = json.loads((tiny / "meta.json").read_text())
    assert meta["seed"] == TINY.seed and meta["config"]["num_classes"] == 6
    assert not list(tiny.parent.glob(".ds.*"))  # no temporary directory left behind
    for split, targets in (("train", train_targets(TINY)), ("val", val_targets(TINY))):
        data = _load(tiny, split)
        cats = data["categories"]
        assert [c["id"] for c in cats] == list(range(1, 7))
        per_class = np.bincount([a["category_id"] - 1 for a in data["annotations"]], minlength=6)
        assert np.array_equal(per_class, targets)  # every class present, none lost to occlusion
        assert (per_class > 0).all()
        all_ids = {c["id"] for c in cats}
        for img in data["images"]:
            assert (tiny / img["file_name"]).is_file()
            assert img["file_name"] == f"images/{split}/{img['id']:012d}.png"
            present = {a["category_id"] for a in data["annotations"] if a["image_id"] == img["id"]}
            assert set(img["neg_category_ids"]) == all_ids - present
            assert img["not_exhaustive_category_ids"] == []
    train = _load(tiny, "train")
    for c in train["categories"]:
        anns = [a for a in train["annotations"] if a["category_id"] == c["id"]]
        assert c["instance_count"] == len(anns)
        assert c["image_count"] == len({a["image_id"] for a in anns})
        assert c["frequency"] == ("r" if c["image_count"] <= 10 else "c" if c["image_count"] <= 100 else "f")
    assert _load(tiny, "val")["categories"] == train["categories"]  # train counts in both files


def _labels_of(root: Path, split: str) -> dict[int, list[int]]:
    """Drawing-order labels of every rendered image (planned + overflow)."""
    meta = json.loads((root / "meta.json").read_text())
    out = {t[1]: t[2] for t in plan_images(TINY)[split]}
    out.update({int(i): labels for i, labels in meta["overflow_images"][split]})
    return out


@pytest.mark.parametrize("split", ["train", "val"])
def test_json_masks_are_the_visible_glyph_alpha(tiny, split):
    data = _load(tiny, split)
    labels_of = _labels_of(tiny, split)
    by_image: dict[int, list[dict]] = {}
    for a in data["annotations"]:
        by_image.setdefault(a["image_id"], []).append(a)
    for img in data["images"]:
        r = rerender(TINY, split, img["id"], labels_of[img["id"]])
        assert np.array_equal(np.asarray(Image.open(tiny / img["file_name"]).convert("RGB")), r.rgb)
        assert np.array_equal(r.full_masks, r.alphas >= 128)
        anns = by_image.get(img["id"], [])
        assert [a["category_id"] - 1 for a in anns] == r.labels.tolist()
        for j, ann in enumerate(anns):
            later = r.full_masks[j + 1 :].any(axis=0) if j + 1 < len(anns) else np.zeros_like(r.full_masks[j])
            expected = r.full_masks[j] & ~later
            decoded = mask_util.decode(ann["segmentation"]).astype(bool)
            assert np.array_equal(decoded, expected)
            assert np.array_equal(r.visible_masks[j], expected)
            assert ann["area"] == int(expected.sum())
            assert expected.sum() >= max(TINY.min_visible_fraction * r.full_masks[j].sum(), TINY.min_visible_pixels)
            ys, xs = np.nonzero(expected)
            assert ann["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]


def test_same_seed_is_byte_identical_and_other_seed_differs(tiny, tmp_path):
    again = generate(TINY, tmp_path / "again", progress=False, workers=1)
    assert _bytes_of(again) == _bytes_of(tiny)
    other = generate(
        SynthConfig(**{**TINY.to_dict(), "seed": TINY.seed + 1}), tmp_path / "other", progress=False, workers=1
    )
    a, b = _bytes_of(tiny), _bytes_of(other)
    assert a["train.json"] != b["train.json"]
    shared = set(a) & set(b) - {"meta.json", "train.json", "val.json"}
    assert shared and all(a[k] != b[k] for k in shared)


def _lvis_eval_compat() -> None:
    try:
        from heads.evaluation.compat import patch_lvis_numpy

        patch_lvis_numpy()
    except ImportError:  # eval package not there: restore the alias lvis 0.5.3 needs by hand
        if not hasattr(np, "float"):
            np.float = float


def test_lvis_api_loads_and_scores_ground_truth_perfectly(tiny):
    from lvis import LVIS, LVISEval, LVISResults

    _lvis_eval_compat()
    for split in ("train", "val"):
        gt = LVIS(str(tiny / f"{split}.json"))
        assert len(gt.get_img_ids()) == len(_load(tiny, split)["images"])
        assert sorted(gt.get_cat_ids()) == list(range(1, 7))
    gt = LVIS(str(tiny / "val.json"))
    dets = [
        {"image_id": a["image_id"], "category_id": a["category_id"], "segmentation": a["segmentation"], "score": 1.0}
        for a in gt.load_anns()
    ]
    ev = LVISEval(gt, LVISResults(gt, dets), iou_type="segm")
    ev.run()
    assert ev.results["AP"] == pytest.approx(1.0)


def test_bad_inputs_raise_typed_one_line_errors(tmp_path, tiny):
    with pytest.raises(ConfigError, match="num_classes"):
        SynthConfig(num_classes=3)
    with pytest.raises(ConfigError, match=r"4\.\.\d+ classes"):
        generate(SynthConfig(num_classes=5000, train_images=5000, val_images=5000), tmp_path / "x", progress=False)
    with pytest.raises(ConfigError):
        SynthConfig(min_objects=5, max_objects=2)
    with pytest.raises(ConfigError, match="val budget"):
        SynthConfig(num_classes=200, val_images=10)
    with pytest.raises(DatasetError, match="not empty") as err:
        generate(TINY, tiny, progress=False, workers=1)
    assert "\n" not in str(err.value)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(DatasetError, match="file"):
        generate(TINY, blocker, progress=False, workers=1)
    with pytest.raises(DatasetError, match="cannot write"):
        generate(TINY, blocker / "sub", progress=False, workers=1)


def test_loads_through_the_json_loader_and_torch_dataset(tiny):
    from extract.datasets import DetectionDataset, check_images_exist, class_statistics, load_annotations, resolve_split

    ann = load_annotations(*resolve_split(tiny, "train"))
    check_images_exist(ann)
    info = class_statistics(ann)
    assert np.array_equal(info.instance_count, train_targets(TINY))
    assert info.names == tuple(c["name"] for c in _load(tiny, "train")["categories"])
    image, target = DetectionDataset(ann)[0]
    assert image.shape == (3, TINY.image_size, TINY.image_size)
    anns = ann.annotations[0]
    for j, a in enumerate(anns):
        assert np.array_equal(target["masks"][j].numpy(), mask_util.decode(a["segmentation"]))
        x, y, w, h = a["bbox"]
        assert target["boxes"][j].tolist() == [x, y, x + w, y + h]
        assert int(target["labels"][j]) == a["category_id"] - 1

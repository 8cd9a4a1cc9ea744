"""Logits recomputed from the stored fc features equal the mmdet detector's own within float16
rounding: single-stage Mask R-CNN and a three-stage cascade (final logits = the stages' mean)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

pytest.importorskip("mmdet")

from cache_schema import open_store  # noqa: E402
from cache_schema.derived import recompute_logits  # noqa: E402
from cache_schema.head_init import read_head_weights  # noqa: E402
from extract.writer import ExtractConfig, extract  # noqa: E402
from tests.mmdet_fixtures import class_names_of, save_mmdet_checkpoint, tiny_mmdet_config  # noqa: E402

# --store-logits: the detector's own logits are kept, to compare the recomputation with.
EXTRACT = ExtractConfig(levels=("pooled", "fc"), batch_size=4, device="cpu", threads=1, splits=("val",),
                        store_logits=True)


def _rounding_bound(split, sel, counts, stage: int) -> np.ndarray:
    """|W| (|fc16| 2^-11 + 2^-24): the most a logit moves when fc is rounded to float16 (half an
    ulp relative, or the subnormal step), per RoI and class."""
    reader = split.at_stage(stage) if split.num_stages > 1 else split
    fc = np.abs(reader._read_array(reader.stage_path("feat/fc"), sel, counts).astype(np.float64))
    w = np.abs(read_head_weights(split.store, stage=stage)["cls.weight"].astype(np.float64))
    return (fc * 2.0**-11 + 2.0**-24) @ w.T


@pytest.mark.slow  # two tiny mmdet extractions, ~40 s on 2 shared cores
@pytest.mark.parametrize("kind", ["mask_rcnn", "cascade_mask_rcnn"])
def test_recomputed_logits_equal_the_detectors_within_float16_rounding(kind, tiny_data, tmp_path):
    names = class_names_of(tiny_data)
    ckpt = save_mmdet_checkpoint(tmp_path / f"{kind}.pth", tiny_mmdet_config(kind, num_classes=len(names)), seed=4,
                                 classes=names)
    extract(ckpt=ckpt, data=tiny_data, out=str(tmp_path / "s.zarr"), config=EXTRACT, progress=False)
    split = open_store(tmp_path / "s.zarr").split("val")
    sel, counts = split.select()
    stages = range(split.num_stages)
    assert len(stages) == (3 if kind.startswith("cascade") else 1)
    bounds = [_rounding_bound(split, sel, counts, k) for k in stages]
    views = [split.at_stage(k) for k in stages] if split.num_stages > 1 else [split]
    for view, bound in zip(views, bounds):  # each stage's own logits (a cascade's stages/<k>/rois/logits)
        stored = view.load(columns=("logits",)).logits.numpy()
        diff = np.abs(recompute_logits(view, sel, counts).astype(np.float64) - stored)
        assert (diff <= bound + 1e-5).all() and diff.max() > 0
    # The detector's final logits (a cascade's mean of stages) from the split's own reader.
    stored = split.load(columns=("logits",)).logits.numpy()
    diff = np.abs(recompute_logits(split, sel, counts).astype(np.float64) - stored)
    assert (diff <= sum(bounds) / len(bounds) + 1e-5).all()
    # A store extracted without --store-logits returns the recomputed values where logits are read.
    extract(ckpt=ckpt, data=tiny_data, out=str(tmp_path / "r.zarr"), config=replace(EXTRACT, store_logits=False),
            progress=False)
    lean = open_store(tmp_path / "r.zarr").split("val")
    assert "rois/logits" not in lean.roi_array_paths()
    np.testing.assert_array_equal(lean.load(columns=("logits",)).logits.numpy(), recompute_logits(split, sel, counts))

"""Tiny real artefacts shared by the pipeline tests: a benchmark, a trained detector, a store.

Everything is real (the synthetic generator, torchvision training, zarr extraction); only the
sizes are tiny so the whole chain builds in well under a minute on 2 cores.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from extract.datasets import SynthConfig, generate
from extract.detectors.toy import tiny_arch
from extract.detectors.train import train_detector
from extract.detectors.train_config import DetectorTrainConfig
from extract.writer import ExtractConfig, extract

TINY_DATA = SynthConfig(num_classes=6, train_images=16, val_images=10, image_size=80, min_objects=2, max_objects=5,
                        min_object_frac=0.15, max_object_frac=0.45, min_visible_pixels=12, seed=3)
TINY_TRAIN = DetectorTrainConfig(max_steps=30, batch_size=2, lr=0.02, warmup_steps=5, checkpoint_every=1000,
                                 time_budget_s=None, processes=1, threads_per_process=1, seed=0)
TINY_EXTRACT = ExtractConfig(levels=("pooled", "fc"), rois_per_image=24, batch_size=4, block_images=8, device="cpu", threads=1)


def build_data(root: Path) -> Path:
    return generate(TINY_DATA, root / "data", progress=False, workers=1)


def build_detector(data: Path, root: Path) -> Path:
    arch = replace(tiny_arch(num_classes=TINY_DATA.num_classes, image_size=TINY_DATA.image_size),
                   rpn_post_nms_top_n_test=24)
    return train_detector(data_dir=data, out_dir=root / "detector", config=TINY_TRAIN, arch=arch, progress=False)


def build_store(ckpt: Path, data: Path, out: Path, **changes) -> Path:
    extract(ckpt=ckpt, data=data, out=str(out), config=replace(TINY_EXTRACT, **changes), progress=False)
    return out

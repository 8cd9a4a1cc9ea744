"""Datasets: the embedded synthetic long-tailed benchmark, LVIS/COCO json loading, COCO-LT, and a
torch detection dataset. Class indices are contiguous ``0..C-1`` by ascending category id."""

from extract.datasets.coco_lt import COCO_LT_BINS, build_coco_lt, convert_coco_val, group_bounds
from extract.datasets.lvis_json import (
    AnnotationSet,
    ImageRecord,
    check_images_exist,
    class_statistics,
    frequency_group,
    load_annotations,
    resolve_split,
)
from extract.datasets.synthetic import generate, plan_images, rerender
from extract.datasets.synthetic_config import SynthConfig, train_targets, val_targets
from extract.datasets.torch_dataset import DetectionDataset, collate, segmentation_to_mask

__all__ = [
    "COCO_LT_BINS",
    "AnnotationSet",
    "DetectionDataset",
    "ImageRecord",
    "SynthConfig",
    "build_coco_lt",
    "check_images_exist",
    "class_statistics",
    "collate",
    "convert_coco_val",
    "frequency_group",
    "generate",
    "group_bounds",
    "load_annotations",
    "plan_images",
    "rerender",
    "resolve_split",
    "segmentation_to_mask",
    "train_targets",
    "val_targets",
]

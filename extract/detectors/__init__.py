"""Detectors: the small default Mask R-CNN (arch, build, train, checkpoints) and extraction adapters.

Public API:
    DetectorArch, build_detector                      -- arch.py, model.py
    save_detector, load_detector, LoadedDetector      -- checkpoint.py
    DetectorTrainConfig, train_detector, run_training -- train_config.py, train.py
    DetectorAdapter, RoiOutputs, TorchvisionAdapter   -- base.py, adapter.py
    ADAPTERS: backend name -> adapter class (each has ``from_checkpoint(path, *, device)``)
"""

from extract.detectors.adapter import TorchvisionAdapter
from extract.detectors.arch import DetectorArch
from extract.detectors.base import FEATURE_LEVELS, DetectorAdapter, RoiOutputs
from extract.detectors.checkpoint import LoadedDetector, load_detector, save_detector
from extract.detectors.model import build_detector, count_parameters
from extract.detectors.train import run_training, train_detector
from extract.detectors.train_config import DetectorTrainConfig

ADAPTERS: dict[str, type] = {"torchvision": TorchvisionAdapter}

__all__ = [
    "ADAPTERS",
    "FEATURE_LEVELS",
    "DetectorAdapter",
    "DetectorArch",
    "DetectorTrainConfig",
    "LoadedDetector",
    "RoiOutputs",
    "TorchvisionAdapter",
    "build_detector",
    "count_parameters",
    "load_detector",
    "run_training",
    "save_detector",
    "train_detector",
]

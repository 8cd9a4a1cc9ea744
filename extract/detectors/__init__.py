"""Detectors: the small default Mask R-CNN (arch, build, train, checkpoints) and extraction adapters.

Public API:
    DetectorArch, build_detector                      -- arch.py, model.py
    save_detector, load_detector, LoadedDetector      -- checkpoint.py
    DetectorTrainConfig, train_detector, run_training -- train_config.py, train.py
    DetectorAdapter, RoiOutputs, Postprocess          -- base.py (the detector boundary)
    TorchvisionAdapter, MmdetAdapter                  -- adapter.py, mmdet_adapter.py (backends)
    BACKENDS, load_adapter, read_checkpoint           -- backends.py (chosen by checkpoint format)
"""

from extract.detectors.adapter import TorchvisionAdapter
from extract.detectors.arch import DetectorArch
from extract.detectors.backends import BACKENDS, backend_of, load_adapter, read_checkpoint
from extract.detectors.base import FEATURE_LEVELS, DetectorAdapter, Postprocess, RoiOutputs
from extract.detectors.mmdet_adapter import MmdetAdapter
from extract.detectors.checkpoint import LoadedDetector, load_detector, save_detector
from extract.detectors.model import build_detector, count_parameters
from extract.detectors.train import run_training, train_detector
from extract.detectors.train_config import DetectorTrainConfig

__all__ = [
    "BACKENDS",
    "FEATURE_LEVELS",
    "DetectorAdapter",
    "DetectorArch",
    "DetectorTrainConfig",
    "LoadedDetector",
    "MmdetAdapter",
    "Postprocess",
    "RoiOutputs",
    "TorchvisionAdapter",
    "backend_of",
    "load_adapter",
    "read_checkpoint",
    "build_detector",
    "count_parameters",
    "load_detector",
    "run_training",
    "save_detector",
    "train_detector",
]

"""How the detector turns RoI outputs into detections, as a store records it.

- :class:`Postprocess`: its test-time detection settings (score threshold, NMS IoU, detections
  per image, small-box filter), recorded in the store's detector metadata.
- :class:`BoxRegression`: a class-specific box regressor and its delta coder, kept in the
  store's ``detector_head/`` group (see :mod:`cache_schema.head_init`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cache_schema.errors import SchemaError


@dataclass(frozen=True, kw_only=True)
class Postprocess:
    """The detector's own test-time detection settings (what full and cached evaluation apply).

    Stores made before this record have none; readers then use torchvision's defaults
    (:meth:`Postprocess.torchvision_default`).

    Attributes:
        score_thresh: (RoI, class) pairs scoring at or below this are dropped.
        nms_iou: IoU of the per-class NMS.
        max_dets: detections kept per image.
        min_box_size: boxes narrower or lower than this (px) are dropped before NMS
            (torchvision: 1e-2; mmdetection: 0, none dropped).
    """

    score_thresh: float
    nms_iou: float
    max_dets: int
    min_box_size: float = 0.0

    @classmethod
    def torchvision_default(cls) -> "Postprocess":
        return cls(score_thresh=0.0, nms_iou=0.5, max_dets=300, min_box_size=1e-2)

    def to_dict(self) -> dict:
        return {"score_thresh": self.score_thresh, "nms_iou": self.nms_iou, "max_dets": self.max_dets,
                "min_box_size": self.min_box_size}

    def __post_init__(self) -> None:
        if not 0.0 < self.nms_iou <= 1.0 or self.max_dets < 1 or not 0.0 <= self.score_thresh < 1.0:
            raise SchemaError(f"detector postprocess {self} is invalid: need 0 < nms_iou <= 1, max_dets >= 1, "
                              "0 <= score_thresh < 1")



# Class-specific box regression (mmdetection's Shared2FCBBoxHead with reg_class_agnostic=False).
# A detector whose box regression is class-specific gives every (RoI, class) pair its own box.
# Storing those would cost 16·C bytes per RoI (19 KB at LVIS's 1,203 classes), so the store keeps
# the frozen regression layer instead, and cached evaluation recomputes the box of any pair from
# the RoI's stored ``fc`` feature — the same arithmetic the detector does.
REG_KEYS = ("reg.weight", "reg.bias")
CODERS = ("delta_xywh",)


@dataclass(frozen=True, kw_only=True)
class BoxRegression:
    """The frozen class-specific box regressor and its delta coder.

    Attributes:
        weight: float32 ``[4C, D]`` (rows ``4k..4k+3`` are class ``k``'s dx, dy, dw, dh).
        bias: float32 ``[4C]``.
        coder: ``"delta_xywh"`` (mmdet's ``DeltaXYWHBBoxCoder``): ``x = px + pw·dx``,
            ``w = pw·exp(dw)`` with deltas de-normalised as ``d·std + mean`` and ``dw, dh``
            clamped to ``±|log(wh_ratio_clip)|``, centre/size in mmdet's ``x2 - x1`` convention;
            the decoded box is clipped to the image.
        means, stds: the coder's 4 target means and standard deviations.
        wh_ratio_clip: the coder's ``wh_ratio_clip`` (mmdet default 16/1000).
    """

    weight: np.ndarray
    bias: np.ndarray
    coder: str = "delta_xywh"
    means: tuple[float, ...] = (0.0, 0.0, 0.0, 0.0)
    stds: tuple[float, ...] = (0.1, 0.1, 0.2, 0.2)
    wh_ratio_clip: float = 16 / 1000

    def __post_init__(self) -> None:
        if self.coder not in CODERS:
            raise SchemaError(f"box coder {self.coder!r} is not supported; supported: {', '.join(CODERS)}")
        w, b = np.asarray(self.weight), np.asarray(self.bias)
        if w.ndim != 2 or w.shape[0] % 4 or b.shape != (w.shape[0],):
            raise SchemaError(f"box regression weight {w.shape} / bias {b.shape} must be [4C, D] / [4C]")
        if len(self.means) != 4 or len(self.stds) != 4 or not 0.0 < self.wh_ratio_clip < 1.0:
            raise SchemaError("box coder needs 4 means, 4 stds and 0 < wh_ratio_clip < 1")
        object.__setattr__(self, "weight", np.ascontiguousarray(w, dtype=np.float32))
        object.__setattr__(self, "bias", np.ascontiguousarray(b, dtype=np.float32))
        object.__setattr__(self, "means", tuple(float(v) for v in self.means))
        object.__setattr__(self, "stds", tuple(float(v) for v in self.stds))

    @property
    def num_classes(self) -> int:
        return self.weight.shape[0] // 4

    def coder_dict(self) -> dict:
        return {"coder": self.coder, "means": list(self.means), "stds": list(self.stds),
                "wh_ratio_clip": float(self.wh_ratio_clip)}

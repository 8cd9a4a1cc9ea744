"""The small default detector's architecture as a typed, serialisable record.

:class:`DetectorArch` is what a detector checkpoint stores under ``"arch"`` and what an extracted
store records about its detector, so every field is a plain value (ints, floats, bools, strings,
tuples of ints) and :meth:`DetectorArch.to_dict` / :meth:`DetectorArch.from_dict` round-trip.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

from cache_schema.errors import ConfigError

BACKBONES = ("resnet18_c3",)
NORMS = ("group", "batch")

# Channels of resnet18's conv1..layer3 outputs that feed the FPN (layer1, layer2, layer3).
RESNET18_C3_CHANNELS = (64, 128, 256)


@dataclass(frozen=True, kw_only=True)
class DetectorArch:
    """Shape and settings of a torchvision Mask R-CNN built by :func:`build_detector`.

    Attributes:
        num_classes: C, foreground classes (torchvision adds background as index 0 inside).
        backbone: ``"resnet18_c3"``: resnet18 conv1..layer3, randomly initialised.
        norm: ``"group"`` (GroupNorm in backbone, FPN and mask head; default because batch 2
            from scratch gives BatchNorm noisy statistics and a train/test gap) or ``"batch"``.
        gn_groups: GroupNorm groups (reduced to a divisor of the channel count where needed).
        fpn_channels: FPN width; also the channel count of the ``pooled`` RoI features.
        representation_size: width of the two shared fc layers (``fc6``, ``fc7``); the ``fc``
            RoI feature has this size.
        mask_head_channels: width of the four 3x3 convs of the mask head.
        image_size: images are resized so their longest side is this (min_size = max_size), px.
        anchor_sizes: one anchor size (px, in the resized image) per FPN level, finest first;
            the FPN has 4 levels (strides 4, 8, 16, 32).
        aspect_ratios: anchor aspect ratios (h/w), shared by all levels.
        class_agnostic_box: one box regression for all classes (the cache stores one per RoI).
        class_agnostic_mask: one mask for all classes (otherwise one per class).
        rpn_pre_nms_top_n_train / _test: proposals kept per FPN level before NMS.
        rpn_post_nms_top_n_train / _test: proposals kept per image after NMS.
        rpn_nms_thresh: IoU of the RPN's NMS.
        rpn_batch_size_per_image: anchors sampled per image for the RPN loss.
        box_batch_size_per_image: RoIs sampled per image for the box/class loss.
        box_positive_fraction: share of foreground RoIs in that sample.
        box_detections_per_img / box_score_thresh / box_nms_thresh: inference postprocess.
        mask_roi_size: RoIAlign output side of the mask branch (the mask logits are twice this).
    """

    num_classes: int
    backbone: str = "resnet18_c3"
    norm: str = "group"
    gn_groups: int = 32
    fpn_channels: int = 64
    representation_size: int = 256
    mask_head_channels: int = 64
    image_size: int = 256
    anchor_sizes: tuple[int, ...] = (16, 32, 64, 128)
    aspect_ratios: tuple[float, ...] = (0.5, 1.0, 2.0)
    class_agnostic_box: bool = True
    class_agnostic_mask: bool = True
    rpn_pre_nms_top_n_train: int = 1000
    rpn_pre_nms_top_n_test: int = 1000
    rpn_post_nms_top_n_train: int = 500
    rpn_post_nms_top_n_test: int = 300
    rpn_nms_thresh: float = 0.7
    rpn_batch_size_per_image: int = 256
    box_batch_size_per_image: int = 128
    box_positive_fraction: float = 0.25
    box_detections_per_img: int = 300
    box_score_thresh: float = 0.0
    box_nms_thresh: float = 0.5
    mask_roi_size: int = 14

    def __post_init__(self) -> None:
        _check_positive_ints(self)
        if self.backbone not in BACKBONES:
            raise ConfigError(f"detector arch: unknown backbone {self.backbone!r}; use one of {BACKBONES}")
        if self.norm not in NORMS:
            raise ConfigError(f"detector arch: unknown norm {self.norm!r}; use one of {NORMS}")
        if len(self.anchor_sizes) != 4:
            raise ConfigError(
                f"detector arch: anchor_sizes has {len(self.anchor_sizes)} entries; give 4, one per FPN level"
            )
        if not self.aspect_ratios or any(r <= 0 for r in self.aspect_ratios):
            raise ConfigError("detector arch: aspect_ratios must be a non-empty list of positive numbers")
        if not self.class_agnostic_box:
            raise ConfigError(
                "detector arch: class_agnostic_box=False is not supported; the cache stores one "
                "regressed box per RoI, so set it to true"
            )
        for name in ("rpn_nms_thresh", "box_nms_thresh", "box_positive_fraction"):
            if not 0.0 < getattr(self, name) <= 1.0:
                raise ConfigError(f"detector arch: {name}={getattr(self, name)} must lie in (0, 1]")
        if not 0.0 <= self.box_score_thresh < 1.0:
            raise ConfigError(f"detector arch: box_score_thresh={self.box_score_thresh} must lie in [0, 1)")

    @property
    def mask_size(self) -> int:
        """Side of the mask logits (the mask predictor upsamples the RoI grid 2x)."""
        return 2 * self.mask_roi_size

    @property
    def pooled_shape(self) -> tuple[int, int, int]:
        """Shape of one RoI's ``pooled`` feature: (fpn_channels, 7, 7)."""
        return (self.fpn_channels, 7, 7)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (lists instead of tuples) that ``from_dict`` reads back, JSON-safe."""
        out = asdict(self)
        out["anchor_sizes"] = list(self.anchor_sizes)
        out["aspect_ratios"] = list(self.aspect_ratios)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "DetectorArch":
        """Rebuild from :meth:`to_dict`'s output; unknown keys are an error, missing keys default."""
        if not isinstance(data, dict):
            raise ConfigError(f"detector arch: expected a dict, got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"detector arch: unknown field(s) {unknown}; remove them or upgrade roicache")
        if "num_classes" not in data:
            raise ConfigError("detector arch: num_classes is missing; it must give the number of classes")
        values = dict(data)
        for name, kind in (("anchor_sizes", int), ("aspect_ratios", float)):
            if name in values:
                try:
                    values[name] = tuple(kind(v) for v in values[name])
                except (TypeError, ValueError) as exc:
                    raise ConfigError(f"detector arch: {name} must be a list of numbers ({exc})") from None
        return cls(**values)


_POSITIVE_INT_FIELDS = (
    "num_classes",
    "gn_groups",
    "fpn_channels",
    "representation_size",
    "mask_head_channels",
    "image_size",
    "rpn_pre_nms_top_n_train",
    "rpn_pre_nms_top_n_test",
    "rpn_post_nms_top_n_train",
    "rpn_post_nms_top_n_test",
    "rpn_batch_size_per_image",
    "box_batch_size_per_image",
    "box_detections_per_img",
    "mask_roi_size",
)


def _check_positive_ints(arch: DetectorArch) -> None:
    for name in _POSITIVE_INT_FIELDS:
        value = getattr(arch, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"detector arch: {name}={value!r} must be a positive integer")
    for size in arch.anchor_sizes:
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ConfigError(f"detector arch: anchor size {size!r} must be a positive integer (pixels)")

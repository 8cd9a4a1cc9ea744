"""What the extraction writer needs from any two-stage detector, free of framework types.

A backend (one module per framework, chosen by checkpoint format in :mod:`extract.detectors.backends`)
implements :class:`DetectorAdapter`; its callers only see numpy arrays in :class:`RoiOutputs`. Class indices are contiguous ``0..C-1`` and
background is ``C`` (last column of ``logits``); boxes are xyxy in ORIGINAL image pixels.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

from cache_schema.errors import SchemaError
from cache_schema.postprocess import BoxRegression
from cache_schema.postprocess import Postprocess  # noqa: F401  (part of the boundary; the store records it)

FEATURE_LEVELS = ("fc", "pooled")


@dataclass(frozen=True, kw_only=True)
class StageRois:
    """One classification stage of a cascade detector, for the ``R`` RoIs of one image.

    Attributes:
        boxes: float32 ``[R, 4]`` the RoIs this stage classifies (xyxy, original pixels): the
            proposals for stage 0, the previous stage's regressed boxes after it.
        logits: float32 ``[R, C+1]`` this stage's class logits (background last).
        features: level name -> float32 ``[R, *level_shape]`` of this stage's box head.
    """

    boxes: np.ndarray
    logits: np.ndarray
    features: dict[str, np.ndarray] = field(default_factory=dict)

    def __post_init__(self) -> None:
        r = self.boxes.shape[0]
        if self.boxes.shape != (r, 4) or self.logits.ndim != 2 or self.logits.shape[0] != r or \
                any(f.shape[0] != r for f in self.features.values()):
            raise SchemaError(f"StageRois: boxes {self.boxes.shape}, logits {self.logits.shape} and features "
                              f"{ {k: v.shape for k, v in self.features.items()} } disagree on the RoI count")


@dataclass(frozen=True, kw_only=True)
class RoiOutputs:
    """Everything the detector computes for the ``R`` RoIs of one image.

    Attributes:
        boxes: float32 ``[R, 4]`` proposal boxes, xyxy, original image pixels; RPN proposals
            (highest objectness first) followed by the appended ground-truth boxes.
        objectness: float32 ``[R]`` RPN objectness logit; ``+inf`` for appended GT boxes.
        is_gt: bool ``[R]``, the RoI is an appended ground-truth box.
        features: level name -> float32 ``[R, *level_shape]`` (``fc``: ``[R, D]`` output of the
            second shared fc + ReLU; ``pooled``: ``[R, C_fpn, 7, 7]`` RoIAlign output).
        logits: float32 ``[R, C+1]`` the detector's class logits, classes ``0..C-1`` then
            background.
        reg_boxes: float32 ``[R, 4]`` class-agnostic regressed boxes, xyxy, clipped to the image,
            original image pixels.
        mask_logits: float32 ``[R, M, M]`` class-agnostic mask logits computed on ``reg_boxes``,
            or ``None`` when masks were not asked for.
        class_boxes: float32 ``[R, C, 4]`` per-class regressed boxes (clipped, original pixels)
            of a detector whose box regression is class-specific (``reg_boxes`` then holds each
            RoI's box under its highest-scoring class); ``None`` for class-agnostic regression.
        det_masks: for a class-specific mask head asked for a :class:`MaskRequest`: one COCO RLE
            per requested detection (the model's own mask pasting and threshold), else ``None``.
        stages: for a cascade detector, every stage's RoIs, logits and features (stage 0 first,
            its boxes and features those above); ``logits`` is then the detector's final score
            input — the stage logits averaged, as the cascade does — and ``reg_boxes`` the last
            stage's boxes. ``None`` for a single-stage box head.
    """

    boxes: np.ndarray
    objectness: np.ndarray
    is_gt: np.ndarray
    features: dict[str, np.ndarray] = field(default_factory=dict)
    logits: np.ndarray
    reg_boxes: np.ndarray
    mask_logits: np.ndarray | None = None
    class_boxes: np.ndarray | None = None
    det_masks: tuple[dict, ...] | None = None
    stages: tuple[StageRois, ...] | None = None

    def __post_init__(self) -> None:
        r = self.boxes.shape[0]
        if self.stages is not None and (len(self.stages) < 2 or any(len(st.boxes) != r for st in self.stages)):
            raise SchemaError(f"RoiOutputs.stages: a cascade has >= 2 stages of {r} RoIs each")
        checks = [
            ("boxes", self.boxes, (r, 4), np.float32),
            ("objectness", self.objectness, (r,), np.float32),
            ("is_gt", self.is_gt, (r,), np.bool_),
            ("reg_boxes", self.reg_boxes, (r, 4), np.float32),
        ]
        for name, arr, shape, dtype in checks:
            if arr.shape != shape or arr.dtype != dtype:
                got, want = f"{arr.dtype}{list(arr.shape)}", f"{np.dtype(dtype)}{list(shape)}"
                raise SchemaError(f"RoiOutputs.{name}: got {got}, expected {want}")
        if self.logits.ndim != 2 or self.logits.shape[0] != r or self.logits.dtype != np.float32:
            got = f"{self.logits.dtype}{list(self.logits.shape)}"
            raise SchemaError(f"RoiOutputs.logits: got {got}, expected float32[{r}, C+1]")
        for name, arr in self.features.items():
            if arr.shape[0] != r or arr.dtype != np.float32:
                got = f"{arr.dtype}{list(arr.shape)}"
                raise SchemaError(f"RoiOutputs.features[{name!r}]: got {got}, expected float32[{r}, ...]")
        if self.mask_logits is not None and (
            self.mask_logits.ndim != 3 or self.mask_logits.shape[0] != r or self.mask_logits.dtype != np.float32
        ):
            got = f"{self.mask_logits.dtype}{list(self.mask_logits.shape)}"
            raise SchemaError(f"RoiOutputs.mask_logits: got {got}, expected float32[{r}, M, M]")
        c = self.logits.shape[1] - 1
        if self.class_boxes is not None and (self.class_boxes.shape != (r, c, 4) or self.class_boxes.dtype != np.float32):
            got = f"{self.class_boxes.dtype}{list(self.class_boxes.shape)}"
            raise SchemaError(f"RoiOutputs.class_boxes: got {got}, expected float32[{r}, {c}, 4]")

    def __len__(self) -> int:
        return int(self.boxes.shape[0])

    @property
    def num_proposals(self) -> int:
        """RoIs that came from the RPN (the first ``len - num_gt`` rows)."""
        return int((~self.is_gt).sum())


@dataclass(frozen=True, kw_only=True)
class MaskRequest:
    """The masks full inference needs for one image: detection ``k`` is RoI ``rows[k]`` detected
    as class ``labels[k]`` with box ``boxes[k]``.

    Attributes:
        rows: int64 ``[K]`` RoI rows of the image's :class:`RoiOutputs`.
        labels: int64 ``[K]`` classes ``0..C-1``.
        boxes: float32 ``[K, 4]`` xyxy, original image pixels.
    """

    rows: np.ndarray
    labels: np.ndarray
    boxes: np.ndarray

    def __post_init__(self) -> None:
        k = len(self.rows)
        if len(self.labels) != k or np.asarray(self.boxes).shape != (k, 4):
            raise SchemaError(f"MaskRequest: {k} rows, {len(self.labels)} labels, boxes {np.asarray(self.boxes).shape}")


#: What :meth:`DetectorAdapter.run` asks the caller for, per image, when it computes masks only
#: for the detections: given the image's outputs without masks and its original (height, width),
#: the :class:`MaskRequest` of the detections kept.
MaskRows = Callable[[RoiOutputs, tuple[int, int]], MaskRequest]


@runtime_checkable
class DetectorAdapter(Protocol):
    """A frozen two-stage detector as extraction, online calibration, injection and full
    evaluation drive it (numpy in, numpy out). Callers never reach into a backend's model.

    Attributes:
        backend: name of the backend (``"torchvision"``, ``"mmdet"``), recorded in stores.
        path: the checkpoint file; ``sha256``: its hex sha256 (the detector's identity).
        num_classes: C.
        levels: feature level name -> per-RoI shape, e.g. ``{"fc": (256,), "pooled": (64, 7, 7)}``.
        mask_size: side M of the mask logits (0 for a detector without a mask head).
        class_agnostic_mask: one mask per RoI (what the store can hold); else one per class.
        categories: ``C`` dicts ``{"id", "name"}``; index ``k`` is class ``k``; ``id`` is ``None``
            when the checkpoint records only names (mmdet): the annotation file supplies the ids.
        default_proposals: RPN proposals the detector keeps per image at test time.
        postprocess: its test-time detection settings.
        stage_fg_iou: a cascade's per-stage foreground IoU (its training assigners'), one per
            stage; empty for a single-stage box head (then ``RoiOutputs.stages`` is ``None``).
    """

    backend: str
    path: Path
    sha256: str
    num_classes: int
    levels: dict[str, tuple[int, ...]]
    mask_size: int
    class_agnostic_mask: bool
    categories: tuple[dict, ...]
    default_proposals: int
    postprocess: Postprocess
    stage_fg_iou: tuple[float, ...]

    def describe(self) -> dict:
        """JSON-safe record of the detector for the store's attributes (backend, arch, sha256...)."""
        ...

    def head_state(self, stage: int = 0) -> dict[str, np.ndarray]:
        """The box head's classification path in the store's neutral naming, float32:
        ``fc6.*``, ``fc7.*`` (the two shared fcs) and ``cls.*`` (rows: classes ``0..C-1`` then
        background) — what heads initialised from the detector start from; of cascade stage
        ``stage``."""
        ...

    def box_regression(self) -> BoxRegression | None:
        """The frozen class-specific box regressor the store keeps (so cached evaluation can
        recompute any (RoI, class) box from the ``fc`` feature), or ``None`` when the detector's
        box regression is class-agnostic (``RoiOutputs.reg_boxes`` is then every class's box)."""
        ...

    def run(
        self,
        images: list[np.ndarray],
        *,
        gt_boxes: list[np.ndarray] | None,
        levels: tuple[str, ...],
        max_proposals: int,
        with_masks: bool,
        mask_rows: MaskRows | None = None,
    ) -> list[RoiOutputs]:
        """RoI outputs of each uint8 ``[H, W, 3]`` RGB image (GT boxes float32 ``[G, 4]`` appended).

        With ``with_masks`` and ``mask_rows``, masks are computed only for the detections
        ``mask_rows`` requests, as detectors run their mask head on detections only: class-agnostic
        heads fill ``mask_logits`` for the requested rows (zeros elsewhere), class-specific heads
        give ``det_masks`` (one RLE per requested detection).
        """
        ...

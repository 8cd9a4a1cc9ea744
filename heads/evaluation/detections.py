"""Turn per-RoI class scores into one image's detections (LVIS results format).

Mirrors torchvision's ``RoIHeads.postprocess_detections`` for class-agnostic boxes:
clip boxes to the image; every (RoI, class) pair with score ``> score_thresh`` is a candidate
(strictly greater, so with the default 0.0 zero scores are dropped, exactly as torchvision does);
RoIs whose box is narrower or lower than ``min_box_size`` (torchvision: 1e-2 px; mmdetection: 0,
nothing removed) are removed; per-class NMS
(``torchvision.ops.batched_nms``, or for many candidates an exact equivalent over the best ones,
:mod:`heads.evaluation.nms`); the ``max_dets`` highest scores are kept. Cached evaluation
assembles blocks of images at once (:func:`select_detections_many`, same result per image). Candidates are ordered RoI-major, class-minor, as in
torchvision; results are identical to it (tested) except possibly among exactly equal scores.

Class-specific boxes (``[R, C, 4]`` per image, or :class:`~heads.evaluation.class_boxes.ClassBoxes`
decoded on demand) follow the same rule with each (RoI, class) pair's own box, the size test
applying per pair (:mod:`heads.evaluation.class_select`, which decodes only the candidates NMS
looks at). The ``det`` merge works on the detections' own boxes, so it needs nothing more.

Masks are class-agnostic: each kept RoI's mask is pasted ONCE (sigmoid, pasted into the box at
image size pixel-identically to torchvision's ``paste_masks_in_image``, ``> 0.5``;
:mod:`heads.evaluation.masks`) and RLE-encoded once, and that RLE
is reused for every detection of the RoI — exact, and far cheaper than pasting per detection.
Boxes (and the pasted masks) live in the pixel frame of ``image_size`` — the original image.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torchvision.ops import boxes as box_ops

from cache_schema.errors import ConfigError
from heads.evaluation.class_boxes import ClassBoxes, DenseClassBoxes
from heads.evaluation.class_select import padded, select_class_specific
from heads.evaluation.masks import paste_and_encode, paste_roi_masks
from heads.evaluation.nms import goes_per_class, nms_top, nms_top_many

MIN_BOX_SIZE = 1e-2  # torchvision's remove_small_boxes threshold in postprocess_detections

#: One image's boxes: float ``[R, 4]`` class-agnostic, float ``[R, C, 4]`` class-specific, or
#: class-specific boxes decoded on demand (:class:`ClassBoxes`).
Boxes = torch.Tensor | ClassBoxes


@dataclass(frozen=True, kw_only=True)
class Detections:
    """One image's detections as tensors (sorted by descending score).

    Attributes:
        roi_index: int64 ``[D]`` row of the RoI (in the scores given) each detection comes from.
        labels: int64 ``[D]`` contiguous class ``0..C-1``.
        scores: float32 ``[D]``.
        boxes: float32 ``[D, 4]`` xyxy, pixels of the image.
        stream: int64 ``[D]`` score stream each came from (0; ``det`` merging: 0 orig, 1 cal).
    """

    roi_index: torch.Tensor
    labels: torch.Tensor
    scores: torch.Tensor
    boxes: torch.Tensor
    stream: torch.Tensor

    def __post_init__(self) -> None:
        d = self.scores.shape[0]
        if any(t.shape[0] != d for t in (self.roi_index, self.labels, self.boxes, self.stream)):
            raise ConfigError("Detections: columns differ in length")

    def __len__(self) -> int:
        return int(self.scores.shape[0])

    def take(self, keep: torch.Tensor) -> "Detections":
        return Detections(roi_index=self.roi_index[keep], labels=self.labels[keep], scores=self.scores[keep],
                          boxes=self.boxes[keep], stream=self.stream[keep])


def class_specific(boxes: Boxes) -> bool:
    """Whether ``boxes`` give every (RoI, class) pair its own box."""
    return isinstance(boxes, ClassBoxes) or boxes.ndim == 3


def _check_inputs(scores: torch.Tensor, boxes: Boxes, image_size: tuple[int, int]) -> None:
    if scores.ndim != 2:
        raise ConfigError(f"scores has shape {tuple(scores.shape)}; expected [R, C] foreground scores")
    r, c = scores.shape
    if tuple(boxes.shape) not in ((r, 4), (r, c, 4)):
        raise ConfigError(f"boxes has shape {tuple(boxes.shape)}; expected [{r}, 4] class-agnostic or "
                          f"[{r}, {c}, 4] class-specific xyxy boxes")
    if len(image_size) != 2 or min(int(s) for s in image_size) <= 0:
        raise ConfigError(f"image_size {tuple(image_size)} must be (height, width) > 0")


def _check_settings(nms_iou: float, max_dets: int, min_box_size: float = 0.0) -> None:
    if not 0.0 < nms_iou <= 1.0:
        raise ConfigError(f"nms_iou={nms_iou} must be in (0, 1]; torchvision's default is 0.5")
    if max_dets < 1:
        raise ConfigError(f"max_dets={max_dets} must be >= 1; LVIS uses 300")
    if not min_box_size >= 0.0:
        raise ConfigError(f"min_box_size={min_box_size} must be >= 0 px; torchvision uses 1e-2, mmdetection 0")


def select_detections_many(
    *,
    scores: Sequence[torch.Tensor],
    boxes: Sequence[Boxes],
    image_sizes: Sequence[tuple[int, int]],
    score_thresh: float = 0.0,
    nms_iou: float = 0.5,
    max_dets: int = 300,
    stream: int = 0,
    min_box_size: float = MIN_BOX_SIZE,
) -> list[Detections]:
    """:func:`select_detections` of several images at once (one score stream each): the same
    detections, with the per-image work done on padded ``[B, R, C]`` arrays.

    ``boxes`` per image: float32 ``[R, 4]`` class-agnostic, ``[R, C, 4]`` class-specific, or
    :class:`ClassBoxes` (class-specific, decoded only for the candidates NMS looks at); images of
    both kinds may be mixed. ``min_box_size`` (px): boxes narrower or lower are dropped (per pair
    for class-specific boxes); torchvision's 1e-2 by default, 0 for mmdetection detectors.
    """
    if len(scores) != len(boxes) or len(scores) != len(image_sizes):
        raise ConfigError("select_detections_many: scores, boxes and image_sizes differ in length")
    for s, b, size in zip(scores, boxes, image_sizes):
        _check_inputs(s, b, size)
    _check_settings(nms_iou, max_dets, min_box_size)
    if not scores:
        return []
    c = scores[0].shape[1]
    if any(s.shape[1] != c for s in scores):
        raise ConfigError("select_detections_many: every image needs the same number of classes")
    out: list[Detections | None] = [None] * len(scores)
    agnostic = [i for i, b in enumerate(boxes) if not class_specific(b)]
    if agnostic:
        got = _select_agnostic([scores[i] for i in agnostic], [boxes[i] for i in agnostic],
                               [image_sizes[i] for i in agnostic], score_thresh, nms_iou, max_dets, stream, min_box_size)
        for i, d in zip(agnostic, got):
            out[i] = d
    specific = [i for i, b in enumerate(boxes) if class_specific(b)]
    if specific:
        found = select_class_specific(
            scores=[scores[i] for i in specific], image_sizes=[image_sizes[i] for i in specific],
            boxes=[b if isinstance(b, ClassBoxes) else DenseClassBoxes(boxes=b) for b in (boxes[i] for i in specific)],
            score_thresh=score_thresh, nms_iou=nms_iou, max_dets=max_dets, min_box_size=min_box_size)
        for i, (rois, classes, b) in zip(specific, found):
            out[i] = Detections(roi_index=rois, labels=classes, scores=scores[i].float()[rois, classes], boxes=b,
                                stream=torch.full((rois.shape[0],), stream, dtype=torch.int64))
    return out  # type: ignore[return-value]


def _select_agnostic(scores: Sequence[torch.Tensor], boxes: Sequence[torch.Tensor], image_sizes: Sequence[tuple[int, int]],
                     score_thresh: float, nms_iou: float, max_dets: int, stream: int,
                     min_box_size: float) -> list[Detections]:
    """Class-agnostic images: one box per RoI, the size test per RoI."""
    c = scores[0].shape[1]
    counts = torch.tensor([s.shape[0] for s in scores])
    s_pad, b_pad = padded(scores, c), padded(boxes, 4).reshape(len(scores), -1, 4)
    # torchvision's clip_boxes_to_image (clamp to [0, width] / [0, height]) and remove_small_boxes.
    hw = torch.tensor([[int(v) for v in size] for size in image_sizes], dtype=torch.float32)
    x = torch.minimum(b_pad[..., 0::2].clamp(min=0), hw[:, None, None, 1])
    y = torch.minimum(b_pad[..., 1::2].clamp(min=0), hw[:, None, None, 0])
    b_pad = torch.stack([x[..., 0], y[..., 0], x[..., 1], y[..., 1]], dim=-1)
    exists = torch.arange(b_pad.shape[1])[None, :] < counts[:, None]
    roi_ok = exists & (x[..., 1] - x[..., 0] >= min_box_size) & (y[..., 1] - y[..., 0] >= min_box_size)
    valid = (s_pad > score_thresh) & roi_ok[..., None]  # strictly greater, as torchvision
    n_valid = valid.sum(dim=(1, 2))
    out: list[Detections | None] = [None] * len(scores)
    many = torch.tensor([goes_per_class(n, b_pad.device) for n in n_valid.tolist()], dtype=torch.bool)
    for q in torch.nonzero(~many).squeeze(1).tolist():  # few candidates: one batched_nms, as torchvision
        rois, classes = torch.nonzero(valid[q], as_tuple=True)  # row-major: RoI, then class
        keep = nms_top(b_pad[q, rois], s_pad[q, rois, classes], classes, nms_iou, max_dets)
        out[q] = _detections(b_pad[q], s_pad[q], rois[keep], classes[keep], stream)
    idx = torch.nonzero(many).squeeze(1)
    if idx.numel():
        flat = torch.where(valid[idx], s_pad[idx], torch.tensor(float("-inf"))).reshape(idx.shape[0], -1)
        kept = nms_top_many(flat, b_pad[idx], c, n_valid[idx], nms_iou, max_dets)
        for q, f in zip(idx.tolist(), kept):
            out[q] = _detections(b_pad[q], s_pad[q], f // c, f % c, stream)
    return out  # type: ignore[return-value]


def _detections(boxes: torch.Tensor, scores: torch.Tensor, rois: torch.Tensor, classes: torch.Tensor,
                stream: int) -> Detections:
    return Detections(roi_index=rois, labels=classes, scores=scores[rois, classes], boxes=boxes[rois],
                      stream=torch.full((rois.shape[0],), stream, dtype=torch.int64))


def select_detections(
    *,
    scores: torch.Tensor,
    boxes: Boxes,
    image_size: tuple[int, int],
    score_thresh: float = 0.0,
    nms_iou: float = 0.5,
    max_dets: int = 300,
    stream: int = 0,
    min_box_size: float = MIN_BOX_SIZE,
) -> Detections:
    """Detections of one score stream: ``scores`` float ``[R, C]``, ``boxes`` float ``[R, 4]``
    xyxy class-agnostic regressed boxes, or class-specific ones (``[R, C, 4]`` or
    :class:`ClassBoxes`); see module doc for the exact rule."""
    return select_detections_many(scores=[scores], boxes=[boxes], image_sizes=[image_size], score_thresh=score_thresh,
                                  nms_iou=nms_iou, max_dets=max_dets, stream=stream, min_box_size=min_box_size)[0]


def merge_det(*, dets: Sequence[Detections], nms_iou: float = 0.5, max_dets: int = 300) -> Detections:
    """The ``det`` rule: union of several heads' detection sets of one image, per-class NMS,
    the ``max_dets`` highest scores kept (classic detection-level ensembling)."""
    if not dets:
        raise ConfigError("merge_det needs at least one detection set")
    _check_settings(nms_iou, max_dets)
    union = Detections(**{f: torch.cat([getattr(d, f) for d in dets]) for f in ("roi_index", "labels", "scores", "boxes", "stream")})
    keep = nms_top(union.boxes, union.scores, union.labels, nms_iou, max_dets)
    return union.take(keep)


def assemble_detection_arrays(
    *,
    scores: torch.Tensor | Sequence[torch.Tensor],
    boxes: Boxes,
    image_size: tuple[int, int],
    score_thresh: float = 0.0,
    nms_iou: float = 0.5,
    max_dets: int = 300,
    min_box_size: float = MIN_BOX_SIZE,
) -> Detections:
    """Detections of one image as arrays. ``scores``: one ``[R, C]`` tensor, or several score
    streams of the same RoIs (the ``det`` rule), which are detected separately and merged.
    ``boxes``: ``[R, 4]`` class-agnostic, or class-specific (``[R, C, 4]``, :class:`ClassBoxes`)."""
    streams = [scores] if isinstance(scores, torch.Tensor) else list(scores)
    sets = [
        select_detections(scores=s, boxes=boxes, image_size=image_size, score_thresh=score_thresh,
                          nms_iou=nms_iou, max_dets=max_dets, stream=i, min_box_size=min_box_size)
        for i, s in enumerate(streams)
    ]
    return sets[0] if len(sets) == 1 else merge_det(dets=sets, nms_iou=nms_iou, max_dets=max_dets)


def _unique_rois(dets: Detections) -> tuple[torch.Tensor, torch.Tensor]:
    """(RoIs with a detection, index of each detection's RoI in that list)."""
    return torch.unique(dets.roi_index, return_inverse=True)


def _unique_masks(dets: Detections) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(RoI, box) of each distinct mask to paste, and each detection's index in that list: one
    per RoI for class-agnostic boxes (all its detections share its box), one per (RoI, box) for
    class-specific ones. Sorted by RoI, so class-agnostic boxes give :func:`_unique_rois`' order."""
    key = torch.cat([dets.roi_index[:, None].double(), dets.boxes.double()], dim=1)
    uniq, inverse = torch.unique(key, dim=0, return_inverse=True)
    return uniq[:, 0].long(), uniq[:, 1:].to(dets.boxes.dtype), inverse


def masks_of(*, dets: Detections, mask_logits: torch.Tensor, reg_boxes: torch.Tensor, image_size: tuple[int, int]) -> torch.Tensor:
    """bool ``[D, H, W]`` mask of each detection (each RoI pasted once; for plots and tests).

    ``reg_boxes`` are the same per-RoI boxes given to the assembly (clipped as it clips them).
    """
    rois, inverse = _unique_rois(dets)
    boxes = box_ops.clip_boxes_to_image(reg_boxes.float()[rois], (int(image_size[0]), int(image_size[1])))
    return paste_roi_masks(mask_logits=mask_logits[rois], boxes=boxes, image_size=image_size)[inverse]


def to_results(
    *,
    dets: Detections,
    image_id: int,
    category_ids: Sequence[int],
    mask_logits: torch.Tensor | None = None,
    image_size: tuple[int, int] | None = None,
) -> list[dict]:
    """LVIS results dicts (``image_id, category_id, bbox`` xywh, ``score``, ``segmentation`` RLE
    when ``mask_logits`` ``[R, M, M]`` are given); each RoI's mask pasted and encoded once."""
    if len(dets) == 0:
        return []
    cats = np.asarray(category_ids, dtype=np.int64)
    if int(dets.labels.max()) >= len(cats):
        raise ConfigError(f"category_ids has {len(cats)} entries but a label is {int(dets.labels.max())}; pass one json id per class")
    xyxy = dets.boxes.double().cpu().numpy()
    xywh = np.concatenate([xyxy[:, :2], xyxy[:, 2:] - xyxy[:, :2]], axis=1).tolist()
    labels = cats[dets.labels.cpu().numpy()].tolist()
    scores = dets.scores.cpu().tolist()
    out = [{"image_id": int(image_id), "category_id": c, "bbox": b, "score": s} for c, b, s in zip(labels, xywh, scores)]
    if mask_logits is not None:
        if image_size is None:
            raise ConfigError("to_results: image_size (h, w) is needed to paste masks")
        # Each RoI's (class-agnostic) mask is pasted once per distinct box it was detected with:
        # once per RoI for class-agnostic boxes.
        rois, boxes, inverse = _unique_masks(dets)
        rles = paste_and_encode(mask_logits=mask_logits[rois], boxes=boxes, image_size=image_size)
        for r, i in zip(out, inverse.tolist()):
            r["segmentation"] = rles[i]
    return out


def assemble_detections(
    *,
    scores: torch.Tensor | Sequence[torch.Tensor],
    boxes: Boxes,
    mask_logits: torch.Tensor | None,
    image_size: tuple[int, int],
    image_id: int,
    category_ids: Sequence[int],
    score_thresh: float = 0.0,
    nms_iou: float = 0.5,
    max_dets: int = 300,
    min_box_size: float = MIN_BOX_SIZE,
) -> list[dict]:
    """One image's detections in LVIS results format.

    Args:
        scores: float32 ``[R, C]`` combined foreground scores (or several streams, ``det`` rule).
        boxes: float32 ``[R, 4]`` class-agnostic regressed boxes, xyxy, pixels of the image, or
            class-specific ones (``[R, C, 4]``, :class:`ClassBoxes`).
        mask_logits: ``[R, M, M]`` class-agnostic mask logits, pasted into each detection's box,
            or None (no masks).
        image_size: (height, width) of the image the boxes are in.
        image_id: json image id.
        category_ids: ``C`` json category ids (contiguous class -> id).
    """
    if mask_logits is not None and mask_logits.shape[0] != boxes.shape[0]:
        raise ConfigError(f"mask_logits has {mask_logits.shape[0]} rows, boxes {boxes.shape[0]}; both are per RoI")
    dets = assemble_detection_arrays(scores=scores, boxes=boxes, image_size=image_size, score_thresh=score_thresh,
                                     nms_iou=nms_iou, max_dets=max_dets, min_box_size=min_box_size)
    return to_results(dets=dets, image_id=image_id, category_ids=category_ids, mask_logits=mask_logits, image_size=image_size)

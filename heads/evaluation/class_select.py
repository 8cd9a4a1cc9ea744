"""Detection assembly when every (RoI, class) pair has its own box (class-specific regression).

The rule is the class-agnostic one (:mod:`heads.evaluation.detections`) with each candidate's own
box: candidates are the pairs scoring ``> score_thresh``, RoI-major; their boxes are clipped to
the image and those narrower or lower than ``min_box_size`` dropped; per-class NMS as
``torchvision.ops.batched_nms`` does it (one NMS over class-offset boxes for at most 1000
candidates on CPU, one per class above, :func:`heads.evaluation.nms.goes_per_class`); the
``max_dets`` best kept. mmdetection's ``multiclass_nms`` is this rule with ``min_box_size`` 0.

Memory and time: boxes are decoded only for the candidates NMS looks at — all of them when there
are at most 1000, else those of the exact top-``k`` windows of :func:`heads.evaluation.nms.nms_top_many`
(about ``4 x max_dets`` per image) — never the ``R x C`` boxes of an image (19 MB at 1,000 RoIs and
LVIS's 1,203 classes, 600 MB per block of 32 images). Which NMS variant torchvision would pick
depends on the candidates left after the size filter; when that filter can remove boxes
(``min_box_size > 0``, or a box with ``x2 < x1``), the count is settled by decoding the best
candidates in doubling windows until more than 1000 pass or none are left.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch

from heads.evaluation.class_boxes import clip_to_image
from heads.evaluation.nms import goes_per_class, nms_top, nms_top_many

CPU = torch.device("cpu")


class PairBoxes(Protocol):
    """One image's class-specific boxes (:class:`~heads.evaluation.class_boxes.ClassBoxes`,
    :class:`~heads.evaluation.class_boxes.DenseClassBoxes`)."""

    @property
    def shape(self) -> tuple[int, int, int]: ...

    def boxes_of(self, rows: torch.Tensor, classes: torch.Tensor) -> torch.Tensor: ...

    def never_inverted(self) -> bool: ...


def padded(tensors: Sequence[torch.Tensor], width: int) -> torch.Tensor:
    """float32 ``[B, max R, width]``: the ``[R, width]`` tensors, zero-padded."""
    return torch.nn.utils.rnn.pad_sequence([t.float().reshape(t.shape[0], width) for t in tensors], batch_first=True)


def select_class_specific(
    *,
    scores: Sequence[torch.Tensor],
    boxes: Sequence[PairBoxes],
    image_sizes: Sequence[tuple[int, int]],
    score_thresh: float,
    nms_iou: float,
    max_dets: int,
    min_box_size: float,
) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Per image ``(rois, classes, boxes)`` of its detections by descending score: int64 ``[D]``
    RoI rows, int64 ``[D]`` classes, float32 ``[D, 4]`` clipped xyxy boxes.

    ``scores``: float ``[R, C]`` per image; ``boxes``: that image's pair boxes (``[R, C, 4]``);
    ``image_sizes``: (height, width) per image. Inputs are checked by the caller.
    """
    b_n, c = len(scores), scores[0].shape[1]
    counts = torch.tensor([s.shape[0] for s in scores])
    s_pad = padded(scores, c)
    exists = torch.arange(s_pad.shape[1])[None, :] < counts[:, None]
    valid = (s_pad > score_thresh) & exists[..., None]  # strictly greater, as torchvision and mmdet
    n_valid = valid.sum(dim=(1, 2))

    def clipped(q: int, rows: torch.Tensor, classes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b = clip_to_image(boxes[q].boxes_of(rows, classes), image_sizes[q])
        ok = (b[:, 2] - b[:, 0] >= min_box_size) & (b[:, 3] - b[:, 1] >= min_box_size)
        return b, ok

    def pair_fn(images: torch.Tensor, flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = torch.empty((flat.shape[0], 4), dtype=torch.float32)
        ok = torch.empty(flat.shape[0], dtype=torch.bool)
        for q in torch.unique(images).tolist():
            mine = images == q
            out[mine], ok[mine] = clipped(q, flat[mine] // c, flat[mine] % c)
        return out, ok

    def flat_of(q: int) -> torch.Tensor:
        return torch.where(valid[q], s_pad[q], torch.tensor(float("-inf"))).reshape(-1)

    def more_than_batched_limit(q: int) -> bool:
        """Whether more than the batched-NMS limit of candidates pass the size filter."""
        n, flat, k = int(n_valid[q]), flat_of(q), 1001
        while True:
            k = min(n, k)
            top = torch.topk(flat, k).indices
            if goes_per_class(int(clipped(q, top // c, top % c)[1].sum()), CPU):
                return True
            if k == n:
                return False
            k *= 2

    out: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None] = [None] * b_n
    many = []
    for q in range(b_n):
        n = int(n_valid[q])
        if goes_per_class(n, CPU) and ((min_box_size <= 0 and boxes[q].never_inverted()) or more_than_batched_limit(q)):
            many.append(q)
            continue
        # Few candidates (<= 1000 after the size filter): all decoded, one batched_nms, as torchvision.
        rois, classes = torch.nonzero(valid[q], as_tuple=True)  # row-major: RoI, then class
        b, ok = clipped(q, rois, classes)
        rois, classes, b = rois[ok], classes[ok], b[ok]
        keep = nms_top(b, s_pad[q, rois, classes], classes, nms_iou, max_dets)
        out[q] = (rois[keep], classes[keep], b[keep])
    if many:
        idx = torch.tensor(many)
        flat = torch.where(valid[idx], s_pad[idx], torch.tensor(float("-inf"))).reshape(len(many), -1)
        kept = nms_top_many(flat, lambda images, f: pair_fn(idx[images], f), c, n_valid[idx], nms_iou, max_dets)
        for q, f in zip(many, kept):
            rois, classes = f // c, f % c
            out[q] = (rois, classes, clipped(q, rois, classes)[0])
    return out  # type: ignore[return-value]

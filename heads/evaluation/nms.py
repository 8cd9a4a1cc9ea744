"""Per-class greedy NMS, exactly as ``torchvision.ops.nms`` decides it, for many classes (and
many images) in a few whole-array steps.

torchvision's CPU kernel visits one class's boxes by descending score (stable) and removes every
later box whose IoU with a kept one exceeds the threshold; it is called once per class. Here the
candidates of all classes (of all images) are grouped and every group runs the kernel's loop at
the same time, one kept candidate per group per round, with IoUs computed by the kernel's float32
operations in its order.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torchvision.ops import batched_nms

#: ``(images [P], flat [P]) -> (boxes float32 [P, 4], ok bool [P])``: the boxes of candidates
#: (``flat = roi * C + class`` of block image ``images[p]``) and whether each passes the size filter.
PairBoxFn = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def goes_per_class(num_boxes: int, device: torch.device) -> bool:
    """Whether torchvision 0.29's batched_nms would run one NMS per class (more than 4000 box
    coordinates on CPU, 20000 elsewhere) rather than one NMS over class-offset boxes; the two
    round IoUs differently, so mirroring its choice keeps results bit-identical."""
    return 4 * num_boxes > (4000 if device.type == "cpu" else 20000)


def float32_below(x: float) -> float:
    """The largest float32 <= ``x``: for any float32 ``v``, ``v > x`` (compared in double, as
    torchvision's kernel compares a float IoU with its double threshold) iff ``v > float32_below(x)``
    (compared in float32), so comparisons stay in float32."""
    f = float(np.float32(x))
    return f if f <= x else float(np.nextafter(np.float32(x), np.float32(-np.inf)))


def pair_overlaps(a: torch.Tensor, b: torch.Tensor, iou: float) -> torch.Tensor:
    """bool ``[P]``: IoU of float32 boxes ``a[p]`` (the better one) and ``b[p]`` (xyxy ``[P, 4]``)
    above ``iou``, with torchvision's nms kernel arithmetic: areas (x2-x1)*(y2-y1); inter =
    max(0, min x2 - max x1) * max(0, min y2 - max y1); inter / ((area_a + area_b) - inter) > iou."""
    ax1, ay1, ax2, ay2 = a.unbind(1)
    bx1, by1, bx2, by2 = b.unbind(1)
    w = torch.minimum(ax2, bx2).sub_(torch.maximum(ax1, bx1)).clamp_(min=0)
    h = torch.minimum(ay2, by2).sub_(torch.maximum(ay1, by1)).clamp_(min=0)
    inter = w.mul_(h)
    den = ((ax2 - ax1) * (ay2 - ay1)).add_((bx2 - bx1) * (by2 - by1)).sub_(inter)
    return inter.div_(den) > float32_below(iou)


def greedy_nms_sorted(group: torch.Tensor, boxes: torch.Tensor, iou: float) -> torch.Tensor:
    """bool ``[n]`` kept, for candidates sorted by ``group`` (int64 ``[n]``) and, inside a group,
    by priority (descending score, ties in torchvision's order); ``boxes`` float32 ``[n, 4]``.

    Every group advances together: each round keeps the best undecided candidate of every group
    and removes the group's undecided candidates that overlap it, exactly the kernel's loop. The
    work is about candidates x survivors per group, and there are as many rounds as the most
    survivors of any group.
    """
    kept = torch.zeros(group.shape[0], dtype=torch.bool, device=group.device)
    alive = torch.arange(group.shape[0], device=group.device)
    while alive.numel():
        g = group[alive]
        lead = torch.ones(alive.shape[0], dtype=torch.bool, device=group.device)
        lead[1:] = g[1:] != g[:-1]  # the best undecided candidate of each group
        first = alive[lead]
        kept[first] = True
        rest = alive[~lead]
        if not rest.numel():
            break
        owner = first[torch.searchsorted(group[first], group[rest])]
        alive = rest[~pair_overlaps(boxes[owner], boxes[rest], iou)]
    return kept


def per_class_nms(boxes: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor, iou: float) -> torch.Tensor:
    """Indices kept by ``torchvision.ops.nms`` run in each class, by descending score."""
    by_score = torch.argsort(scores, descending=True, stable=True)  # nms' order: score, then position
    order = by_score[torch.argsort(labels[by_score], stable=True)]
    kept = torch.sort(order[greedy_nms_sorted(labels[order], boxes[order].float(), iou)]).values
    return kept[scores[kept].sort(descending=True)[1]]


def nms_top(boxes: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor, iou: float, max_dets: int) -> torch.Tensor:
    """Indices of the ``max_dets`` best detections left by per-class NMS, by descending score.

    Same result as ``batched_nms(boxes, scores, labels + 1, iou)[:max_dets]`` (the ``+ 1`` is
    torchvision's label numbering, which its class-offset trick depends on), but faster for the
    tens of thousands of candidates a 0.0 score threshold leaves: a candidate's fate in greedy
    NMS depends only on higher-scoring candidates of its class, so NMS over the ``k`` best
    candidates decides those exactly; once ``max_dets`` of them survive, nothing outside them can
    enter the top ``max_dets`` (up to exact score ties at the cut), else ``k`` doubles.
    """
    n = scores.shape[0]
    if not goes_per_class(boxes.shape[0], boxes.device):
        return batched_nms(boxes, scores, labels + 1, iou)[:max_dets]
    k = min(n, 4 * max_dets)
    while True:
        top = torch.topk(scores, k, sorted=True).indices
        kept = top[per_class_nms(boxes[top], scores[top], labels[top], iou)]
        if kept.shape[0] >= max_dets or k == n:
            return kept[:max_dets]
        k = min(n, 2 * k)


def nms_top_many(flat: torch.Tensor, boxes: torch.Tensor | PairBoxFn, num_classes: int, n_valid: torch.Tensor,
                 iou: float, max_dets: int) -> list[torch.Tensor]:
    """:func:`nms_top` of several images at once.

    Args:
        flat: float32 ``[B, R*C]`` candidate scores, RoI-major (``-inf`` where not a candidate).
        boxes: float32 ``[B, R, 4]`` the RoIs' boxes (class-agnostic), or a :data:`PairBoxFn`
            giving each candidate's own box (class-specific): it is asked only for the candidates
            of the top-``k`` windows, and those it marks not ``ok`` are dropped before the NMS —
            exact, since dropping a candidate never changes the fate of a better-ranked one.
        n_valid: int64 ``[B]`` candidates per image (before any ``ok`` filter).
    Returns:
        per image, the kept flat indices (``roi * C + class``), by descending score.
    """
    out: list[torch.Tensor | None] = [None] * flat.shape[0]
    k = torch.clamp(n_valid, max=4 * max_dets)
    pending = torch.arange(flat.shape[0])
    while pending.numel():
        kp = k[pending]
        vals, idx = torch.topk(flat[pending], int(kp.max()), dim=1, sorted=True)
        take = torch.arange(vals.shape[1])[None, :] < kp[:, None]
        p, rank = torch.nonzero(take, as_tuple=True)
        f = idx[p, rank]
        if callable(boxes):
            b, ok = boxes(pending[p], f)
            p, rank, f, b = p[ok], rank[ok], f[ok], b[ok]  # still sorted by image, then rank
        else:
            b = boxes[pending[p], f // num_classes]
        group = p * num_classes + f % num_classes
        order = torch.argsort(group, stable=True)  # rows are in rank order: stays so inside a group
        kept = torch.zeros(order.shape[0], dtype=torch.bool)
        kept[order] = greedy_nms_sorted(group[order], b[order].float(), iou)
        survivors = torch.bincount(p[kept], minlength=pending.shape[0])
        done = (survivors >= max_dets) | (kp == n_valid[pending])
        starts = torch.searchsorted(p, torch.arange(pending.shape[0] + 1)).tolist()  # rows are contiguous
        for q in torch.nonzero(done).squeeze(1).tolist():
            mine = torch.nonzero(kept[starts[q]:starts[q + 1]]).squeeze(1) + starts[q]  # by rank, as nms_top
            mine = mine[vals[q, rank[mine]].sort(descending=True)[1]][:max_dets]
            out[int(pending[q])] = f[mine]
        k[pending[~done]] = torch.minimum(n_valid[pending[~done]], 2 * kp[~done])
        pending = pending[~done]
    return out  # type: ignore[return-value]

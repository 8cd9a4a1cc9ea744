"""LVIS evaluation from arrays: ``lvis.LVISEval``'s numbers without its per-(image, class) loops.

``LVISEval`` spends its time in Python: one IoU call, one greedy matching and one accumulation
step per (image, category[, area range]). Here the same rules run on whole arrays, and mask IoUs
come from pixel counts stored at extraction (``rois/mask_area``, ``rois/mask_inter``) instead of
RLEs pasted per evaluation. Every rule of lvis 0.5.3 is kept, so the precision array, and with it
every AP, equals LVISEval's (tested against it on random and real detections):

1. results: at most ``max_dets`` per image, highest scores first (``LVISResults``);
2. ground truth and detections with area <= 0 are left out (``LVIS.get_ann_ids``: area in
   (0, inf)); a detection counts only when its category is in the image's ground truth or in its
   ``neg_category_ids`` (federated evaluation);
3. per (image, category), detections by descending score (stable), each greedily matched at each
   IoU threshold t (``min(t, 1 - 1e-10)``) to the free ground truth of highest IoU >= t, preferring
   not-ignored ground truth, ties going to the later one (LVISEval's loop order); ground truth is
   ignored per area range when its ``ignore`` flag is set or its area lies outside the range;
4. a detection matched to ignored ground truth is ignored; an unmatched one is ignored when its
   area is outside the range or its category is in the image's ``not_exhaustive_category_ids``;
5. per (category, area range): detections of all images by descending score (ties: image id, then
   result order), cumulative TP/FP, precision made monotone from the right, read at the 101
   recall thresholds (0 beyond the last recall reached); -1 without not-ignored ground truth.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from lvis.eval import Params

from cache_schema.errors import ConfigError

IOU_CAP = 1 - 1e-10  # LVISEval: iou = min(t, 1 - 1e-10), so a perfect overlap matches at t = 1


@dataclass(frozen=True, kw_only=True)
class GtArrays:
    """Ground truth of the evaluated images, in LVIS's order (image id, then annotation order).

    Attributes:
        image_ids: int64 ``[I]`` evaluated json image ids, ascending; cat_ids: int64 ``[K]``
            json category ids, ascending (LVISEval's ``params``).
        image: int64 ``[G]`` index into ``image_ids``; cat: int64 ``[G]`` index into ``cat_ids``.
        area: float64 ``[G]`` json ``area``; ignore: bool ``[G]`` json ``ignore`` flag.
        bbox: float64 ``[G, 4]`` json xywh box.
        mask_area: int64 ``[G]`` pixels of the ground-truth RLE (segm), or None.
        slot: int64 ``[G]`` column of ``DetArrays.mask_inter`` holding this ground truth, or None.
        neg, not_exhaustive: int64 keys ``image * K + cat`` of the images' ``neg_category_ids`` and
            ``not_exhaustive_category_ids``.
        frequency: ``K`` LVIS frequency groups; instance_count: int64 ``[K]`` training instances.
    """

    image_ids: np.ndarray
    cat_ids: np.ndarray
    image: np.ndarray
    cat: np.ndarray
    area: np.ndarray
    ignore: np.ndarray
    bbox: np.ndarray
    neg: np.ndarray
    not_exhaustive: np.ndarray
    frequency: tuple[str, ...]
    instance_count: np.ndarray
    mask_area: np.ndarray | None = None
    slot: np.ndarray | None = None

    def __post_init__(self) -> None:
        g = self.image.shape[0]
        if any(a.shape[0] != g for a in (self.cat, self.area, self.ignore, self.bbox)):
            raise ConfigError("GtArrays: per-annotation columns differ in length")
        if (self.mask_area is None) != (self.slot is None):
            raise ConfigError("GtArrays: mask_area and slot come together (segm) or not at all (bbox)")


@dataclass(frozen=True, kw_only=True)
class DetArrays:
    """Detections in results order (what ``LVISResults`` would get as a list).

    Attributes:
        image: int64 ``[D]`` json image id; cat: int64 ``[D]`` json category id.
        score: float64 ``[D]``; bbox: float64 ``[D, 4]`` xywh, as in the results json.
        mask_area: int64 ``[D]`` pixels of each detection's mask, or None (bbox only).
        mask_inter: int ``[D, S]`` pixels its mask shares with the ground truth in each slot of its
            image (``GtArrays.slot``), or None.
    """

    image: np.ndarray
    cat: np.ndarray
    score: np.ndarray
    bbox: np.ndarray
    mask_area: np.ndarray | None = None
    mask_inter: np.ndarray | None = None

    def __post_init__(self) -> None:
        d = self.image.shape[0]
        cols = [self.cat, self.score, self.bbox] + [c for c in (self.mask_area, self.mask_inter) if c is not None]
        if any(c.shape[0] != d for c in cols):
            raise ConfigError("DetArrays: columns differ in length")

    def __len__(self) -> int:
        return int(self.image.shape[0])


@dataclass(frozen=True, kw_only=True)
class Evaluated:
    """LVISEval's accumulated precision ``[T, R, K, A]`` and the detections it counted."""

    precision: np.ndarray
    num_detections: int
    params: Params


def _limit_per_image(dets: DetArrays, keep_images: np.ndarray, max_dets: int) -> np.ndarray:
    """Rows kept: the evaluated images' detections, at most ``max_dets`` per image by score."""
    rows = np.flatnonzero(np.isin(dets.image, keep_images))
    order = rows[np.lexsort((rows, -dets.score[rows], dets.image[rows]))]
    img = dets.image[order]
    first = np.searchsorted(img, img, side="left")
    kept = order[(np.arange(len(order)) - first) < max_dets]
    return np.sort(kept)


def _bbox_iou(d: np.ndarray, g: np.ndarray) -> np.ndarray:
    """pycocotools' bbIou (not crowd) for paired xywh rows ``d``, ``g`` ``[..., 4]``."""
    w = np.minimum(d[..., 2] + d[..., 0], g[..., 2] + g[..., 0]) - np.maximum(d[..., 0], g[..., 0])
    h = np.minimum(d[..., 3] + d[..., 1], g[..., 3] + g[..., 1]) - np.maximum(d[..., 1], g[..., 1])
    inter = w * h
    union = d[..., 2] * d[..., 3] + g[..., 2] * g[..., 3] - inter
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where((w > 0) & (h > 0), inter / union, 0.0)


def _mask_iou(inter: np.ndarray, d_area: np.ndarray, g_area: np.ndarray) -> np.ndarray:
    """pycocotools' rleIou from pixel counts: intersection / union (0 when they do not meet)."""
    union = d_area + g_area - inter
    return np.where(inter > 0, inter / np.maximum(union, 1), 0.0)


def _match(ious: np.ndarray, det_group: np.ndarray, group_gt_ig: np.ndarray, thrs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Greedy matching of every (image, category) group at once.

    Args:
        ious: float64 ``[Dm, W]`` IoU of each detection with its group's ground truth (``-1`` past
            the group's count); rows sorted by group, then descending score.
        det_group: int64 ``[Dm]`` group of each row; group_gt_ig: bool ``[Gr, A, W]`` ignore flag
            of each ground-truth slot per area range (True for padding).
        thrs: float64 ``[T]`` effective IoU thresholds.
    Returns:
        (matched, matched to ignored ground truth), bool ``[Dm, A, T]``.
    """
    dm, w = ious.shape
    a, t = group_gt_ig.shape[1], thrs.shape[0]
    matched = np.zeros((dm, a, t), dtype=bool)
    to_ignored = np.zeros((dm, a, t), dtype=bool)
    if dm == 0:
        return matched, to_ignored
    starts = np.flatnonzero(np.r_[True, det_group[1:] != det_group[:-1]])
    counts = np.diff(np.r_[starts, dm])
    by_size = np.argsort(-counts, kind="stable")  # groups still active at rank k form a prefix
    starts, counts = starts[by_size], counts[by_size]
    gt_ig = torch.from_numpy(group_gt_ig[det_group[starts]])[:, :, None, :]  # [Gr, A, 1, W]
    taken = torch.zeros((len(starts), a, t, w), dtype=torch.bool)
    thr = torch.from_numpy(thrs)[None, None, :, None]
    iou_all = torch.from_numpy(ious)
    flip = torch.arange(w - 1, -1, -1)
    for k in range(int(counts[0])):
        n = int(np.searchsorted(-counts, -k, side="left"))  # groups with more than k detections
        rows = torch.from_numpy(starts[:n] + k)
        iou = iou_all[rows][:, None, None, :]  # [n, 1, 1, W]
        cand = ~taken[:n] & (iou >= thr)
        picks = []
        for want_ignored in (False, True):
            ok = cand & (gt_ig[:n] == want_ignored)
            score = torch.where(ok, iou, torch.tensor(-1.0, dtype=iou.dtype)).index_select(3, flip)
            picks.append((ok.any(3), (w - 1) - score.argmax(3)))  # last maximum, as LVISEval's loop
        (has_reg, m_reg), (has_ig, m_ig) = picks
        hit = has_reg | has_ig
        m = torch.where(has_reg, m_reg, m_ig)
        taken[:n].scatter_(3, m[..., None], hit[..., None] | taken[:n].gather(3, m[..., None]))
        matched[rows.numpy()] = hit.numpy()
        to_ignored[rows.numpy()] = (hit & ~has_reg).numpy()
    return matched, to_ignored


def _precision_of(tp: np.ndarray, fp: np.ndarray, num_gt: np.ndarray, rec_thrs: np.ndarray) -> np.ndarray:
    """float64 ``[A, T, R]`` precision of one category from its running TP / FP counts ``[A, T, n]``
    (descending-score order) and ``num_gt`` ``[A]`` (> 0) not-ignored ground truth."""
    n = tp.shape[-1]
    out = np.zeros((*tp.shape[:2], len(rec_thrs)))
    if n == 0:
        return out
    tp, fp = tp.astype(np.float64), fp.astype(np.float64)
    rc = tp / num_gt[:, None, None]
    pr = tp / (fp + tp + np.spacing(1))
    pr = np.maximum.accumulate(pr[..., ::-1], axis=-1)[..., ::-1]  # LVISEval's right-to-left max
    rows = rc.reshape(-1, n)
    thr = torch.from_numpy(rec_thrs).expand(rows.shape[0], -1).contiguous()
    idx = torch.searchsorted(torch.from_numpy(np.ascontiguousarray(rows)), thr, side="left").numpy()
    vals = np.take_along_axis(pr.reshape(-1, n), np.minimum(idx, n - 1), axis=1)
    return np.where(idx < n, vals, 0.0).reshape(out.shape)


def _accumulate(precision: np.ndarray, *, matched: np.ndarray, ignored: np.ndarray, cats: np.ndarray,
                num_gt: np.ndarray, present: np.ndarray, params: Params) -> None:
    """Fill ``precision`` ``[T, R, K, A]`` from the detections' flags ``[A*T, n]`` (bool,
    C-contiguous) and categories ``[n]`` in accumulation order (category, descending score,
    image, result order); ``num_gt`` ``[K, A]`` not-ignored ground truth; ``present`` ``[K]``:
    the category has detections or ground truth (LVISEval's non-empty ``E``)."""
    a, t = len(params.area_rng), len(params.iou_thrs)
    # Running TP / FP counts over all categories at once ([A, T, n]); a category's counts are its
    # slice minus the count before it (exact integers).
    tp_all = np.cumsum(matched & ~ignored, axis=1, dtype=np.int32).reshape(a, t, -1)
    fp_all = np.cumsum(~matched & ~ignored, axis=1, dtype=np.int32).reshape(a, t, -1)
    ids, starts, counts = np.unique(cats, return_index=True, return_counts=True)
    seg = {int(c): (int(st), int(n)) for c, st, n in zip(ids, starts, counts)}
    for k in np.flatnonzero(present & (num_gt > 0).any(axis=1)):
        st, n = seg.get(int(k), (0, 0))
        areas = np.flatnonzero(num_gt[k] > 0)
        tp, fp = tp_all[areas, :, st:st + n], fp_all[areas, :, st:st + n]
        if st:
            tp, fp = tp - tp_all[areas, :, st - 1:st], fp - fp_all[areas, :, st - 1:st]
        prec = _precision_of(tp, fp, num_gt[k, areas], params.rec_thrs)
        precision[:, :, k, areas] = np.moveaxis(prec, 0, -1)  # [A', T, R] -> [T, R, A']


def evaluate_arrays(*, gt: GtArrays, dets: DetArrays, iou_type: str, max_dets: int = 300) -> Evaluated:
    """LVISEval's ``evaluate`` + ``accumulate`` for ``iou_type`` (``segm`` or ``bbox``)."""
    params = Params(iou_type=iou_type)
    if iou_type == "segm" and (gt.mask_area is None or dets.mask_area is None or dets.mask_inter is None):
        raise ConfigError("segm evaluation from arrays needs mask areas and intersections; evaluate bbox or use the LVIS API")
    kn = len(gt.cat_ids)
    t, r, a = len(params.iou_thrs), len(params.rec_thrs), len(params.area_rng)
    precision = -np.ones((t, r, kn, a))
    # 1. results as LVISResults keeps them
    kept = _limit_per_image(dets, gt.image_ids, max_dets)
    d_img = np.searchsorted(gt.image_ids, dets.image[kept])
    d_cat = np.searchsorted(gt.cat_ids, dets.cat[kept])
    if len(kept) and (d_cat.max() >= kn or np.any(gt.cat_ids[d_cat] != dets.cat[kept])):
        raise ConfigError("a detection's category_id is not in the annotation file; map labels to json ids")
    score = dets.score[kept]
    bbox = dets.bbox[kept]
    d_area = dets.mask_area[kept].astype(np.float64) if iou_type == "segm" else bbox[:, 2] * bbox[:, 3]
    # 2. area filter on both sides; federated filter on detections
    g_ok = (gt.area > 0) & (gt.area < np.inf)
    g_rows = np.flatnonzero(g_ok)
    g_key = gt.image[g_rows] * kn + gt.cat[g_rows]
    d_key = d_img * kn + d_cat
    d_ok = (d_area > 0) & (d_area < np.inf) & np.isin(d_key, np.union1d(g_key, gt.neg))
    rows = np.flatnonzero(d_ok)
    order = rows[np.lexsort((kept[rows], -score[rows], d_key[rows]))]  # group, score, result order
    # 3. IoUs of each detection with its group's ground truth
    g_order = g_rows[np.argsort(g_key, kind="stable")]
    gk = gt.image[g_order] * kn + gt.cat[g_order]
    groups, g_start, g_count = np.unique(gk, return_index=True, return_counts=True)
    width = int(g_count.max()) if len(g_count) else 0
    dk = d_key[order]
    gi = np.searchsorted(groups, dk)
    has_gt = (gi < len(groups)) & (groups[np.minimum(gi, len(groups) - 1)] == dk) if len(groups) else np.zeros(len(dk), bool)
    mrows, mg = order[has_gt], gi[has_gt]
    slots = np.arange(width)
    real = slots[None, :] < g_count[mg][:, None]
    g_idx = g_order[np.minimum(g_start[mg][:, None] + slots[None, :], len(g_order) - 1)]  # [Dm, W]
    if iou_type == "segm":
        inter = np.take_along_axis(dets.mask_inter[kept[mrows]], np.maximum(gt.slot[g_idx], 0), axis=1).astype(np.float64)
        ious = _mask_iou(inter, d_area[mrows][:, None], gt.mask_area[g_idx].astype(np.float64))
    else:
        ious = _bbox_iou(bbox[mrows][:, None, :], gt.bbox[g_idx])
    ious = np.where(real, ious, -1.0)
    # 4. greedy matching per area range and threshold; ignore flags
    lo = np.array([rng[0] for rng in params.area_rng], dtype=np.float64)
    hi = np.array([rng[1] for rng in params.area_rng], dtype=np.float64)
    gt_ig_all = gt.ignore[:, None] | (gt.area[:, None] < lo) | (gt.area[:, None] > hi)  # [G, A]
    group_ig = np.ones((len(groups), a, width), dtype=bool)
    gi_rows, gi_slots = np.nonzero(np.arange(width)[None, :] < g_count[:, None])
    group_ig[gi_rows, :, gi_slots] = gt_ig_all[g_order[g_start[gi_rows] + gi_slots]]
    thrs = np.minimum(params.iou_thrs, IOU_CAP)
    m_match, m_ig = _match(ious, mg, group_ig, thrs)
    # Per-detection flags as [A*T, D] rows (area-major), the layout accumulation reads.
    matched = np.zeros((a * t, len(kept)), dtype=bool)
    to_ig = np.zeros((a * t, len(kept)), dtype=bool)
    matched[:, mrows], to_ig[:, mrows] = m_match.reshape(-1, a * t).T, m_ig.reshape(-1, a * t).T
    out_of_range = (d_area[None, :] < lo[:, None]) | (d_area[None, :] > hi[:, None])  # [A, D]
    not_exh = np.isin(d_key, gt.not_exhaustive)
    ignored = to_ig | (~matched & np.repeat(out_of_range | not_exh[None, :], t, axis=0))
    # 5. accumulate per category over all images
    num_gt = np.zeros((kn, a), dtype=np.int64)
    np.add.at(num_gt, gt.cat[g_rows], ~gt_ig_all[g_rows])
    acc = rows[np.lexsort((kept[rows], d_img[rows], -score[rows], d_cat[rows]))]
    present = np.zeros(kn, dtype=bool)
    present[d_cat[acc]] = True
    present[gt.cat[g_rows]] = True
    _accumulate(precision, matched=np.take(matched, acc, axis=1), ignored=np.take(ignored, acc, axis=1),
                cats=d_cat[acc], num_gt=num_gt, present=present, params=params)
    return Evaluated(precision=precision, num_detections=int(len(kept)), params=params)

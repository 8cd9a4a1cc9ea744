"""Detection assembly equals torchvision's postprocess_detections; mask reuse is exact; det merge."""

from __future__ import annotations

import numpy as np
import pycocotools.mask as mask_utils
import pytest
import torch
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.roi_heads import RoIHeads, paste_masks_in_image
from torchvision.ops import MultiScaleRoIAlign

from cache_schema.errors import ConfigError
from cache_schema.masks import gt_rle, mask_overlaps
from heads.evaluation.masks import encode_masks, paste_and_encode, paste_roi_masks
from heads.evaluation.detections import (
    Detections,
    assemble_detection_arrays,
    assemble_detections,
    masks_of,
    merge_det,
    select_detections,
)

H, W = 64, 80


def tv_roi_heads(*, score_thresh: float, nms: float, dets: int, num_classes: int) -> RoIHeads:
    """A real (tiny) torchvision RoIHeads with the given test-time settings."""
    return RoIHeads(
        box_roi_pool=MultiScaleRoIAlign(["0"], 7, 2), box_head=TwoMLPHead(4 * 49, 8),
        box_predictor=FastRCNNPredictor(8, num_classes + 1), fg_iou_thresh=0.5, bg_iou_thresh=0.5,
        batch_size_per_image=64, positive_fraction=0.25, bbox_reg_weights=None,
        score_thresh=score_thresh, nms_thresh=nms, detections_per_img=dets,
    )


def random_case(seed: int, r: int = 60, c: int = 7, clustered: bool = False):
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(r, 2, generator=g) * torch.tensor([W, H]) - 5  # some start outside the image
    wh = torch.rand(r, 2, generator=g) * 40 + 2
    if clustered:  # jittered copies of 3 boxes, as real proposals crowd objects: NMS removes most
        xy = torch.tensor([[5.0, 5.0], [30.0, 20.0], [50.0, 35.0]])[torch.arange(r) % 3] + torch.rand(r, 2, generator=g) * 2
        wh = torch.full((r, 2), 20.0) + torch.rand(r, 2, generator=g) * 2
    proposals = torch.cat([xy, xy + wh], 1)
    proposals[:3, 2] = proposals[:3, 0] + 1e-3  # degenerate after clipping: must be removed
    deltas = torch.randn(r, 4, generator=g) * 0.2
    logits = torch.randn(r, c + 1, generator=g) * 3  # torchvision order: background first
    return proposals, deltas, logits


# (seed, RoIs, classes, score_thresh, nms, max_dets): <= 1000 candidates take batched_nms'
# class-offset path, more take the per-class path and our top-k shortcut (grows k when needed).
# Clustered proposals leave fewer survivors than the first top-k, so k has to grow.
CASES = [(0, 60, 7, 0.0, 0.5, 300, False), (1, 60, 7, 0.05, 0.5, 25, False), (2, 60, 7, 0.0, 0.3, 40, False),
         (3, 300, 20, 0.0, 0.5, 300, False), (4, 300, 20, 0.0, 0.5, 50, False), (5, 200, 30, 0.0, 0.7, 1000, False),
         (6, 300, 20, 0.0, 0.5, 100, True)]


@pytest.mark.parametrize("seed,r,c,score_thresh,nms,max_dets,clustered", CASES)
def test_matches_torchvision_postprocess(seed, r, c, score_thresh, nms, max_dets, clustered):
    proposals, deltas, logits = random_case(seed, r=r, c=c, clustered=clustered)
    if clustered:
        deltas = deltas * 0.1
    heads = tv_roi_heads(score_thresh=score_thresh, nms=nms, dets=max_dets, num_classes=c)
    # Class-agnostic regression: the same 4 deltas for every class.
    tv_boxes, tv_scores, tv_labels = heads.postprocess_detections(logits, deltas.repeat(1, c + 1), [proposals], [(H, W)])
    reg_boxes = heads.box_coder.decode(deltas, [proposals])[:, 0]
    fg = torch.softmax(logits, -1)[:, 1:]  # = our [classes, background] layout with bg dropped
    ours = assemble_detection_arrays(scores=fg, boxes=reg_boxes, image_size=(H, W), score_thresh=score_thresh,
                                     nms_iou=nms, max_dets=max_dets)
    assert len(ours) == tv_scores[0].shape[0] > 0
    assert torch.equal(ours.labels + 1, tv_labels[0])
    assert torch.equal(ours.scores, tv_scores[0])
    assert torch.equal(ours.boxes, tv_boxes[0])
    assert not (ours.roi_index < 3).any()  # degenerate RoIs removed
    assert torch.all(ours.scores[:-1] >= ours.scores[1:])


@pytest.mark.parametrize("m", [8, 28])
def test_fast_paste_is_pixel_identical_to_torchvision(m):
    g = torch.Generator().manual_seed(m)
    k = 50
    # Boxes that overlap the image, some partly outside it (torchvision cannot paste disjoint ones).
    xy = torch.rand(k, 2, generator=g) * torch.tensor([W + 6.0, H + 6.0]) - 8
    boxes = torch.cat([xy, xy + torch.rand(k, 2, generator=g) * 50 + 10], 1)
    boxes[:2] = torch.tensor([[W - 0.5, H - 0.5, W + 5.0, H + 5.0], [0.0, 0.0, 0.3, 0.3]])
    logits = (torch.randn(k, m, m, generator=g) * 3).half()
    # Entirely outside the image (never after clipping): torchvision fails, ours gives an empty mask.
    outside = paste_roi_masks(mask_logits=torch.full((1, m, m), 9.0), boxes=torch.tensor([[-20.0, -20, -12, -11]]),
                              image_size=(H, W))
    assert outside.shape == (1, H, W) and not outside.any()
    ref = paste_masks_in_image(torch.sigmoid(logits.float())[:, None], boxes, (H, W))[:, 0] > 0.5
    ours = paste_roi_masks(mask_logits=logits, boxes=boxes, image_size=(H, W))
    assert ours.dtype == torch.bool and ours.shape == (k, H, W)
    assert torch.equal(ours, ref) and ref.any()
    assert paste_and_encode(mask_logits=logits, boxes=boxes, image_size=(H, W)) == encode_masks(ref)
    assert paste_and_encode(mask_logits=logits[:0], boxes=boxes[:0], image_size=(H, W)) == []


def test_mask_overlaps_give_the_iou_of_the_pasted_rles():
    g = torch.Generator().manual_seed(3)
    k = 40
    xy = torch.rand(k, 2, generator=g) * torch.tensor([W - 10.0, H - 10.0])
    boxes = torch.cat([xy, xy + torch.rand(k, 2, generator=g) * 40 + 2], 1)
    logits = (torch.randn(k, 28, 28, generator=g) * 3).half()
    logits[0] = -9.0  # an empty mask
    polys = [[[5.0, 5.0, 40.0, 8.0, 30.0, 35.0]], [[0.0, 0.0, W, 0.0, W, 12.0, 0.0, 12.0], [10.0, 20.0, 20.0, 20.0, 15.0, 30.0]]]
    gt = [gt_rle(p, H, W) for p in polys] + [gt_rle({"size": [H, W], "counts": [H * 3, H * 2, H * (W - 5)]}, H, W)]
    area, inter = mask_overlaps(mask_logits=logits, boxes=boxes, image_size=(H, W), gt_rles=gt)
    rles = paste_and_encode(mask_logits=logits, boxes=boxes, image_size=(H, W))
    assert area.tolist() == [int(a) for a in mask_utils.area(rles)] and area.min() == 0 < area.max()
    union = area[:, None] + mask_utils.area(gt)[None, :].astype(np.int64) - inter
    ours = np.where(inter > 0, inter / np.maximum(union, 1), 0.0)
    assert inter.max() > 0 and np.array_equal(ours, mask_utils.iou(rles, gt, [0] * len(gt)))  # exact, not close


@pytest.mark.parametrize("iou", [0.3, 0.5, 0.7])
def test_shared_iou_nms_equals_torchvision_nms_per_class(iou):
    from torchvision.ops import nms

    from heads.evaluation.nms import per_class_nms

    g = torch.Generator().manual_seed(int(iou * 10))
    for _ in range(20):
        r, n = 80, 600
        centre = torch.rand(6, 2, generator=g) * 60
        xy = centre[torch.randint(0, 6, (r,), generator=g)] + torch.rand(r, 2, generator=g) * 6
        boxes = torch.cat([xy, xy + 15 + torch.rand(r, 2, generator=g) * 6], 1)
        boxes[::7] = boxes[1::7][: boxes[::7].shape[0]]  # exact duplicates: IoU 1
        rois = torch.randint(0, r, (n,), generator=g)
        labels = torch.randint(0, 5, (n,), generator=g)
        scores = torch.round(torch.rand(n, generator=g) * 20) / 20  # many exact ties
        keep = torch.zeros(n, dtype=torch.bool)
        for c in labels.unique():
            members = torch.nonzero(labels == c).squeeze(1)
            keep[members[nms(boxes[rois[members]], scores[members], iou)]] = True
        ref = torch.nonzero(keep).squeeze(1)
        ref = ref[scores[ref].sort(descending=True)[1]]
        ours = per_class_nms(boxes[rois], scores, labels, iou)
        assert torch.equal(ours, ref)


@pytest.mark.parametrize("threshold", [0.5, 0.7, 0.3, 0.65, 0.1 + 0.2])
def test_float32_threshold_compares_like_torchvision_double(threshold):
    import numpy as np

    from heads.evaluation.nms import float32_below

    t = np.float32(threshold)
    near = np.array([np.nextafter(t, np.float32(-1)), t, np.nextafter(t, np.float32(2))], dtype=np.float32)
    values = np.concatenate([near, np.random.default_rng(0).random(1000, dtype=np.float32)])
    assert np.array_equal(values > np.float32(float32_below(threshold)), values.astype(np.float64) > threshold)


def test_many_images_at_once_equal_one_by_one():
    from heads.evaluation.detections import select_detections_many

    cases = [random_case(seed, r=r, c=20, clustered=cl) for seed, r, cl in
             [(10, 300, False), (11, 40, False), (12, 300, True), (13, 150, False), (14, 5, False)]]
    sizes = [(H, W), (H - 7, W), (H, W - 11), (H, W), (H, W)]
    scores = [torch.softmax(logits, -1)[:, 1:] for _, _, logits in cases]
    boxes = [p + d * 5 for p, d, _ in cases]
    for max_dets in (300, 40):
        many = select_detections_many(scores=scores, boxes=boxes, image_sizes=sizes, max_dets=max_dets, stream=1)
        for s, b, size, got in zip(scores, boxes, sizes, many):
            one = select_detections(scores=s, boxes=b, image_size=size, max_dets=max_dets, stream=1)
            for f in ("roi_index", "labels", "scores", "boxes", "stream"):
                assert torch.equal(getattr(got, f), getattr(one, f)), f
        assert len(many[1]) == min(max_dets, 40 * 20 - 3 * 20) and len(many[0]) == max_dets  # both NMS paths ran


def test_zero_scores_dropped_like_torchvision():
    scores = torch.tensor([[0.0, 0.4], [0.0, 0.0]])
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [20.0, 20.0, 30.0, 30.0]])
    d = select_detections(scores=scores, boxes=boxes, image_size=(H, W))
    assert d.labels.tolist() == [1] and d.roi_index.tolist() == [0] and d.scores.tolist() == pytest.approx([0.4])


def test_mask_reuse_equals_per_detection_pasting():
    c = 5
    proposals, deltas, logits = random_case(3, r=40, c=c)
    boxes = tv_roi_heads(score_thresh=0.0, nms=0.5, dets=100, num_classes=c).box_coder.decode(deltas, [proposals])[:, 0]
    mask_logits = (torch.randn(40, 14, 14, generator=torch.Generator().manual_seed(4)) * 4).half()
    fg = torch.softmax(logits, -1)[:, 1:]
    results = assemble_detections(scores=fg, boxes=boxes, mask_logits=mask_logits, image_size=(H, W), image_id=9,
                                  category_ids=[10, 20, 30, 40, 50], max_dets=100)
    dets = assemble_detection_arrays(scores=fg, boxes=boxes, image_size=(H, W), max_dets=100)
    assert len(results) == len(dets) == 100
    assert len(set(dets.roi_index.tolist())) < len(dets)  # several detections share a RoI: reuse is exercised
    per_det = masks_of(dets=dets, mask_logits=mask_logits, reg_boxes=boxes, image_size=(H, W))
    for k, r in enumerate(results):
        # Reference: paste this detection's own mask into its own box, as a per-detection pipeline would.
        prob = torch.sigmoid(mask_logits[dets.roi_index[k]].float())[None, None]
        ref = paste_masks_in_image(prob, dets.boxes[k][None], (H, W))[0, 0] > 0.5
        rle = mask_utils.encode(ref.numpy().astype("uint8", order="F"))
        assert r["segmentation"]["counts"] == rle["counts"].decode() and r["segmentation"]["size"] == [H, W]
        assert torch.equal(per_det[k], ref)
        x1, y1, x2, y2 = dets.boxes[k].double().tolist()
        assert r["bbox"] == pytest.approx([x1, y1, x2 - x1, y2 - y1])
        assert r["category_id"] == [10, 20, 30, 40, 50][int(dets.labels[k])] and r["image_id"] == 9
        assert r["score"] == pytest.approx(float(dets.scores[k]))


def _dets(boxes, labels, scores, stream):
    n = len(scores)
    return Detections(roi_index=torch.arange(n), labels=torch.tensor(labels), scores=torch.tensor(scores),
                      boxes=torch.tensor(boxes, dtype=torch.float32), stream=torch.full((n,), stream))


def test_merge_det_hand_case():
    a = [0.0, 0.0, 10.0, 10.0]
    a_shift = [0.0, 1.0, 10.0, 11.0]  # IoU 90/110 = 0.82 with a
    far = [40.0, 40.0, 50.0, 50.0]
    orig = _dets([a, far], [0, 2], [0.9, 0.3], 0)
    cal = _dets([a_shift, a_shift, far], [0, 1, 2], [0.7, 0.6, 0.8], 1)
    m = merge_det(dets=[orig, cal], nms_iou=0.5, max_dets=300)
    # class 0: orig 0.9 suppresses cal 0.7; class 1: only cal; class 2: cal 0.8 suppresses orig 0.3.
    assert m.scores.tolist() == pytest.approx([0.9, 0.8, 0.6])
    assert m.labels.tolist() == [0, 2, 1] and m.stream.tolist() == [0, 1, 1]
    assert len(merge_det(dets=[orig, cal], max_dets=2)) == 2
    same = merge_det(dets=[orig, orig])
    assert same.scores.tolist() == pytest.approx([0.9, 0.3])


def test_streams_merge_through_assembly():
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [30.0, 30.0, 45.0, 40.0]])
    s_orig = torch.tensor([[0.9, 0.0], [0.0, 0.1]])
    s_cal = torch.tensor([[0.5, 0.0], [0.0, 0.7]])
    d = assemble_detection_arrays(scores=(s_orig, s_cal), boxes=boxes, image_size=(H, W))
    # Same RoI+class in both streams: NMS keeps the higher score once.
    assert d.scores.tolist() == pytest.approx([0.9, 0.7]) and d.stream.tolist() == [0, 1]
    assert d.roi_index.tolist() == [0, 1]


def test_bad_inputs():
    with pytest.raises(ConfigError):
        select_detections(scores=torch.zeros(3, 2), boxes=torch.zeros(2, 4), image_size=(H, W))
    with pytest.raises(ConfigError):
        assemble_detections(scores=torch.ones(1, 2) * 0.5, boxes=torch.tensor([[0.0, 0.0, 5.0, 5.0]]), mask_logits=None,
                            image_size=(H, W), image_id=1, category_ids=[3])
    with pytest.raises(ConfigError):
        assemble_detections(scores=torch.ones(1, 2) * 0.5, boxes=torch.tensor([[0.0, 0.0, 5.0, 5.0]]),
                            mask_logits=torch.zeros(2, 4, 4), image_size=(H, W), image_id=1, category_ids=[3, 4])

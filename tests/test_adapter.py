"""The torchvision extraction adapter reproduces the detector's own inference from its RoI outputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torchvision.models.detection.roi_heads import paste_masks_in_image
from torchvision.ops import box_iou
from torchvision.ops import boxes as box_ops

from cache_schema.errors import CheckpointError, ConfigError
from extract.detectors.adapter import TorchvisionAdapter
from extract.detectors.base import DetectorAdapter, RoiOutputs
from extract.detectors.toy import ToyShapes, tiny_arch
from extract.detectors.train import run_training
from extract.detectors.train_config import DetectorTrainConfig


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    """A tiny detector trained for 20 steps (so scores are far from uniform), loaded as an adapter."""
    data = ToyShapes(num_images=8, seed=0)
    config = DetectorTrainConfig(
        max_steps=20, warmup_steps=4, processes=1, threads_per_process=1, checkpoint_every=20, time_budget_s=None
    )
    path = run_training(
        dataset=data, categories=data.categories, out_dir=tmp_path_factory.mktemp("det"), config=config,
        arch=tiny_arch(), progress=False,
    )
    return TorchvisionAdapter.from_checkpoint(path, device="cpu")


@pytest.fixture(scope="module")
def images():
    data = ToyShapes(num_images=3, seed=21)
    return [data.image_uint8(i) for i in range(3)], [data.items[i][1]["boxes"] for i in range(3)]


def _reference_detections(out: RoiOutputs, *, num_classes: int, score_thresh: float, nms: float, top: int):
    """torchvision's postprocess re-done on cached outputs: softmax, per-class NMS, top-k."""
    scores = torch.softmax(torch.from_numpy(out.logits), -1)[:, :num_classes]  # background is last
    r = scores.shape[0]
    boxes = torch.from_numpy(out.reg_boxes)[:, None].expand(r, num_classes, 4).reshape(-1, 4)
    labels = torch.arange(num_classes).repeat(r)
    roi = torch.arange(r).repeat_interleave(num_classes)
    scores = scores.reshape(-1)
    keep = torch.where(scores > score_thresh)[0]
    keep = keep[box_ops.remove_small_boxes(boxes[keep], 1e-2)]
    keep = keep[box_ops.batched_nms(boxes[keep], scores[keep], labels[keep], nms)][:top]
    return boxes[keep], scores[keep], labels[keep], roi[keep]


def test_protocol_and_describe(adapter):
    assert isinstance(adapter, DetectorAdapter)
    assert adapter.num_classes == 3 and adapter.mask_size == 28
    assert adapter.levels == {"fc": (32,), "pooled": (16, 7, 7)}
    info = adapter.describe()
    assert info["backend"] == "torchvision" and len(info["checkpoint_sha256"]) == 64
    assert info["arch"] == tiny_arch().to_dict()
    assert info["feature_levels"] == {"fc": [32], "pooled": [16, 7, 7]}


def test_outputs_reproduce_the_models_own_detections(adapter, images):
    imgs, _ = images
    arch = adapter.arch
    outs = adapter.run(imgs, gt_boxes=None, levels=("fc", "pooled"), max_proposals=arch.rpn_post_nms_top_n_test,
                       with_masks=True)
    with torch.no_grad():
        dets = adapter.model([torch.from_numpy(im).permute(2, 0, 1).float() / 255.0 for im in imgs])
    for out, det, img in zip(outs, dets, imgs):
        assert len(out) == arch.rpn_post_nms_top_n_test and not out.is_gt.any()
        assert np.all(np.diff(out.objectness) <= 0)  # highest objectness first
        boxes, scores, labels, roi = _reference_detections(
            out, num_classes=3, score_thresh=arch.box_score_thresh, nms=arch.box_nms_thresh,
            top=arch.box_detections_per_img,
        )
        assert len(det["boxes"]) == len(boxes) > 10
        torch.testing.assert_close(boxes, det["boxes"], atol=1e-5, rtol=0)
        torch.testing.assert_close(scores, det["scores"], atol=1e-5, rtol=0)
        assert torch.equal(labels + 1, det["labels"])  # torchvision labels are 1..C
        assert det["scores"][0] - det["scores"][-1] > 1e-3  # distinct scores, so the order is a real test
        # Masks: the mask logits on the RoI's regressed box, pasted, are the model's masks.
        pasted = paste_masks_in_image(torch.sigmoid(torch.from_numpy(out.mask_logits)[roi])[:, None], boxes,
                                      img.shape[:2])
        torch.testing.assert_close(pasted, det["masks"], atol=1e-5, rtol=0)


def test_shapes_dtypes_and_gt_rows(adapter, images):
    imgs, gts = images
    outs = adapter.run(imgs, gt_boxes=gts, levels=("fc", "pooled"), max_proposals=20, with_masks=True)
    plain = adapter.run(imgs, gt_boxes=None, levels=("fc", "pooled"), max_proposals=20, with_masks=True)
    for out, ref, gt in zip(outs, plain, gts):
        g = len(gt)
        assert g > 0 and len(out) == 20 + g
        assert out.boxes.dtype == np.float32 and out.boxes.shape == (20 + g, 4)
        assert out.logits.shape == (20 + g, 4) and out.logits.dtype == np.float32
        assert out.features["fc"].shape == (20 + g, 32) and out.features["pooled"].shape == (20 + g, 16, 7, 7)
        assert out.mask_logits.shape == (20 + g, 28, 28) and out.mask_logits.dtype == np.float32
        assert out.is_gt.dtype == np.bool_ and out.is_gt.tolist() == [False] * 20 + [True] * g
        assert np.isposinf(out.objectness[20:]).all() and np.isfinite(out.objectness[:20]).all()
        iou = box_iou(torch.from_numpy(out.boxes[20:]), torch.from_numpy(gt)).diagonal()
        torch.testing.assert_close(iou, torch.ones(g))
        assert (out.features["fc"] >= 0).all()  # after fc7 + ReLU
        r = out.reg_boxes
        assert (r[:, 0] >= 0).all() and (r[:, 2] <= 64).all() and (r[:, 0] <= r[:, 2]).all()
        # Appending GT leaves the proposals' rows unchanged.
        for name in ("boxes", "objectness", "logits", "reg_boxes", "mask_logits"):
            np.testing.assert_allclose(getattr(out, name)[:20], getattr(ref, name), atol=1e-5)
        np.testing.assert_allclose(out.features["fc"][:20], ref.features["fc"], atol=1e-5)


def test_gt_row_equals_the_same_box_as_a_proposal(adapter, images):
    imgs, _ = images
    ref = adapter.run(imgs[:1], gt_boxes=None, levels=("fc",), max_proposals=10, with_masks=False)[0]
    again = adapter.run(imgs[:1], gt_boxes=[ref.boxes[3:5].copy()], levels=("fc",), max_proposals=10,
                        with_masks=False)[0]
    np.testing.assert_allclose(again.features["fc"][10:], ref.features["fc"][3:5], atol=1e-5)
    np.testing.assert_allclose(again.logits[10:], ref.logits[3:5], atol=1e-5)
    np.testing.assert_allclose(again.reg_boxes[10:], ref.reg_boxes[3:5], atol=1e-4)


def test_deterministic_and_batch_independent(adapter, images):
    imgs, gts = images
    kwargs = dict(levels=("fc",), max_proposals=30, with_masks=True)
    a = adapter.run(imgs, gt_boxes=gts, **kwargs)
    b = adapter.run(imgs, gt_boxes=gts, **kwargs)
    singles = [adapter.run([im], gt_boxes=[g], **kwargs)[0] for im, g in zip(imgs, gts)]
    for x, y, s in zip(a, b, singles):
        assert np.array_equal(x.logits, y.logits) and np.array_equal(x.mask_logits, y.mask_logits)
        np.testing.assert_allclose(x.logits, s.logits, atol=1e-4)
        np.testing.assert_allclose(x.reg_boxes, s.reg_boxes, atol=1e-3)


def test_resized_image_boxes_come_back_in_original_pixels(adapter):
    data = ToyShapes(num_images=1, size=128, seed=4)  # resized 128 -> 64 inside the model
    image, target = data.image_uint8(0), data.items[0][1]
    top_n = adapter.arch.rpn_post_nms_top_n_test
    out = adapter.run([image, image[:, :96].copy()], gt_boxes=[target["boxes"], np.zeros((0, 4), np.float32)],
                      levels=("fc",), max_proposals=top_n, with_masks=False)
    assert np.array_equal(out[0].boxes[top_n:], target["boxes"])  # GT rows exactly as given
    assert out[0].reg_boxes[:, 2:].max() <= 128 and out[0].reg_boxes[:, 2:].max() > 64
    assert out[1].reg_boxes[:, 2].max() <= 96 and out[1].reg_boxes[:, 3].max() > 64 and len(out[1]) == top_n
    with torch.no_grad():
        det = adapter.model([torch.from_numpy(image).permute(2, 0, 1).float() / 255.0])[0]
    proposals_only = RoiOutputs(
        boxes=out[0].boxes[:top_n], objectness=out[0].objectness[:top_n], is_gt=out[0].is_gt[:top_n],
        logits=out[0].logits[:top_n], reg_boxes=out[0].reg_boxes[:top_n],
    )
    boxes, scores, labels, _ = _reference_detections(proposals_only, num_classes=3, score_thresh=0.0, nms=0.5,
                                                     top=adapter.arch.box_detections_per_img)
    # The model does NMS in resized pixels, we in original ones (x2 here, same IoU): same detections.
    torch.testing.assert_close(scores, det["scores"], atol=1e-5, rtol=0)
    torch.testing.assert_close(boxes, det["boxes"], atol=1e-4, rtol=0)
    assert torch.equal(labels + 1, det["labels"])


def test_bad_inputs_are_one_line_errors(adapter, images, tmp_path):
    imgs, _ = images
    bad_calls = [
        dict(images=[], gt_boxes=None),
        dict(images=[imgs[0].astype(np.float32)], gt_boxes=None),
        dict(images=[imgs[0][:, :, :2]], gt_boxes=None),
        dict(images=imgs[:2], gt_boxes=[np.zeros((0, 4), np.float32)]),
        dict(images=imgs[:1], gt_boxes=[np.full((1, 4), np.nan, np.float32)]),
        dict(images=imgs[:1], gt_boxes=None, levels=("conv5",)),
        dict(images=imgs[:1], gt_boxes=None, max_proposals=0),
    ]
    for call in bad_calls:
        kwargs = {"levels": ("fc",), "max_proposals": 10, "with_masks": False, **call}
        with pytest.raises(ConfigError) as info:
            adapter.run(kwargs.pop("images"), **kwargs)
        assert "\n" not in str(info.value)
    with pytest.raises(CheckpointError):
        TorchvisionAdapter.from_checkpoint(tmp_path / "missing.pt")

"""The mmcv-lite stand-in ops (extract.detectors.mmcv_ops), exercised through mmcv's own wrappers.

Skipped when mmdet / mmcv / mmengine are not installed. With a real compiled ``mmcv._ext`` the
stand-in is not installed and the stand-in-specific tests skip; the rest still run.
"""

from __future__ import annotations

import logging
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("mmdet")
pytest.importorskip("mmengine")
pytest.importorskip("mmcv")
torchvision_ops = pytest.importorskip("torchvision.ops")

from cache_schema.errors import CheckpointError  # noqa: E402
from extract.detectors.mmcv_ops import install_standin_ops, standin_active  # noqa: E402

STANDIN = install_standin_ops()  # before anything imports mmcv.ops

import mmcv.ops  # noqa: E402

from tests.mmdet_fixtures import (  # noqa: E402
    save_mmdet_checkpoint,
    tiny_images,
    tiny_mmdet_config,
)

needs_standin = pytest.mark.skipif(not STANDIN, reason="a real compiled mmcv._ext is installed")


def _features_and_rois(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 ``[2, 3, 24, 32]`` features and ``[9, 5]`` rois ``(batch, x1, y1, x2, y2)`` in
    image pixels (stride up to 8), including tiny, degenerate and partly outside boxes."""
    gen = torch.Generator().manual_seed(seed)
    features = torch.randn(2, 3, 24, 32, generator=gen)
    xy = torch.rand(6, 2, generator=gen) * torch.tensor([200.0, 150.0])
    wh = torch.rand(6, 2, generator=gen) * 120 + 0.5
    boxes = torch.cat([xy, xy + wh], 1)
    extra = torch.tensor([[10.0, 10.0, 10.0, 10.0], [-20.0, -5.0, 30.0, 40.0],
                          [250.0, 180.0, 300.0, 260.0]])  # zero-size, partly and fully outside
    boxes = torch.cat([boxes, extra])
    batch = torch.tensor([0, 1, 0, 1, 1, 0, 0, 1, 1], dtype=torch.float32)[:, None]
    return features, torch.cat([batch, boxes], 1)


@pytest.mark.parametrize("aligned", [True, False])
@pytest.mark.parametrize("sampling_ratio", [0, 2])
@pytest.mark.parametrize("spatial_scale", [1 / 4, 1 / 8, 0.3])
def test_roi_align_matches_torchvision(aligned, sampling_ratio, spatial_scale):
    features, rois = _features_and_rois(seed=int(spatial_scale * 100) + sampling_ratio)
    expected = torchvision_ops.roi_align(
        features, rois, output_size=(7, 5), spatial_scale=spatial_scale,
        sampling_ratio=sampling_ratio if sampling_ratio > 0 else -1, aligned=aligned)
    layer = mmcv.ops.RoIAlign((7, 5), spatial_scale, sampling_ratio, aligned=aligned)
    torch.testing.assert_close(layer(features, rois), expected, rtol=0, atol=1e-6)
    functional = mmcv.ops.roi_align(features, rois, (7, 5), spatial_scale, sampling_ratio,
                                    "avg", aligned)
    torch.testing.assert_close(functional, expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("aligned", [True, False])
def test_roi_align_samples_pixel_centres_as_mmcv_documents(aligned):
    """Feature value = its column index, so the average over a bin is the x of its centre;
    ``aligned=True`` shifts rois by half a pixel (mmcv/detectron2 convention)."""
    features = torch.arange(32, dtype=torch.float32).expand(1, 1, 16, 32).contiguous()
    rois = torch.tensor([[0.0, 4.0, 2.0, 20.0, 10.0]])
    out = mmcv.ops.roi_align(features, rois, (2, 4), 1.0, 2, "avg", aligned)
    shift = 0.5 if aligned else 0.0
    centres = 4.0 - shift + (torch.arange(4) + 0.5) * 16.0 / 4
    torch.testing.assert_close(out[0, 0], centres.expand(2, 4))


def test_roi_align_handles_no_rois():
    features, _ = _features_and_rois(seed=0)
    out = mmcv.ops.RoIAlign(7, 0.25, 0)(features, torch.zeros(0, 5))
    assert out.shape == (0, 3, 7, 7)


def _reference_nms(boxes: np.ndarray, scores: np.ndarray, threshold: float,
                   offset: int) -> list[int]:
    """Greedy NMS written out, with mmcv's ``offset`` (box side ``x2 - x1 + offset``)."""
    area = (boxes[:, 2] - boxes[:, 0] + offset) * (boxes[:, 3] - boxes[:, 1] + offset)
    suppressed = np.zeros(len(boxes), dtype=bool)
    keep = []
    for i in np.argsort(-scores, kind="stable"):
        if suppressed[i]:
            continue
        keep.append(int(i))
        w = np.minimum(boxes[i, 2], boxes[:, 2]) - np.maximum(boxes[i, 0], boxes[:, 0]) + offset
        h = np.minimum(boxes[i, 3], boxes[:, 3]) - np.maximum(boxes[i, 1], boxes[:, 1]) + offset
        inter = np.clip(w, 0, None) * np.clip(h, 0, None)
        suppressed |= inter / (area[i] + area - inter) > threshold
    return keep


def _random_boxes(seed: int, n: int = 200) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """float32 ``[n, 4]`` clustered integer-corner boxes (NMS has work to do), tie-free float32
    ``[n]`` scores, int64 ``[n]`` class ids in ``0..3``."""
    gen = torch.Generator().manual_seed(seed)
    centres = torch.randint(0, 100, (8, 2), generator=gen)[torch.randint(0, 8, (n,), generator=gen)]
    xy = centres + torch.randint(-6, 7, (n, 2), generator=gen)
    boxes = torch.cat([xy, xy + torch.randint(2, 30, (n, 2), generator=gen)], 1).float()
    scores = torch.randperm(n, generator=gen).float() / n + 0.001
    return boxes, scores, torch.randint(0, 4, (n,), generator=gen)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("threshold", [0.3, 0.7])
def test_nms_matches_torchvision(seed, threshold):
    boxes, scores, classes = _random_boxes(seed)
    dets, keep = mmcv.ops.nms(boxes, scores, threshold)
    # mmcv's kernels take the threshold as a C float; torchvision takes a double. With integer
    # corners some IoUs equal the threshold exactly, where the two would disagree.
    threshold_f32 = float(np.float32(threshold))
    expected = torchvision_ops.nms(boxes, scores, threshold_f32)
    assert torch.equal(keep, expected)
    assert keep.dtype == torch.int64 and torch.all(dets[:-1, 4] >= dets[1:, 4])
    assert keep.tolist() == _reference_nms(boxes.numpy(), scores.numpy(), threshold, 0)

    expected = torchvision_ops.batched_nms(boxes, scores, classes, threshold_f32)
    for split_thr in (10000, 10):  # mmcv's one-shot (offset trick) and per-class loop paths
        cfg = dict(iou_threshold=threshold, split_thr=split_thr)
        _, keep = mmcv.ops.batched_nms(boxes, scores, classes, cfg)
        assert torch.equal(keep, expected)


@pytest.mark.parametrize("seed", [0, 1])
def test_nms_legacy_offset_one(seed):
    boxes, scores, _ = _random_boxes(seed)
    _, keep = mmcv.ops.nms(boxes, scores, 0.5, offset=1)
    assert keep.tolist() == _reference_nms(boxes.numpy(), scores.numpy(), 0.5, 1)
    assert keep.tolist() != mmcv.ops.nms(boxes, scores, 0.5)[1].tolist()  # offset mattered


@needs_standin
def test_unavailable_op_fails_when_called_with_one_line():
    ext = sys.modules["mmcv._ext"]
    assert hasattr(ext, "deform_conv_forward")  # so mmcv's load_ext asserts pass at import
    with pytest.raises(CheckpointError, match="'deform_conv_forward'") as info:
        ext.deform_conv_forward(torch.zeros(1))
    message = str(info.value)
    assert "\n" not in message and "mmcv-lite" in message and "pip install mmcv" in message

    layer = mmcv.ops.DeformConv2d(4, 4, 3, padding=1)
    x = torch.randn(1, 4, 8, 8)
    with pytest.raises(CheckpointError, match="'deform_conv_forward'"):
        layer(x, torch.zeros(1, 18, 8, 8))
    with pytest.raises(CheckpointError, match="roi_align_forward"):
        mmcv.ops.RoIAlign(7, 1.0, 0, pool_mode="max")(x, torch.tensor([[0.0, 0, 0, 4, 4]]))


@needs_standin
def test_standin_looks_like_an_ordinary_module():
    import importlib.util
    import inspect
    import pickle

    from mmengine.utils.dl_utils import mmcv_full_available

    ext = sys.modules["mmcv._ext"]
    for name in ("__path__", "__file__", "__wrapped__", "__all__"):
        assert not hasattr(ext, name)
    assert importlib.util.find_spec("mmcv._ext") is not None
    assert mmcv_full_available() is False  # mmengine must not think compiled ops exist
    assert inspect.getmodule(ext.nms) is not None
    with pytest.raises((TypeError, pickle.PicklingError)):
        pickle.dumps(ext)  # modules never pickle; it must fail plainly, not call a stand-in


@needs_standin
def test_install_is_idempotent_and_announces_once(monkeypatch, caplog):
    first = sys.modules["mmcv._ext"]
    assert standin_active() and install_standin_ops() is True
    assert sys.modules["mmcv._ext"] is first

    # A fresh install (as in a new process) warns exactly once, then stays quiet.
    monkeypatch.delitem(sys.modules, "mmcv._ext")
    monkeypatch.setattr(sys.modules["mmcv"], "_ext", None, raising=False)
    with caplog.at_level(logging.WARNING, logger="roicache"):
        assert install_standin_ops() is True
        assert install_standin_ops() is True
    records = [r for r in caplog.records if r.name == "roicache"]
    assert len(records) == 1 and "torchvision" in records[0].getMessage()
    assert standin_active() and sys.modules["mmcv._ext"] is not first


# mmdet's own FCNMaskHead copies a tensor with new_tensor() (torch warns; harmless).
@pytest.mark.filterwarnings("ignore:To copy construct from a tensor")
@pytest.mark.parametrize("kind", ["mask_rcnn", "faster_rcnn", "cascade_mask_rcnn"])
def test_tiny_mmdet_models_run_through_mmdet_apis(kind, tmp_path):
    from mmdet.apis import inference_detector, init_detector

    classes = ("cat", "dog", "cup", "car", "kite")
    cfg = tiny_mmdet_config(kind, num_classes=5, class_names=classes)
    path = save_mmdet_checkpoint(tmp_path / f"{kind}.pth", cfg, seed=3, classes=classes)
    image = tiny_images(tmp_path / "images", n=1, seed=1)[0]

    model = init_detector(cfg, str(path), device="cpu")
    assert tuple(model.dataset_meta["classes"]) == classes
    result = inference_detector(model, str(image)).pred_instances
    assert len(result) > 0
    assert result.labels.max() < 5 and result.scores.unique().numel() > 1
    assert torch.all(result.bboxes[:, 2:] <= torch.tensor([128.0, 96.0]) + 1e-3)
    if kind != "faster_rcnn":
        assert result.masks.shape[1:] == (96, 128)


def test_checkpoint_layout_and_determinism(tmp_path):
    from mmengine import Config

    cfg = tiny_mmdet_config("faster_rcnn", num_classes=3)
    classes = ("a", "b", "c")
    one = save_mmdet_checkpoint(tmp_path / "one.pth", cfg, seed=5, classes=classes)
    two = save_mmdet_checkpoint(tmp_path / "two.pth", cfg, seed=5, classes=classes,
                                with_config_text=False)
    a = torch.load(one, map_location="cpu", weights_only=True)  # plain data: safe loading works
    b = torch.load(two, map_location="cpu", weights_only=True)
    assert set(a) == {"meta", "state_dict"} and a["meta"]["dataset_meta"]["classes"] == classes
    assert "cfg" not in b["meta"]
    text_cfg = Config.fromstring(a["meta"]["cfg"], ".py")
    assert text_cfg.model.roi_head.bbox_head.num_classes == 3
    assert a["state_dict"].keys() == b["state_dict"].keys()
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])

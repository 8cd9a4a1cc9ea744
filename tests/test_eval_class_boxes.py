"""Class-specific box regression in cached evaluation: the decoder, detection assembly with a box
per (RoI, class), and ``heads eval`` / ``heads train`` on a real store holding a regressor.

Stores here are copies of the session's tiny real store (``tests/conftest.py``) with a
:class:`BoxRegression` written into them by ``cache_schema.head_init.write_box_regression``, as
extraction writes it for mmdetection detectors.
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from torchvision.ops import batched_nms
from typer.testing import CliRunner

from cache_schema import open_store
from cache_schema.errors import ConfigError
from cache_schema.head_init import read_box_regression, write_box_regression
from cache_schema.postprocess import BoxRegression
from cache_schema.layout import ROOT_ATTR
from cache_schema.meta import StoreMeta
from cache_schema.postprocess import Postprocess
from heads.combine import Combination
from heads.cli import app
from heads.evaluation.class_boxes import ClassBoxes, BoxDecoder, decode_class_boxes, delta_xywh_decode
from heads.evaluation.detections import assemble_detection_arrays, merge_det, select_detections, select_detections_many
from heads.pipeline import MASK_NOTE, evaluate_from_store

RUNNER = CliRunner()
H, W = 70, 60


# ----------------------------------------------------------------------------- decoder


def test_hand_derived_boxes():
    # One RoI: proposal (10, 20, 50, 100): centre (30, 60), size 40 x 80 (x2 - x1, no +1).
    fc = torch.tensor([[1.0, 2.0]])
    proposals = torch.tensor([[10.0, 20.0, 50.0, 100.0]])
    weight = np.zeros((8, 2), np.float32)
    bias = np.zeros(8, np.float32)
    weight[4] = [1.0, 0.5]  # class 1 dx = 1 + 1 = 2   -> x 0.1 std = 0.2
    weight[5] = [0.0, -0.25]  # class 1 dy = -0.5      -> x 0.1 std = -0.05
    bias[6] = 5 * math.log(2.0)  # class 1 dw -> x 0.2 std = log 2: width x 2
    bias[7] = 5 * math.log(0.5)  # class 1 dh -> log 0.5: height x 0.5
    bias[2] = 100.0  # class 0 dw = 20 after the std: clamped to |log(0.016)|, width x 62.5
    reg = BoxRegression(weight=weight, bias=bias)
    boxes = decode_class_boxes(fc=fc, proposals=proposals, image_size=None, reg=reg)
    assert boxes.dtype == torch.float32 and boxes.shape == (1, 2, 4)
    # Hand-derived expected values. Class 1: centre (30 + 40*0.2, 60 + 80*(-0.05)) = (38, 56),
    # size (40*2, 80*0.5) = (80, 40) -> (38-40, 56-20, 38+40, 56+20).
    assert boxes[0, 1].tolist() == pytest.approx([-2.0, 36.0, 78.0, 76.0], abs=1e-4)
    # Class 0: centre (30, 60), width 40 * 62.5 = 2500, height 80 -> (30-1250, 20, 30+1250, 100).
    assert boxes[0, 0].tolist() == pytest.approx([-1220.0, 20.0, 1280.0, 100.0], abs=1e-2)
    # Clipped to the (height 70, width 60) image: [0, 60] x [0, 70].
    clipped = decode_class_boxes(fc=fc, proposals=proposals, image_size=(H, W), reg=reg)
    assert clipped[0, 1].tolist() == pytest.approx([0.0, 36.0, 60.0, 70.0], abs=1e-4)
    assert clipped[0, 0].tolist() == pytest.approx([0.0, 20.0, 60.0, 70.0], abs=1e-4)
    pair = decode_class_boxes(fc=fc, proposals=proposals, image_size=(H, W), reg=reg, rows=torch.tensor([0]),
                              classes=torch.tensor([1]))
    assert torch.equal(pair[0], clipped[0, 1])


def _random_regression(seed: int, c: int, d: int, scale: float = 0.3) -> BoxRegression:
    rng = np.random.default_rng(seed)
    return BoxRegression(weight=rng.normal(0, scale, (4 * c, d)).astype(np.float32),
                         bias=rng.normal(0, 0.5, 4 * c).astype(np.float32), means=(0.01, -0.02, 0.0, 0.05),
                         stds=(0.1, 0.1, 0.2, 0.2))


def _random_rois(seed: int, r: int, d: int, clustered: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(r, 2, generator=g) * torch.tensor([W, H]) - 5
    wh = torch.rand(r, 2, generator=g) * 30 + 2
    if clustered:  # jittered copies of 3 boxes: NMS removes most candidates, top-k windows must grow
        xy = torch.tensor([[5.0, 5.0], [30.0, 20.0], [40.0, 35.0]])[torch.arange(r) % 3] + torch.rand(r, 2, generator=g)
        wh = torch.full((r, 2), 18.0) + torch.rand(r, 2, generator=g)
    fc = torch.relu(torch.randn(r, d, generator=g)).half()
    return fc, torch.cat([xy, xy + wh], 1)


def test_pairs_decode_the_same_whatever_they_are_decoded_with():
    reg = _random_regression(1, c=7, d=16)
    fc, proposals = _random_rois(1, r=50, d=16)
    every = decode_class_boxes(fc=fc, proposals=proposals, image_size=(H, W), reg=reg)
    g = torch.Generator().manual_seed(2)
    rows, classes = torch.randint(0, 50, (300,), generator=g), torch.randint(0, 7, (300,), generator=g)
    for part in (slice(0, 300), slice(7, 19), slice(299, 300)):
        got = decode_class_boxes(fc=fc, proposals=proposals, image_size=(H, W), reg=reg, rows=rows[part],
                                 classes=classes[part])
        assert torch.equal(got, every[rows[part], classes[part]])  # bit-identical, not close
    # Against a float64 evaluation of the documented formula.
    x = fc.double().numpy()
    d = (x @ reg.weight.astype(np.float64).T + reg.bias).reshape(50, 7, 4) * np.array(reg.stds) + np.array(reg.means)
    p = proposals.double().numpy()[:, None, :]
    pw, ph = p[..., 2] - p[..., 0], p[..., 3] - p[..., 1]
    clip = abs(math.log(reg.wh_ratio_clip))
    gx, gy = (p[..., 0] + p[..., 2]) / 2 + pw * d[..., 0], (p[..., 1] + p[..., 3]) / 2 + ph * d[..., 1]
    gw, gh = pw * np.exp(np.clip(d[..., 2], -clip, clip)), ph * np.exp(np.clip(d[..., 3], -clip, clip))
    ref = np.stack([np.clip(gx - gw / 2, 0, W), np.clip(gy - gh / 2, 0, H), np.clip(gx + gw / 2, 0, W),
                    np.clip(gy + gh / 2, 0, H)], -1)
    np.testing.assert_allclose(every.numpy(), ref, rtol=0, atol=1e-3)
    with pytest.raises(ConfigError, match="together"):
        decode_class_boxes(fc=fc, proposals=proposals, image_size=None, reg=reg, rows=rows)
    with pytest.raises(ConfigError, match="fc"):
        decode_class_boxes(fc=fc[:, :5], proposals=proposals, image_size=None, reg=reg)


def _mmdet_coder():
    """mmdet's DeltaXYWHBBoxCoder class, or a skip when mmdet cannot be imported here."""
    try:
        from mmdet.models.task_modules.coders import DeltaXYWHBBoxCoder
    except ImportError:
        try:  # mmcv-lite lacks mmcv._ext; the project's stand-in makes the import work
            from extract.detectors.mmcv_ops import install_standin_ops

            install_standin_ops()
            from mmdet.models.task_modules.coders import DeltaXYWHBBoxCoder
        except Exception as exc:  # noqa: BLE001 - any failure means: not comparable here
            pytest.skip(f"mmdet's box coder cannot be imported ({exc})")
    return DeltaXYWHBBoxCoder


def test_decoder_equals_mmdets_coder():
    coder_cls = _mmdet_coder()
    c, r, d = 5, 40, 16
    reg = _random_regression(3, c=c, d=d, scale=0.8)  # some dw/dh beyond the ratio clip
    fc, proposals = _random_rois(3, r=r, d=d)
    coder = coder_cls(target_means=reg.means, target_stds=reg.stds, clip_border=True)
    deltas = torch.nn.functional.linear(fc.float(), torch.from_numpy(reg.weight), torch.from_numpy(reg.bias))
    theirs = coder.decode(proposals, deltas, max_shape=(H, W)).reshape(r, c, 4)
    ours = decode_class_boxes(fc=fc, proposals=proposals, image_size=(H, W), reg=reg)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-4)
    # Given the same deltas, the coder arithmetic is mmdet's step for step: bit-identical.
    same = delta_xywh_decode(proposals=proposals.repeat_interleave(c, 0), deltas=deltas.reshape(-1, 4), means=reg.means,
                             stds=reg.stds, wh_ratio_clip=reg.wh_ratio_clip)
    unclipped = coder.decode(proposals, deltas, max_shape=None).reshape(-1, 4)
    assert torch.equal(same, unclipped)


# ----------------------------------------------------------------------------- assembly


def reference(scores, boxes, size, *, score_thresh, nms_iou, max_dets, min_box_size):
    """The plain rule: every candidate pair (RoI-major), clipped, size filter, batched_nms, top-k."""
    h, w = size
    b = boxes.clone()
    b[..., 0::2] = b[..., 0::2].clamp(0, w)
    b[..., 1::2] = b[..., 1::2].clamp(0, h)
    rois, classes = torch.nonzero(scores > score_thresh, as_tuple=True)
    bb = b[rois, classes]
    ok = (bb[:, 2] - bb[:, 0] >= min_box_size) & (bb[:, 3] - bb[:, 1] >= min_box_size)
    rois, classes, bb = rois[ok], classes[ok], bb[ok]
    keep = batched_nms(bb, scores[rois, classes], classes + 1, nms_iou)[:max_dets]  # torchvision's label numbering
    return rois[keep], classes[keep], bb[keep]


# (seed, RoIs, classes, score_thresh, nms, max_dets, min_box_size, clustered): <= 1000 candidates
# take one batched_nms, more the per-class path and its top-k windows; min_box_size > 0 with many
# tiny boxes exercises the exact count of the candidates left after the size filter.
CASES = [(0, 40, 6, 0.0, 0.5, 300, 0.0, False), (1, 40, 6, 0.1, 0.6, 20, 1e-2, False),
         (2, 150, 8, 0.0, 0.5, 300, 0.0, False), (3, 300, 8, 1e-3, 0.5, 50, 0.0, False),
         (4, 300, 8, 0.0, 0.5, 100, 0.0, True), (5, 300, 8, 0.0, 0.5, 300, 4.0, False),
         (6, 200, 12, 0.0, 0.7, 40, 1e-2, True)]


@pytest.mark.parametrize("seed,r,c,score_thresh,nms,max_dets,min_box,clustered", CASES)
def test_class_specific_assembly_equals_the_plain_rule(seed, r, c, score_thresh, nms, max_dets, min_box, clustered):
    d = 16
    reg = _random_regression(seed, c=c, d=d, scale=0.05 if clustered else 0.3)
    fc, proposals = _random_rois(seed, r=r, d=d, clustered=clustered)
    if min_box > 1:  # most RoIs too small: fewer than 1000 candidates survive the size filter
        proposals[: r - 60, 2:] = proposals[: r - 60, :2] + 1.0
    scores = torch.softmax(torch.randn(r, c + 1, generator=torch.Generator().manual_seed(seed)) * 2, 1)[:, :c]
    dense = decode_class_boxes(fc=fc, proposals=proposals, image_size=None, reg=reg)
    settings = dict(score_thresh=score_thresh, nms_iou=nms, max_dets=max_dets, min_box_size=min_box)
    rois, classes, boxes = reference(scores, dense, (H, W), **settings)
    assert len(rois) > 0
    lazy = ClassBoxes(decoder=BoxDecoder(reg), fc=fc, proposals=proposals)
    for given in (dense, lazy):
        got = select_detections(scores=scores, boxes=given, image_size=(H, W), stream=1, **settings)
        assert torch.equal(got.roi_index, rois) and torch.equal(got.labels, classes)
        assert torch.equal(got.boxes, boxes) and torch.equal(got.scores, scores[rois, classes])
        assert got.stream.tolist() == [1] * len(rois)


def test_a_block_mixing_agnostic_and_class_specific_images_equals_one_by_one():
    c, d = 8, 16
    reg = BoxDecoder(_random_regression(9, c=c, d=d))
    images = [_random_rois(10 + i, r=r, d=d) for i, r in enumerate((300, 20, 0, 150))]
    scores = [torch.softmax(torch.randn(fc.shape[0], c + 1, generator=torch.Generator().manual_seed(i)), 1)[:, :c]
              for i, (fc, _) in enumerate(images)]
    boxes = [ClassBoxes(decoder=reg, fc=images[0][0], proposals=images[0][1]), images[1][1],
             ClassBoxes(decoder=reg, fc=images[2][0], proposals=images[2][1]), images[3][1] + 3.0]
    sizes = [(H, W), (H - 5, W), (H, W - 9), (H, W)]
    many = select_detections_many(scores=scores, boxes=boxes, image_sizes=sizes, max_dets=60, min_box_size=0.0)
    for s, b, size, got in zip(scores, boxes, sizes, many):
        one = select_detections(scores=s, boxes=b, image_size=size, max_dets=60, min_box_size=0.0)
        for f in ("roi_index", "labels", "scores", "boxes", "stream"):
            assert torch.equal(getattr(got, f), getattr(one, f)), f
    assert len(many[2]) == 0 and len(many[0]) == 60


def test_det_merge_keeps_each_detections_own_box():
    c, d = 4, 16
    reg = _random_regression(4, c=c, d=d)
    fc, proposals = _random_rois(4, r=30, d=d)
    g = torch.Generator().manual_seed(5)
    s_orig, s_cal = (torch.softmax(torch.randn(30, c + 1, generator=g), 1)[:, :c] for _ in range(2))
    lazy = ClassBoxes(decoder=BoxDecoder(reg), fc=fc, proposals=proposals)
    merged = assemble_detection_arrays(scores=(s_orig, s_cal), boxes=lazy, image_size=(H, W), max_dets=50)
    dense = decode_class_boxes(fc=fc, proposals=proposals, image_size=(H, W), reg=reg)
    assert torch.equal(merged.boxes, dense[merged.roi_index, merged.labels])
    sets = [select_detections(scores=s, boxes=dense, image_size=(H, W), max_dets=50, stream=i)
            for i, s in enumerate((s_orig, s_cal))]
    ref = merge_det(dets=sets, max_dets=50)
    assert torch.equal(merged.scores, ref.scores) and torch.equal(merged.stream, ref.stream)
    assert set(merged.stream.tolist()) == {0, 1}


def test_masks_are_pasted_into_each_detections_own_box():
    from heads.evaluation.detections import Detections, to_results
    from heads.evaluation.masks import paste_and_encode

    boxes = torch.tensor([[2.0, 2.0, 20.0, 20.0], [10.0, 10.0, 40.0, 30.0], [2.0, 2.0, 20.0, 20.0]])
    dets = Detections(roi_index=torch.tensor([0, 0, 1]), labels=torch.tensor([0, 1, 0]),
                      scores=torch.tensor([0.9, 0.8, 0.7]), boxes=boxes, stream=torch.zeros(3, dtype=torch.int64))
    logits = torch.randn(2, 8, 8, generator=torch.Generator().manual_seed(0)) * 3
    results = to_results(dets=dets, image_id=1, category_ids=[5, 6], mask_logits=logits, image_size=(H, W))
    for r, roi, box in zip(results, (0, 0, 1), boxes):
        assert r["segmentation"] == paste_and_encode(mask_logits=logits[roi][None], boxes=box[None], image_size=(H, W))[0]
    assert results[0]["segmentation"] != results[1]["segmentation"]  # one RoI, two boxes: two masks


# ----------------------------------------------------------------------------- real store


def run_cli(*args):
    return RUNNER.invoke(app, [str(a) for a in args])


def _class_specific_copy(src: Path, dst: Path, reg: BoxRegression, *, masks: bool = False,
                         post: Postprocess | None = None) -> Path:
    """``src`` copied to ``dst`` with a class-specific regressor, optionally the detector
    postprocess replaced, and (``masks=False``) a val split without mask logits — what
    extraction writes for a detector whose mask head is class-specific."""
    shutil.copytree(src, dst)
    store = open_store(dst, mode="r+")
    write_box_regression(store, reg)
    if post is not None:
        meta = store.meta
        new = replace(meta, detector=replace(meta.detector, postprocess=post))
        store.group.attrs[ROOT_ATTR] = new.to_dict()
        assert StoreMeta.from_dict(open_store(dst).group.attrs[ROOT_ATTR]).detector.postprocess == post
    if not masks:
        zarr.open_group(str(dst / "val"), mode="r+").attrs.update({"with_masks": False, "mask_overlaps": 0})
    return dst


def _regression_for(store_path: Path, seed: int, *, zero: bool = False) -> BoxRegression:
    store = open_store(store_path)
    c, d = store.meta.num_classes, store.meta.detector.levels["fc"][0]
    if zero:
        return BoxRegression(weight=np.zeros((4 * c, d), np.float32), bias=np.zeros(4 * c, np.float32))
    return _random_regression(seed, c=c, d=d, scale=0.1)


MMDET_LIKE = Postprocess(score_thresh=0.02, nms_iou=0.6, max_dets=100, min_box_size=0.0)


@pytest.fixture(scope="module")
def cs_store(tiny_store, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("class_specific")
    return _class_specific_copy(tiny_store, root / "store.zarr", _regression_for(tiny_store, 7), post=MMDET_LIKE)


def _numpy_reference(store_path: Path) -> list[dict]:
    """Independent reference of the cached orig detections: numpy decode + torchvision NMS."""
    store = open_store(store_path)
    reg, split, post = read_box_regression(store), store.split("val"), MMDET_LIKE
    val = split.load(level="fc", columns=("logits", "boxes"))
    c = store.meta.num_classes
    out = []
    for j, pos in enumerate(val.images.tolist()):
        rows = val.rows_of(j)
        logits = val.logits[rows].double().numpy()
        e = np.exp(logits - logits.max(1, keepdims=True))
        scores = (e / e.sum(1, keepdims=True))[:, :c]
        deltas = (val.features[rows].float().numpy() @ reg.weight.T + reg.bias).reshape(-1, c, 4)
        d = deltas * np.float32(reg.stds) + np.float32(reg.means)
        p = val.boxes[rows].numpy()[:, None, :]
        pw, ph = p[..., 2] - p[..., 0], p[..., 3] - p[..., 1]
        lim = abs(math.log(reg.wh_ratio_clip))
        gx, gy = (p[..., 0] + p[..., 2]) * 0.5 + pw * d[..., 0], (p[..., 1] + p[..., 3]) * 0.5 + ph * d[..., 1]
        gw, gh = pw * np.exp(np.clip(d[..., 2], -lim, lim)), ph * np.exp(np.clip(d[..., 3], -lim, lim))
        h, w = (int(v) for v in split.image_sizes[pos])
        boxes = np.stack([np.clip(gx - gw / 2, 0, w), np.clip(gy - gh / 2, 0, h), np.clip(gx + gw / 2, 0, w),
                          np.clip(gy + gh / 2, 0, h)], -1).astype(np.float32)
        r, k = np.nonzero(scores > post.score_thresh)
        keep = batched_nms(torch.from_numpy(boxes[r, k]), torch.from_numpy(scores[r, k]).float(), torch.from_numpy(k) + 1,
                           post.nms_iou)[:300].numpy()
        for i in keep:
            x1, y1, x2, y2 = boxes[r[i], k[i]].tolist()
            out.append({"image_id": int(split.image_ids[pos]), "category_id": int(store.classes.category_ids[k[i]]),
                        "bbox": [x1, y1, x2 - x1, y2 - y1], "score": float(scores[r[i], k[i]])})
    return out


def test_heads_eval_gives_box_ap_from_decoded_class_boxes_and_says_so(cs_store, tmp_path):
    result = run_cli("eval", "--cache", cs_store, "--combine", "orig", "--out", tmp_path, "--quiet")
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "metrics_orig.json").read_text())
    assert metrics["segm"] is None and metrics["bbox"]["num_detections"] > 0 and metrics["bbox"]["summary"]["AP"] > 0
    assert MASK_NOTE in metrics["notes"] and any(n.startswith("evaluator: fast") for n in metrics["notes"])
    assert any("the detector's own (score > 0.02, NMS IoU 0.6" in n for n in metrics["notes"])
    assert result.stdout.count("note: box AP only") == 1
    ours = json.loads((tmp_path / "results_orig.json").read_text())
    ref = _numpy_reference(cs_store)
    assert all("segmentation" not in r for r in ours)
    key = lambda r: (r["image_id"], r["category_id"], round(r["score"], 4), round(r["bbox"][0]))  # noqa: E731
    ours, ref = sorted(ours, key=key), sorted(ref, key=key)
    assert [(r["image_id"], r["category_id"]) for r in ours] == [(r["image_id"], r["category_id"]) for r in ref]
    np.testing.assert_allclose([r["score"] for r in ours], [r["score"] for r in ref], rtol=1e-5)
    np.testing.assert_allclose([r["bbox"] for r in ours], [r["bbox"] for r in ref], atol=1e-3)
    # Not the stored top-class boxes: those would give other boxes for most detections.
    store = open_store(cs_store)
    val = store.split("val").load(columns=("reg_boxes",))
    top = {tuple(np.round(b, 2)) for b in val.reg_boxes.numpy().tolist()}
    assert sum(tuple(np.round([r["bbox"][0], r["bbox"][1], r["bbox"][0] + r["bbox"][2], r["bbox"][1] + r["bbox"][3]], 2))
               in top for r in ours) < len(ours) // 2


def test_both_evaluators_agree_on_a_class_specific_store(cs_store):
    rows = {ev: evaluate_from_store(cache=str(cs_store), head=None, combinations=(Combination(rule="orig"),), out_dir=None,
                                    progress=False, evaluator=ev) for ev in ("fast", "lvis-api")}
    fast, api = rows["fast"].rows["orig"], rows["lvis-api"].rows["orig"]
    assert fast.segm is None and api.segm is None
    assert fast.bbox.summary == api.bbox.summary and fast.bbox.per_category == api.bbox.per_category
    assert MASK_NOTE in api.notes and rows["fast"].notes == rows["lvis-api"].notes


def test_zero_regressor_equals_a_class_agnostic_store_of_the_proposals(tiny_store, tmp_path):
    zero = _class_specific_copy(tiny_store, tmp_path / "zero.zarr", _regression_for(tiny_store, 0, zero=True))
    agnostic = tmp_path / "agnostic.zarr"
    shutil.copytree(tiny_store, agnostic)
    split = open_store(agnostic, mode="r+").split("val")
    split.array("rois/reg_boxes")[...] = split.array("rois/boxes")[...]
    zarr.open_group(str(agnostic / "val"), mode="r+").attrs.update({"with_masks": False, "mask_overlaps": 0})
    a = evaluate_from_store(cache=str(zero), head=None, combinations=(Combination(rule="orig"),), out_dir=None, progress=False)
    b = evaluate_from_store(cache=str(agnostic), head=None, combinations=(Combination(rule="orig"),), out_dir=None, progress=False)
    ma, mb = a.rows["orig"].bbox, b.rows["orig"].bbox
    assert ma.num_detections == mb.num_detections > 0
    assert ma.summary == pytest.approx(mb.summary, abs=1e-9) and ma.per_category == pytest.approx(mb.per_category, abs=1e-9)
    assert b.notes == () and MASK_NOTE in a.notes


def test_train_final_eval_reads_fc_beside_the_heads_level(cs_store, tmp_path):
    out = tmp_path / "run"
    result = run_cli("train", "--cache", cs_store, "--out", out, "--steps", "3", "--milestones", "2", "--quiet")
    assert result.exit_code == 0, result.output
    assert "note: box AP only" in result.stdout
    for name in ("orig", "cal-only", "sel"):
        m = json.loads((out / "eval" / f"metrics_{name}.json").read_text())
        assert m["segm"] is None and m["bbox"]["num_detections"] > 0 and MASK_NOTE in m["notes"]


def test_class_specific_store_without_fc_is_refused_in_one_line(tiny_store, tmp_path):
    store = _class_specific_copy(tiny_store, tmp_path / "nofc.zarr", _regression_for(tiny_store, 1))
    zarr.open_group(str(store / "val"), mode="r+").attrs["levels"] = ["pooled"]  # as `extract --levels pooled`
    result = run_cli("eval", "--cache", store, "--combine", "orig", "--quiet")
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "class-specific" in lines[0] and "--levels fc,pooled" in lines[0]


def test_class_specific_store_with_masks_pastes_them_into_each_detections_box(tiny_store, tmp_path):
    from cache_schema.errors import SchemaError

    store = _class_specific_copy(tiny_store, tmp_path / "masks.zarr", _regression_for(tiny_store, 2), masks=True)
    # The stored mask overlaps are of the top-class box: the array evaluator cannot use them.
    with pytest.raises(SchemaError, match="--evaluator fast is not possible: the stored mask overlaps"):
        evaluate_from_store(cache=str(store), head=None, combinations=(Combination(rule="orig"),), out_dir=None, progress=False,
                            evaluator="fast")
    outcome = evaluate_from_store(cache=str(store), head=None, combinations=(Combination(rule="orig"),), out_dir=tmp_path / "out",
                                  progress=False)
    m = outcome.rows["orig"]
    assert m.segm is not None and m.segm.num_detections == m.bbox.num_detections > 0
    assert any(n.startswith("evaluator: lvis-api (the stored mask overlaps") for n in m.notes)
    assert MASK_NOTE not in outcome.notes
    results = json.loads((tmp_path / "out" / "results_orig.json").read_text())
    assert all("segmentation" in r for r in results)

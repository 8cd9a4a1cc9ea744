"""The mmdetection backend: a small real mmdet Mask R-CNN (mmdet's own LVIS config, shrunk, random
init) saved as an mmengine checkpoint, read through the same detector boundary as torchvision's."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("mmdet")
pytest.importorskip("mmengine")

from cache_schema import open_store  # noqa: E402
from cache_schema.errors import ConfigError, DatasetError  # noqa: E402
from cache_schema.head_init import read_box_regression, read_head_weights  # noqa: E402
from extract.datasets.images import read_rgb  # noqa: E402
from extract.detectors.backends import load_adapter, read_checkpoint  # noqa: E402
from extract.detectors.base import DetectorAdapter  # noqa: E402
from extract.writer import ExtractConfig, extract  # noqa: E402
from tests.mmdet_fixtures import (class_names_of, save_mmdet_checkpoint, tiny_mmdet_config,  # noqa: E402
                                  val_image_paths)

# The detector's own proposal count (rois_per_image None), so cached and full evaluation see the same RoIs.
EXTRACT = ExtractConfig(levels=("pooled", "fc"), batch_size=4, device="cpu", threads=1)


@pytest.fixture(scope="module")
def mm_ckpt(tiny_data, tmp_path_factory) -> Path:
    names = class_names_of(tiny_data)
    cfg = tiny_mmdet_config("mask_rcnn", num_classes=len(names))
    return save_mmdet_checkpoint(tmp_path_factory.mktemp("mmdet") / "mask_rcnn.pth", cfg, seed=0, classes=names)


@pytest.fixture(scope="module")
def adapter(mm_ckpt):
    return load_adapter(mm_ckpt, device="cpu")


@pytest.fixture(scope="module")
def mm_store(mm_ckpt, tiny_data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("mm_store") / "store.zarr"
    extract(ckpt=mm_ckpt, data=tiny_data, out=str(out), config=EXTRACT, progress=False)
    return out


def test_protocol_levels_and_postprocess(adapter):
    assert isinstance(adapter, DetectorAdapter) and adapter.backend == "mmdet"
    assert adapter.levels == {"fc": (64,), "pooled": (32, 7, 7)}
    cfg = adapter.cfg.model.test_cfg
    # The LVIS config's own test settings: score_thr 1e-4, NMS 0.5, and (shrunk) max_per_img.
    assert adapter.postprocess.score_thresh == pytest.approx(cfg.rcnn.score_thr) == pytest.approx(1e-4)
    assert adapter.postprocess.nms_iou == 0.5 and adapter.postprocess.max_dets == cfg.rcnn.max_per_img
    assert adapter.default_proposals == cfg.rpn.max_per_img
    assert not adapter.class_agnostic_mask and not adapter.class_agnostic_box


def test_rois_reproduce_the_models_own_predictions(adapter, tiny_data):
    """Softmax of the adapter's logits over its per-class boxes, then mmdet's multiclass NMS,
    gives exactly what mmdet's own ``inference_detector`` returns for the image file."""
    from mmdet.apis import inference_detector
    from mmdet.models.layers import multiclass_nms

    post = adapter.postprocess
    for path in val_image_paths(tiny_data, 3):
        out = adapter.run([read_rgb(path)], gt_boxes=None, levels=("fc",), max_proposals=adapter.default_proposals,
                          with_masks=False)[0]
        scores = torch.softmax(torch.from_numpy(out.logits), dim=1)
        dets, labels = multiclass_nms(torch.from_numpy(out.class_boxes).reshape(len(out), -1), scores,
                                      post.score_thresh, {"type": "nms", "iou_threshold": post.nms_iou}, post.max_dets)
        ref = inference_detector(adapter.model, str(path)).pred_instances
        assert len(ref) > 0
        torch.testing.assert_close(dets[:, :4], ref.bboxes, atol=1e-3, rtol=1e-4)
        torch.testing.assert_close(dets[:, 4], ref.scores, atol=1e-6, rtol=1e-5)
        assert torch.equal(labels, ref.labels)


def test_store_features_equal_the_models_modules_on_the_stored_boxes(adapter, mm_store, tiny_data):
    from mmdet.structures.bbox import bbox2roi

    store = open_store(str(mm_store))
    split = store.split("train")
    roiset = split.load(level="pooled", columns=("boxes", "logits"))
    fc = split.load(level="fc").features
    head = adapter.model.roi_head
    for j in range(2):
        rows = roiset.rows_of(j)
        position = int(roiset.images[j])
        img = read_rgb(Path(store.meta.dataset.splits["train"].image_root) / split.file_names[position])
        packed = adapter._pipeline({"img": np.ascontiguousarray(img[..., ::-1]), "img_id": 0})
        data = adapter.model.data_preprocessor({"inputs": [packed["inputs"]], "data_samples": [packed["data_samples"]]})
        scale = torch.tensor(packed["data_samples"].metainfo["scale_factor"], dtype=torch.float32).repeat(2)
        boxes = torch.as_tensor(roiset.boxes[rows]).float() * scale
        with torch.no_grad():
            feats = adapter.model.extract_feat(data["inputs"])
            pooled = head.bbox_roi_extractor(feats[: head.bbox_roi_extractor.num_inputs], bbox2roi([boxes]))
            logits, _ = head.bbox_head(pooled)
        # The store keeps float16 features: equal up to that rounding.
        torch.testing.assert_close(roiset.features[rows].float(), pooled, atol=2e-3, rtol=2e-3)
        torch.testing.assert_close(roiset.logits[rows].float(), logits, atol=2e-3, rtol=2e-3)
        x = pooled.flatten(1)
        for layer in head.bbox_head.shared_fcs:
            x = torch.relu(layer(x))
        torch.testing.assert_close(fc[rows].float(), x, atol=2e-3, rtol=2e-3)


def test_store_records_the_regressor_head_and_postprocess(adapter, mm_store):
    store = open_store(str(mm_store))
    assert store.meta.detector.backend == "mmdet"
    assert store.meta.detector.postprocess == adapter.postprocess
    reg = read_box_regression(store)
    np.testing.assert_array_equal(reg.weight, adapter.bbox_head.fc_reg.weight.detach().numpy())
    assert reg.stds == tuple(adapter.bbox_head.bbox_coder.stds)
    head = read_head_weights(store)
    np.testing.assert_array_equal(head["cls.weight"], adapter.bbox_head.fc_cls.weight.detach().numpy())
    np.testing.assert_array_equal(head["fc7.bias"], adapter.bbox_head.shared_fcs[1].bias.detach().numpy())
    # The class-specific mask head cannot be stored per RoI: val keeps no mask logits.
    assert not store.split("val").with_masks


def test_replace_injected_checkpoint_loads_in_mmdet_with_the_new_classifier(mm_ckpt, tmp_path):
    from mmdet.apis import init_detector

    payload = read_checkpoint(mm_ckpt)
    backend = type(load_adapter(mm_ckpt, payload=payload))
    w = torch.randn_like(payload["state_dict"]["roi_head.bbox_head.fc_cls.weight"])
    b = torch.randn_like(payload["state_dict"]["roi_head.bbox_head.fc_cls.bias"])
    out = tmp_path / "replaced.pth"
    torch.save(backend.replace_classifier(payload, weight=w, bias=b), out)
    model = init_detector(load_adapter(mm_ckpt).cfg, str(out), device="cpu")
    assert torch.equal(model.roi_head.bbox_head.fc_cls.weight, w)
    assert torch.equal(model.roi_head.bbox_head.fc_cls.bias, b)


@pytest.mark.parametrize("kind,message", [
    ("retinanet", "is a one-stage detector"),
])
def test_unsupported_models_are_refused(kind, message, tiny_data, tmp_path):
    names = class_names_of(tiny_data)
    ckpt = save_mmdet_checkpoint(tmp_path / f"{kind}.pth", tiny_mmdet_config(kind, num_classes=len(names)),
                                 classes=names)
    with pytest.raises(ConfigError, match=message):
        load_adapter(ckpt)


def test_a_config_that_does_not_match_is_refused(mm_ckpt):
    from cache_schema.errors import CheckpointError

    with pytest.raises(CheckpointError, match="does not match checkpoint"):
        load_adapter(mm_ckpt, config="faster-rcnn_r50_fpn_1x_coco")
    with pytest.raises(ConfigError, match="neither a file nor a config bundled"):
        load_adapter(mm_ckpt, config="no-such-config")


def test_classes_that_disagree_with_the_annotation_file_are_refused(tiny_data, tmp_path):
    names = list(class_names_of(tiny_data))
    names[2] = "not_" + names[2]
    ckpt = save_mmdet_checkpoint(tmp_path / "other.pth", tiny_mmdet_config("mask_rcnn", num_classes=len(names)),
                                 classes=tuple(names))
    with pytest.raises(DatasetError, match="class 2 is"):
        extract(ckpt=ckpt, data=tiny_data, out=str(tmp_path / "s.zarr"), config=EXTRACT, progress=False)
    assert not (tmp_path / "s.zarr").exists()


def test_a_model_needing_a_missing_compiled_op_is_refused_before_writing(tiny_data, tmp_path):
    from extract.detectors.mmcv_ops import install_standin_ops, standin_active

    install_standin_ops()
    if not standin_active():
        pytest.skip("full mmcv installed: every compiled op is available")
    from cache_schema.errors import CheckpointError

    names = class_names_of(tiny_data)
    cfg = tiny_mmdet_config("mask_rcnn", num_classes=len(names))
    # RoIPool instead of RoIAlign: mmcv-lite has no compiled roi_pool.
    cfg.model.roi_head.bbox_roi_extractor.roi_layer = {"type": "RoIPool", "output_size": 7}
    ckpt = save_mmdet_checkpoint(tmp_path / "roipool.pth", cfg, classes=names)
    with pytest.raises(CheckpointError, match="roi_pool_forward"):
        extract(ckpt=ckpt, data=tiny_data, out=str(tmp_path / "s.zarr"), config=EXTRACT, progress=False)
    assert not (tmp_path / "s.zarr").exists()


def test_cli_pipeline_extract_train_inject(mm_ckpt, tiny_data, tmp_path):
    """extract → heads train (lastfc, bi-level) → serve inject --combine replace, through the
    console commands, on the mmdet checkpoint; the injected fc_cls is the trained head's."""
    from typer.testing import CliRunner

    from extract.cli import app as extract_app
    from heads.cli import app as heads_app
    from heads.models import load_head
    from serve.cli import app as serve_app

    runner = CliRunner()
    store, run, out = tmp_path / "s.zarr", tmp_path / "run", tmp_path / "replaced.pth"
    r = runner.invoke(extract_app, ["--ckpt", str(mm_ckpt), "--data", str(tiny_data), "--out", str(store),
                                    "--levels", "fc", "--rois-per-image", "30", "--threads", "1", "--quiet"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(heads_app, ["train", "--cache", str(store), "--out", str(run), "--head", "lastfc",
                                  "--steps", "20", "--milestones", "15", "--seed", "3", "--no-eval", "--quiet"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(serve_app, ["inject", "--ckpt", str(mm_ckpt), "--head", str(run), "--combine", "replace",
                                  "--out", str(out)])
    assert r.exit_code == 0, r.output
    head, _, _ = load_head(run / "head.pt")
    state = torch.load(out, map_location="cpu", weights_only=False)["state_dict"]
    assert torch.equal(state["roi_head.bbox_head.fc_cls.weight"], head.cls.weight.detach().cpu())
    original = read_checkpoint(mm_ckpt)["state_dict"]
    assert not torch.equal(state["roi_head.bbox_head.fc_cls.weight"], original["roi_head.bbox_head.fc_cls.weight"])
    assert all(torch.equal(state[k], v) for k, v in original.items() if "fc_cls" not in k)


def test_cli_errors_are_one_line(mm_ckpt, tiny_data, tmp_path):
    from typer.testing import CliRunner

    from extract.cli import app as extract_app

    r = CliRunner().invoke(extract_app, ["--ckpt", str(mm_ckpt), "--data", str(tiny_data), "--out",
                                         str(tmp_path / "s.zarr"), "--config", "no-such-config", "--quiet"])
    assert r.exit_code == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "no-such-config" in lines[0]


def test_full_inference_equals_mmdets_own_predictions_masks_included(mm_ckpt, tiny_data):
    """serve's dual-head detector on a plain mmdet checkpoint (rule orig): the same boxes, scores,
    labels and masks as mmdet's own ``inference_detector``."""
    from mmdet.apis import inference_detector
    from pycocotools import mask as mask_util

    from heads.combine import Combination
    from serve.dual import DualHeadDetector

    det = DualHeadDetector(path=mm_ckpt, device=torch.device("cpu"))
    det.category_ids = tuple(range(1, det.adapter.num_classes + 1))
    post = det.adapter.postprocess
    for path in val_image_paths(tiny_data, 3):
        img = read_rgb(path)
        inf = det.infer([img], combinations=(Combination(rule="orig"),), max_dets=post.max_dets)[0]
        res = det.results(inf.out, inf.dets[0], image_id=1, image_size=img.shape[:2], request=inf.request)
        ref = inference_detector(det.adapter.model, str(path)).pred_instances
        assert len(res) == len(ref) > 0
        boxes = torch.tensor([r["bbox"] for r in res], dtype=torch.float32)
        ref_xywh = torch.cat([ref.bboxes[:, :2], ref.bboxes[:, 2:] - ref.bboxes[:, :2]], dim=1)
        torch.testing.assert_close(boxes, ref_xywh, atol=1e-3, rtol=1e-4)
        assert [r["category_id"] - 1 for r in res] == ref.labels.tolist()
        torch.testing.assert_close(torch.tensor([r["score"] for r in res]), ref.scores, atol=1e-6, rtol=1e-5)
        ours = mask_util.decode([r["segmentation"] for r in res]).transpose(2, 0, 1).astype(bool)
        theirs = ref.masks.numpy()
        inter = (ours & theirs).sum(axis=(1, 2))
        union = (ours | theirs).sum(axis=(1, 2))
        # Masks are the model's own, pasted by its own code; boxes round-trip original ↔ input
        # pixels in float32, which may move a boundary pixel.
        assert np.all(inter >= 0.98 * np.maximum(union, 1))


def test_serve_eval_cli_on_an_mmdet_checkpoint_reports_mask_and_box_ap(mm_ckpt, tiny_data, tmp_path):
    from typer.testing import CliRunner

    from serve.cli import app as serve_app

    r = CliRunner().invoke(serve_app, ["eval", "--ckpt", str(mm_ckpt), "--data", str(tiny_data), "--out",
                                       str(tmp_path / "eval"), "--quiet"])
    assert r.exit_code == 0, r.output
    metrics = json.loads((tmp_path / "eval" / "metrics_orig.json").read_text())
    assert {"segm", "bbox"} <= set(metrics)
    results = json.loads((tmp_path / "eval" / "results_orig.json").read_text())
    assert results and all("segmentation" in x for x in results)


def test_online_calibration_through_the_mmdet_model_draws_what_the_cache_gives(mm_ckpt, mm_store, tmp_path):
    """`serve calibrate-online` runs the mmdet model through the same boundary: same batches and,
    up to the store's float16 rounding, the same losses as training from the cache."""
    from heads.config import load_config
    from heads.pipeline import train_from_store
    from serve.online import calibrate_online

    cfg = load_config(None, {"schedule.max_steps": 6, "schedule.milestones": "5", "sampler.classes_per_batch": 3,
                             "run.seed": 1, "run.log_interval": 2, "run.device": "cpu", "head.name": "lastfc"})
    cached = train_from_store(cache=str(mm_store), config=cfg, out_dir=tmp_path / "cached", progress=False)
    online = calibrate_online(ckpt=mm_ckpt, cache=str(mm_store), config=cfg, out_dir=tmp_path / "online",
                              progress=False)
    a, b = ([json.loads(line) for line in (r.out_dir / "log.jsonl").read_text().splitlines()] for r in (cached, online))
    assert [r["rois_per_step"] for r in a] == [r["rois_per_step"] for r in b]
    for ra, rb in zip(a, b):
        assert rb["loss"] == pytest.approx(ra["loss"], rel=1e-3)


# sel-thr with a high thr: the threshold must reach mmdet's box head through OUT.py too.
@pytest.mark.parametrize("combine,head,thr", [("sel", "lastfc", 0.05), ("cal-only", "3fc_ft", 0.05),
                                              ("sel-thr", "lastfc", 0.5)])
def test_dual_head_checkpoint_runs_the_rule_inside_mmdet(combine, head, thr, mm_ckpt, mm_store, tiny_data, tmp_path):
    """A dual-head checkpoint + config loads in mmdet (init_detector, the box head registered via
    custom_imports) and its detections equal roicache's: the rule applied to both heads' scores."""
    from mmdet.apis import inference_detector, init_detector

    from heads.config import load_config
    from heads.pipeline import train_from_store
    from heads.combine import Combination
    from serve.dual import DualHeadDetector
    from serve.inject import inject

    cfg = load_config(None, {"schedule.max_steps": 15, "schedule.milestones": "10", "sampler.classes_per_batch": 3,
                             "run.seed": 4, "run.device": "cpu", "head.name": head, "eval.interval": 0})
    run = train_from_store(cache=str(mm_store), config=cfg, out_dir=tmp_path / "run", progress=False)
    # T between the class counts so that sel really mixes the heads.
    counts = sorted(open_store(str(mm_store)).classes.instance_count.tolist())
    T = float(counts[len(counts) // 2])
    out = inject(ckpt=mm_ckpt, head=run.out_dir, combination=Combination(rule=combine, T=T, thr=thr),
                 out=tmp_path / "dual.pth")
    assert out.with_suffix(".py").is_file()
    model = init_detector(str(out.with_suffix(".py")), str(out), device="cpu")
    assert model.roi_head.bbox_head.combine == Combination(rule=combine, T=T, thr=thr)  # the whole record reached mmdet
    ours = DualHeadDetector(path=out, device=torch.device("cpu"))
    ours.category_ids = tuple(range(ours.adapter.num_classes))
    assert ours.default == Combination(rule=combine, T=T, thr=thr)
    for path in val_image_paths(tiny_data, 2):
        img = read_rgb(path)
        inf = ours.infer([img], combinations=(ours.default,), max_dets=ours.adapter.postprocess.max_dets)[0]
        d = inf.dets[0]
        ref = inference_detector(model, str(path)).pred_instances
        assert len(d) == len(ref) > 0
        torch.testing.assert_close(d.scores, ref.scores, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(d.boxes, ref.bboxes, atol=1e-3, rtol=1e-4)
        assert torch.equal(d.labels, ref.labels)
        # and the rule changed something: the plain model's scores differ.
        plain = ours.detect(inf.out, Combination(rule="orig"), img.shape[:2], max_dets=len(ref))
        assert not torch.allclose(plain.scores[: len(d)], d.scores[: len(plain)])


def test_cached_box_ap_equals_full_box_ap(mm_ckpt, mm_store, tiny_data, tmp_path):
    """heads eval (boxes recomputed from the stored fc features and the stored regressor) gives the
    box AP of full inference through the model; mask AP only from full inference, with a note."""
    from heads.combine import Combination
    from heads.pipeline import evaluate_from_store
    from serve.evaluate import evaluate_detector

    cached = evaluate_from_store(cache=str(mm_store), head=None, combinations=(Combination(rule="orig"),),
                                 out_dir=tmp_path / "cached", progress=False)
    full = evaluate_detector(ckpt=mm_ckpt, data=tiny_data, out_dir=tmp_path / "full", combines=("orig",),
                             progress=False)
    c, f = cached.rows["orig"], full.rows["orig"]
    assert f.bbox["AP"] > 0
    # float16 fc features move the recomputed boxes by ~1e-3 px: AP agrees to that rounding.
    for key in ("AP", "AP50", "APr", "APc", "APf"):
        assert abs(c.bbox[key] - f.bbox[key]) < 1e-3, key
    assert not c.segm and f.segm
    assert any("box AP only" in n for n in cached.notes)


@pytest.mark.parametrize("text,message", [
    ("model = dict(type='MaskRCNN')\ndata = dict(test=dict(pipeline=[]))", "no test_dataloader"),
    ("model = dict(type='NoSuchDetector', roi_head=dict(type='StandardRoIHead', bbox_head=dict(type='Shared2FCBBoxHead')),"
     " rpn_head=dict(type='RPNHead'))\ntest_dataloader = dict()", "does not build an mmdet model"),
    ("this is not python (", "cannot be read"),
])
def test_bad_config_text_in_the_checkpoint_is_one_line(text, message, mm_ckpt, tmp_path):
    payload = read_checkpoint(mm_ckpt)
    bad = tmp_path / "bad_cfg.pth"
    torch.save({**payload, "meta": {**payload["meta"], "cfg": text}}, bad)
    with pytest.raises(ConfigError, match=message):
        load_adapter(bad)

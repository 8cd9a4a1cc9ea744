"""Cascade R-CNN and HTC through the mmdet backend: one group of RoIs, features and logits per stage,
`heads train --stage k`, cached evaluation averaging stage logits as the model does, and
injection of one head per stage (plain mmdet for `replace`, mmdet's own box head for dual rules).

The models are mmdet's own bundled Cascade Mask R-CNN and HTC (without the semantic branch, as on
LVIS) configs, shrunk (tests/mmdet_fixtures.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("mmdet")

from cache_schema import open_store  # noqa: E402
from cache_schema.errors import ConfigError  # noqa: E402
from cache_schema.head_init import read_box_regression, read_head_weights  # noqa: E402
from extract.datasets.images import read_rgb  # noqa: E402
from extract.detectors.backends import load_adapter, read_checkpoint  # noqa: E402
from extract.writer import ExtractConfig, extract  # noqa: E402
from heads.combine import Combination  # noqa: E402
from heads.config import load_config  # noqa: E402
from tests.mmdet_fixtures import (class_names_of, save_mmdet_checkpoint, tiny_mmdet_config,  # noqa: E402
                                  val_image_paths)

EXTRACT = ExtractConfig(levels=("pooled", "fc"), batch_size=4, device="cpu", threads=1)
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def cascade_ckpt(tiny_data, tmp_path_factory) -> Path:
    names = class_names_of(tiny_data)
    cfg = tiny_mmdet_config("cascade_mask_rcnn", num_classes=len(names))
    return save_mmdet_checkpoint(tmp_path_factory.mktemp("cascade") / "cascade.pth", cfg, seed=2, classes=names)


@pytest.fixture(scope="module")
def adapter(cascade_ckpt):
    return load_adapter(cascade_ckpt, device="cpu")


@pytest.fixture(scope="module")
def cascade_store(cascade_ckpt, tiny_data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cascade_store") / "store.zarr"
    extract(ckpt=cascade_ckpt, data=tiny_data, out=str(out), config=EXTRACT, progress=False)
    return out


def _train(store: Path, out: Path, *, stage: int, head: str = "lastfc", seed: int = 0, loss: str = "ce"):
    from heads.pipeline import train_from_store

    cfg = load_config(None, {"schedule.max_steps": 15, "schedule.milestones": "10", "sampler.classes_per_batch": 3,
                             "run.seed": seed, "run.device": "cpu", "head.name": head, "head.stage": stage,
                             "loss.name": loss, "eval.interval": 0})
    return train_from_store(cache=str(store), config=cfg, out_dir=out, progress=False)


@pytest.fixture(scope="module", params=["cascade_mask_rcnn", "htc"])
def any_cascade(request, tiny_data, tmp_path_factory):
    names = class_names_of(tiny_data)
    cfg = tiny_mmdet_config(request.param, num_classes=len(names))
    ckpt = save_mmdet_checkpoint(tmp_path_factory.mktemp(request.param) / "model.pth", cfg, seed=3, classes=names)
    return load_adapter(ckpt, device="cpu")


def test_adapter_reproduces_the_cascades_own_predictions(any_cascade, tiny_data):
    """Softmax of the averaged stage logits over the last stage's boxes, then mmdet's NMS: exactly
    what mmdet's ``inference_detector`` gives; every stage's RoIs descend from the proposals."""
    from mmdet.apis import inference_detector
    from mmdet.models.layers import multiclass_nms

    adapter = any_cascade
    assert adapter.stage_fg_iou == (0.5, 0.6, 0.7)  # the config's train_cfg.rcnn assigners
    assert adapter.class_agnostic_box and adapter.box_regression() is None
    post = adapter.postprocess
    for path in val_image_paths(tiny_data, 3):
        out = adapter.run([read_rgb(path)], gt_boxes=None, levels=("fc", "pooled"),
                          max_proposals=adapter.default_proposals)[0]
        assert len(out.stages) == 3 and out.stages[0].boxes is out.boxes
        stacked = np.stack([st.logits for st in out.stages])
        np.testing.assert_allclose(out.logits, stacked.sum(0) / 3, rtol=1e-6, atol=1e-6)
        assert not np.allclose(out.stages[1].boxes, out.stages[0].boxes)  # stage 1 classifies refined boxes
        scores = torch.softmax(torch.from_numpy(out.logits), dim=1)
        dets, labels = multiclass_nms(torch.from_numpy(out.reg_boxes), scores, post.score_thresh,
                                      {"type": "nms", "iou_threshold": post.nms_iou}, post.max_dets)
        ref = inference_detector(adapter.model, str(path)).pred_instances
        assert len(ref) > 0
        torch.testing.assert_close(dets[:, :4], ref.bboxes, atol=1e-3, rtol=1e-4)
        torch.testing.assert_close(dets[:, 4], ref.scores, atol=1e-6, rtol=1e-5)
        assert torch.equal(labels, ref.labels)


def test_full_inference_masks_equal_the_cascades_own(any_cascade, tiny_data):
    """serve's detector on the plain cascade (rule orig): mmdet's boxes, scores, labels and masks
    (a cascade merges its stages' mask logits; HTC adds its mask information flow)."""
    from mmdet.apis import inference_detector
    from pycocotools import mask as mask_util

    from serve.dual import DualHeadDetector

    det = DualHeadDetector(path=any_cascade.path, device=CPU)
    det.category_ids = tuple(range(1, det.adapter.num_classes + 1))
    for path in val_image_paths(tiny_data, 2):
        img = read_rgb(path)
        inf = det.infer([img], combinations=(Combination(rule="orig"),), max_dets=det.adapter.postprocess.max_dets)[0]
        res = det.results(inf.out, inf.dets[0], image_id=1, image_size=img.shape[:2], request=inf.request)
        ref = inference_detector(det.adapter.model, str(path)).pred_instances
        assert len(res) == len(ref) > 0
        torch.testing.assert_close(torch.tensor([r["score"] for r in res]), ref.scores, atol=1e-6, rtol=1e-5)
        assert [r["category_id"] - 1 for r in res] == ref.labels.tolist()
        ours = mask_util.decode([r["segmentation"] for r in res]).transpose(2, 0, 1).astype(bool)
        inter, union = (ours & ref.masks.numpy()).sum(axis=(1, 2)), (ours | ref.masks.numpy()).sum(axis=(1, 2))
        # empty masks on both sides count as equal (a random-init mask head leaves some empty)
        assert np.all(inter >= 0.98 * union) and inter.sum() > 0


def test_store_holds_one_group_per_stage_equal_to_the_models_modules(adapter, cascade_store):
    """Stage k's stored boxes, features and logits are what stage k's own RoI extractor and box
    head give on them; its labels are matched at its own IoU; heads' weights are kept per stage."""
    from mmdet.structures.bbox import bbox2roi

    store = open_store(str(cascade_store))
    assert store.meta.detector.stage_fg_iou == (0.5, 0.6, 0.7) and store.meta.detector.num_stages == 3
    assert read_box_regression(store) is None
    split = store.split("train")
    main = split.load(level="fc", columns=("boxes", "logits"))
    stage_logits = []
    roi_head = adapter.model.roi_head
    for k in range(3):
        st = split.at_stage(k).load(level="pooled", columns=("boxes", "logits", "gt_index"))
        fc = split.at_stage(k).load(level="fc").features
        stage_logits.append(st.logits)
        fg = st.labels < store.meta.num_classes
        assert fg.any() and bool((st.ious[fg] >= store.meta.detector.stage_fg_iou[k]).all())
        assert bool((st.ious[~fg] < store.meta.detector.stage_fg_iou[k]).all())
        if k == 0:
            assert torch.equal(st.boxes, main.boxes) and torch.equal(fc, main.features)
        for j in range(2):
            rows = st.rows_of(j)
            position = int(st.images[j])
            img = read_rgb(Path(store.meta.dataset.splits["train"].image_root) / split.file_names[position])
            packed = adapter._pipeline({"img": np.ascontiguousarray(img[..., ::-1]), "img_id": 0})
            data = adapter.model.data_preprocessor({"inputs": [packed["inputs"]], "data_samples": [packed["data_samples"]]})
            scale = torch.tensor(packed["data_samples"].metainfo["scale_factor"], dtype=torch.float32).repeat(2)
            with torch.no_grad():
                feats = adapter.model.extract_feat(data["inputs"])
                extractor, head = roi_head.bbox_roi_extractor[k], roi_head.bbox_head[k]
                pooled = extractor(feats[: extractor.num_inputs], bbox2roi([st.boxes[rows].float() * scale]))
                logits, _ = head(pooled)
            torch.testing.assert_close(st.features[rows].float(), pooled, atol=2e-3, rtol=2e-3)
            torch.testing.assert_close(st.logits[rows], logits, atol=2e-3, rtol=2e-3)
        weights = read_head_weights(store, stage=k)
        np.testing.assert_array_equal(weights["cls.weight"], roi_head.bbox_head[k].fc_cls.weight.detach().numpy())
    # The split's own logits are the detector's final ones: the stage average.
    torch.testing.assert_close(main.logits, sum(stage_logits) / 3.0)


def test_a_stage_k_head_trains_on_stage_k_and_cached_eval_averages_it_in(cascade_store, tmp_path):
    from heads.evaluation.scoring import calibrated_probs, cascade_probs, load_head_matching
    from heads.models import load_head
    from heads.pipeline import evaluate_from_store, load_eval_inputs, store_identity

    store = open_store(str(cascade_store))
    run1 = _train(cascade_store, tmp_path / "s1", stage=1)
    head, _, meta = load_head(run1.out_dir / "head.pt")
    assert meta["stage"] == 1 and meta["num_stages"] == 3
    loaded = load_head_matching(run1.out_dir, identity=store_identity(store), store_path=store.path)
    inputs = load_eval_inputs(store, levels=(("fc", 1),))
    probs = calibrated_probs(inputs, (loaded,), CPU)
    # by hand: stage 1's logits recomputed by the head from stage 1's stored fc features
    val1 = store.split("val").at_stage(1).load(level="fc", columns=("logits",))
    with torch.no_grad():
        own = head(val1.features.float())
    l0, l2 = (store.split("val").at_stage(k).load(columns=("logits",)).logits for k in (0, 2))
    torch.testing.assert_close(probs, torch.softmax((l0 + own + l2) / 3.0, dim=1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(probs, cascade_probs(inputs.stage_logits, {1: own}), atol=1e-6, rtol=1e-6)
    # the detector's own heads everywhere give back its own scores exactly
    orig = torch.softmax(inputs.roiset.logits, dim=1)
    torch.testing.assert_close(cascade_probs(inputs.stage_logits, {}), orig, atol=1e-6, rtol=1e-6)
    outcome = evaluate_from_store(cache=str(cascade_store), head=run1.out_dir,
                                  combinations=(Combination(rule="orig"), Combination(rule="cal-only")),
                                  out_dir=None, progress=False)
    assert outcome.rows["orig"].bbox["AP"] != outcome.rows["cal-only"].bbox["AP"]


def test_heads_train_stage_cli_and_refusals(cascade_store, tmp_path):
    from typer.testing import CliRunner

    from heads.cli import app as heads_app
    from heads.models import load_head

    runner = CliRunner()
    r = runner.invoke(heads_app, ["train", "--cache", str(cascade_store), "--out", str(tmp_path / "r2"), "--stage", "2",
                                  "--head", "lastfc", "--steps", "6", "--milestones", "4", "--no-eval", "--quiet"])
    assert r.exit_code == 0, r.output
    assert load_head(tmp_path / "r2" / "head.pt")[2]["stage"] == 2
    r = runner.invoke(heads_app, ["train", "--cache", str(cascade_store), "--out", str(tmp_path / "r3"), "--stage", "3",
                                  "--steps", "6", "--quiet"])
    assert r.exit_code != 0 and "stages 0..2" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "r3" / "head.pt").exists()
    # two heads of one stage, in cached evaluation
    r = runner.invoke(heads_app, ["eval", "--cache", str(cascade_store), "--head", str(tmp_path / "r2"),
                                  "--head", str(tmp_path / "r2"), "--quiet"])
    assert r.exit_code != 0 and "one head per stage" in r.stderr


def test_gumbel_heads_are_refused_for_a_cascade(cascade_store, tmp_path):
    from heads.pipeline import evaluate_from_store

    run = _train(cascade_store, tmp_path / "g", stage=0, loss="gumbel")
    with pytest.raises(ConfigError, match="averages softmax logits"):
        evaluate_from_store(cache=str(cascade_store), head=run.out_dir, combinations=(Combination(rule="cal-only"),),
                            out_dir=None, progress=False)


def test_replace_injects_one_classifier_per_stage_and_plain_mmdet_loads_it(cascade_ckpt, cascade_store, tmp_path):
    from mmdet.apis import init_detector

    from heads.models import load_head
    from serve.inject import REPLACE, inject

    runs = [_train(cascade_store, tmp_path / f"s{k}", stage=k, seed=k).out_dir for k in (0, 2)]
    out = inject(ckpt=cascade_ckpt, head=runs, out=tmp_path / "replaced.pth", combination=REPLACE)
    model = init_detector(_config_file(cascade_ckpt, tmp_path), str(out), device="cpu")  # no roicache import
    original = read_checkpoint(cascade_ckpt)["state_dict"]
    for k, run in zip((0, 2), runs):
        head = load_head(run / "head.pt")[0]
        assert torch.equal(model.roi_head.bbox_head[k].fc_cls.weight.detach(), head.cls.weight.detach())
    assert torch.equal(model.roi_head.bbox_head[1].fc_cls.weight.detach(), original["roi_head.bbox_head.1.fc_cls.weight"])


def _config_file(ckpt: Path, tmp_path: Path) -> str:
    """The checkpoint's own config text as a file (what `init_detector` takes)."""
    path = tmp_path / "model_cfg.py"
    path.write_text(read_checkpoint(ckpt)["meta"]["cfg"])
    return str(path)


@pytest.mark.parametrize("combine", ["sel", "cal-only"])
def test_dual_head_cascade_runs_the_rule_inside_mmdet(combine, cascade_ckpt, cascade_store, tiny_data, tmp_path):
    """Heads for stages 0 and 1 (stage 2 keeps its own): mmdet's cascade, loaded from the written
    config + checkpoint, averages both halves of every stage's output and applies the rule — the
    same detections as roicache's own dual-head inference on the same checkpoint."""
    from mmdet.apis import inference_detector, init_detector

    from serve.dual import DualHeadDetector
    from serve.inject import inject

    runs = [_train(cascade_store, tmp_path / f"s{k}", stage=k, seed=k, head=h).out_dir
            for k, h in ((0, "lastfc"), (1, "3fc_ft"))]
    counts = sorted(open_store(str(cascade_store)).classes.instance_count.tolist())
    combination = Combination(rule=combine, T=float(counts[len(counts) // 2]))
    out = inject(ckpt=cascade_ckpt, head=runs, combination=combination, out=tmp_path / "dual.pth")
    model = init_detector(str(out.with_suffix(".py")), str(out), device="cpu")
    assert model.roi_head.bbox_head[2].calibrated is None and model.roi_head.bbox_head[1].calibrated is not None
    ours = DualHeadDetector(path=out, device=CPU)
    assert sorted(ours.heads) == [0, 1]
    for path in val_image_paths(tiny_data, 2):
        img = read_rgb(path)
        inf = ours.infer([img], combinations=(ours.default,), max_dets=ours.adapter.postprocess.max_dets)[0]
        d = inf.dets[0]
        ref = inference_detector(model, str(path)).pred_instances
        assert len(d) == len(ref) > 0
        torch.testing.assert_close(d.scores, ref.scores, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(d.boxes, ref.bboxes, atol=1e-3, rtol=1e-4)
        assert torch.equal(d.labels, ref.labels)
        plain = ours.detect(inf.out, Combination(rule="orig"), img.shape[:2], max_dets=len(ref))
        assert not torch.allclose(plain.scores[: len(d)], d.scores[: len(plain)])


def test_cached_box_ap_equals_full_box_ap_for_a_cascade(cascade_ckpt, cascade_store, tiny_data, tmp_path):
    from heads.pipeline import evaluate_from_store
    from serve.evaluate import evaluate_detector

    from serve.inject import inject

    run = _train(cascade_store, tmp_path / "s1", stage=1)
    rules = (Combination(rule="orig"), Combination(rule="cal-only"))
    cached = evaluate_from_store(cache=str(cascade_store), head=run.out_dir, combinations=rules, out_dir=None,
                                 progress=False)
    injected = inject(ckpt=cascade_ckpt, head=run.out_dir, combination=Combination(rule="cal-only"),
                      out=tmp_path / "cal.pth")
    full = evaluate_detector(ckpt=injected, data=tiny_data, out_dir=tmp_path / "full", combines=("orig", "cal-only"),
                             progress=False)
    for rule in ("orig", "cal-only"):
        c, f = cached.rows[rule], full.rows[rule]
        assert f.bbox["AP"] > 0, rule
        # float16 stage features: the retrained stage's logits agree to that rounding.
        for key in ("AP", "AP50", "APr", "APc", "APf"):
            assert abs(c.bbox[key] - f.bbox[key]) < 2e-3, (rule, key)


def test_class_specific_cascades_are_refused(tiny_data, tmp_path):
    names = class_names_of(tiny_data)
    cfg = tiny_mmdet_config("cascade_mask_rcnn", num_classes=len(names))
    for head in cfg.model.roi_head.bbox_head:
        head.reg_class_agnostic = False
    ckpt = save_mmdet_checkpoint(tmp_path / "cs.pth", cfg, classes=names)
    with pytest.raises(ConfigError, match="reg_class_agnostic=True in every stage"):
        load_adapter(ckpt)


def test_validate_checks_every_stage_group(cascade_store, tmp_path):
    import shutil

    from cache_schema.validate import validate_store

    assert validate_store(str(cascade_store)).ok
    copy = tmp_path / "copy.zarr"
    shutil.copytree(cascade_store, copy)
    from tests.store_objects import object_of

    obj, holders = object_of(copy, "train", "stages/2/feat/pooled", 1)
    obj.unlink()
    report = validate_store(str(copy))
    first = "image 1" if holders == [1] else f"images {holders[0]}-{holders[-1]}"
    assert len(report.problems) == 1 and report.problems[0].startswith(f"train/stages/2/feat/pooled: object(s) missing for {first}")


def test_sweep_and_online_calibration_refuse_later_stages(cascade_ckpt, cascade_store, tmp_path):
    from typer.testing import CliRunner

    from heads.cli import app as heads_app
    from serve.online import calibrate_online

    grid = tmp_path / "grid.toml"
    grid.write_text('[base.schedule]\nmax_steps = 4\nmilestones = [3]\n[[axis]]\nfield = "head.stage"\nvalues = [0, 1]\n')
    r = CliRunner().invoke(heads_app, ["sweep", "--cache", str(cascade_store), "--grid", str(grid), "--out",
                                       str(tmp_path / "out"), "--quiet"])
    lines = r.stderr.strip().splitlines()
    assert r.exit_code == 2 and len(lines) == 1 and "head.stage = 1" in lines[0] and "heads train --stage" in lines[0]
    assert not (tmp_path / "out").exists()
    cfg = load_config(None, {"head.stage": 1, "schedule.max_steps": 4, "schedule.milestones": "3"})
    with pytest.raises(ConfigError, match="stage-0 heads only"):
        calibrate_online(ckpt=cascade_ckpt, cache=str(cascade_store), config=cfg, out_dir=tmp_path / "o", progress=False)
    assert not (tmp_path / "o").exists()


def test_hdf5_export_carries_the_stage_arrays(cascade_store, tmp_path):
    import h5py

    from cache_schema.hdf5 import export_hdf5

    out = export_hdf5(str(cascade_store), tmp_path / "s.h5")
    store = open_store(str(cascade_store))
    with h5py.File(out, "r") as f:
        for k in range(3):
            want = store.split("val").at_stage(k).load(level="fc", columns=("boxes",))
            prefix = "val/" if k == 0 else f"val/stages/{k}/"
            np.testing.assert_array_equal(f[f"{prefix}rois/labels"][:], want.labels.numpy())
            np.testing.assert_array_equal(f[f"{prefix}rois/boxes"][:], want.boxes.numpy())
            np.testing.assert_array_equal(f[f"{prefix}feat/fc"][:], want.features.numpy())
        # Logits are not stored (recomputed from feat/fc on read), so the export has none either.
        assert "logits" not in f["val/rois"] and "logits" not in f["val/stages/1/rois"]


def test_a_stage_streams_the_same_rows_as_it_loads(cascade_store):
    from heads.pipeline import choose_source

    store = open_store(str(cascade_store))
    streamed = choose_source(store, "fc", stream="always", stage=2)
    loaded = choose_source(store, "fc", stream="never", stage=2)
    assert np.array_equal(streamed.index.labels, loaded.index.labels)
    rows = np.arange(0, streamed.index.num_rows, 7)
    a, la = streamed.gather(rows)
    b, lb = loaded.gather(rows)
    assert torch.equal(a, b) and torch.equal(la, lb)
    # and they are stage 2's, not stage 0's
    assert not torch.equal(a, choose_source(store, "fc", stream="never", stage=0).gather(rows)[0])

"""Acceptance of ``serve inject`` and the dual-head detector it loads into (issue 5).

Real parts only: the session's tiny detector/store (``tests/conftest.py``), heads trained 30
steps from the store, typer's ``CliRunner`` on ``serve.cli.app``, stock torchvision for the
``replace`` checkpoint.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.models.detection import MaskRCNN
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor
from torchvision.models.detection.mask_rcnn import MaskRCNNPredictor
from typer.testing import CliRunner

from cache_schema import open_store
from cache_schema.runtime import sha256_file
from extract.detectors.adapter import TorchvisionAdapter
from extract.detectors.arch import DetectorArch
from extract.detectors.toy import tiny_arch
from extract.detectors.train import train_detector
from heads.combine import RULES, Combination, combine_scores
from heads.config import load_config
from heads.models import head_scores, load_head
from heads.pipeline import train_from_store
from serve.cli import app
from serve.dual import DualHeadDetector
from extract.detectors.plain import build_plain_torchvision
from tests.pipeline_fixtures import TINY_DATA, TINY_TRAIN

RUNNER = CliRunner()
CPU = torch.device("cpu")
T_MIX = 9  # tiny train counts are 5..15: classes with <= 9 instances take the calibrated score


def run_cli(*args):
    return RUNNER.invoke(app, [str(a) for a in args])


def error_line(result) -> str:
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("error: ")
    return lines[0]


def train_head_on(store: Path, out: Path, *, head: str) -> Path:
    cfg = load_config(None, {"head.name": head, "schedule.max_steps": 30, "schedule.milestones": "20",
                             "run.seed": 5, "run.device": "cpu"})
    return train_from_store(cache=str(store), config=cfg, out_dir=out, progress=False).out_dir


def val_images(data: Path, n: int) -> tuple[list[dict], list[np.ndarray]]:
    records = json.loads((data / "val.json").read_text())["images"][:n]
    arrays = []
    for rec in records:
        with Image.open(data / rec["file_name"]) as im:
            arrays.append(np.asarray(im.convert("RGB"), dtype=np.uint8))
    return records, arrays


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("serve_inject")


@pytest.fixture(scope="module")
def head_3fc(tiny_store, work) -> Path:
    return train_head_on(tiny_store, work / "run_3fc", head="3fc_ft")


@pytest.fixture(scope="module")
def head_lastfc(tiny_store, work) -> Path:
    return train_head_on(tiny_store, work / "run_lastfc", head="lastfc")


@pytest.fixture(scope="module")
def sel_ckpt(tiny_ckpt, head_3fc, work) -> Path:
    out = work / "sel.pt"
    result = run_cli("inject", "--ckpt", tiny_ckpt, "--head", head_3fc, "--out", out, "--combine", "sel", "--T", T_MIX)
    assert result.exit_code == 0, result.output
    return out


def test_injected_scores_are_the_combination_of_the_two_heads(sel_ckpt, tiny_ckpt, head_3fc, tiny_store, tiny_data):
    det = DualHeadDetector(path=sel_ckpt, device=CPU)
    assert det.default == Combination(rule="sel", T=T_MIX, boundary="le")
    counts = torch.as_tensor(open_store(tiny_store).classes.instance_count, dtype=torch.int64)
    assert det.calibration.instance_count == tuple(int(v) for v in counts)
    _, images = val_images(tiny_data, 2)
    outs = det.run_images(images)
    # The reference: the ORIGINAL checkpoint run by the plain adapter, the head loaded on its own.
    adapter = TorchvisionAdapter.from_checkpoint(tiny_ckpt, device=CPU)
    refs = adapter.run(images, levels=("pooled",), with_masks=True, max_proposals=adapter.arch.rpn_post_nms_top_n_test)
    head, spec, _ = load_head(head_3fc / "head.pt")
    use_cal = Combination(T=T_MIX).use_cal(counts)
    assert use_cal.any() and not use_cal.all()  # a real mix of both heads
    for out, ref in zip(outs, refs):
        np.testing.assert_array_equal(out.logits, ref.logits)  # injection left the detector untouched
        p_orig = torch.softmax(torch.from_numpy(ref.logits), dim=1)
        with torch.inference_mode():
            p_cal = head_scores(spec, head(torch.from_numpy(ref.features["pooled"])))
        for rule in ("sel", "cal-only", "avg", "sel-thr", "sel-scale", "sel-norm"):
            got = det.scores(out, Combination(rule=rule, T=T_MIX))[0]
            want = combine_scores(rule, p_orig=p_orig, p_cal=p_cal, instance_count=counts,
                                  config=Combination(T=T_MIX))[0]
            torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
        sel = det.scores(out, det.default)[0]
        torch.testing.assert_close(sel[:, use_cal], p_cal[:, :-1][:, use_cal], rtol=0, atol=1e-6)
        torch.testing.assert_close(sel[:, ~use_cal], p_orig[:, :-1][:, ~use_cal], rtol=0, atol=1e-6)
        assert (p_cal - p_orig).abs().max() > 1e-3  # the heads differ, so the checks above bite


def test_masks_of_detected_rows_only_equal_masks_of_all_rows(sel_ckpt, tiny_data):
    """serve eval computes masks only for RoIs that become detections; every one of the up to
    300 detections per image must still get its mask (more than the arch's 50 per image here)."""
    det = DualHeadDetector(path=sel_ckpt, device=CPU)
    records, images = val_images(tiny_data, 2)
    wanted = (det.default, Combination(rule="orig"))
    selective = det.run_images(images, combinations=wanted, max_dets=300)
    complete = det.run_images(images)
    for rec, sel_out, all_out in zip(records, selective, complete):
        for combination in wanted:
            kw = {"image_id": rec["id"], "image_size": (rec["height"], rec["width"]), "max_dets": 300}
            a, b = det.detections(sel_out, combination, **kw), det.detections(all_out, combination, **kw)
            assert len(a) > det.adapter.arch.box_detections_per_img
            assert a == b


def test_infer_detections_equal_detections_of_complete_outputs(sel_ckpt, tiny_data):
    """serve eval assembles each image's detections once, before its masks exist (they pick the
    RoIs that need masks); the results must equal assembling them from complete outputs."""
    det = DualHeadDetector(path=sel_ckpt, device=CPU)
    records, images = val_images(tiny_data, 3)
    wanted = (det.default, Combination(rule="orig"), Combination(rule="cal-only"))
    inferred = det.infer(images, combinations=wanted, max_dets=300)
    complete = det.run_images(images)
    assert len(inferred) == len(images)
    for rec, inf, all_out in zip(records, inferred, complete):
        np.testing.assert_array_equal(inf.out.logits, all_out.logits)  # matched to the right image
        assert len(inf.dets) == len(wanted)
        size = (rec["height"], rec["width"])
        for combination, dets in zip(wanted, inf.dets):
            got = det.results(inf.out, dets, image_id=rec["id"], image_size=size)
            assert got and got == det.detections(all_out, combination, image_id=rec["id"], image_size=size)


def test_injected_checkpoint_records_provenance(sel_ckpt, tiny_ckpt, head_3fc):
    payload = torch.load(sel_ckpt, map_location="cpu", weights_only=True)
    injected = payload["meta"]["injected"]
    assert injected["source_checkpoint_sha256"] == sha256_file(tiny_ckpt)
    assert injected["head_sha256"] == sha256_file(head_3fc / "head.pt")
    assert injected["combine"] == "sel" and injected["combination"] == Combination(rule="sel", T=T_MIX).to_dict()
    original = torch.load(tiny_ckpt, map_location="cpu", weights_only=True)["state_dict"]
    assert all(torch.equal(original[k], payload["state_dict"][k]) for k in original)


def _xywh_to_xyxy(b: list[float]) -> list[float]:
    return [b[0], b[1], b[0] + b[2], b[1] + b[3]]


def test_replace_checkpoint_is_stock_torchvision_with_cal_only_scores(tiny_ckpt, head_lastfc, tiny_data, work):
    plain, cal = work / "replace.pt", work / "cal_only.pt"
    assert run_cli("inject", "--ckpt", tiny_ckpt, "--head", head_lastfc, "--out", plain,
                   "--combine", "replace").exit_code == 0
    assert run_cli("inject", "--ckpt", tiny_ckpt, "--head", head_lastfc, "--out", cal,
                   "--combine", "cal-only").exit_code == 0
    payload = torch.load(plain, map_location="cpu", weights_only=True)
    model = build_plain_torchvision(DetectorArch.from_dict(payload["arch"]))
    model.load_state_dict(payload["state_dict"], strict=True)
    assert type(model) is MaskRCNN
    assert type(model.roi_heads.box_predictor) is FastRCNNPredictor
    assert type(model.roi_heads.mask_predictor) is MaskRCNNPredictor
    assert model.roi_heads.box_predictor.cls_score.out_features == TINY_DATA.num_classes + 1

    records, images = val_images(tiny_data, 3)
    with torch.inference_mode():
        stock = model.eval()([torch.from_numpy(a.copy()).permute(2, 0, 1).float() / 255.0 for a in images])
    dual = DualHeadDetector(path=cal, device=CPU)
    cat_ids = [int(c["id"]) for c in payload["categories"]]
    per_image = dual.adapter.arch.box_detections_per_img
    for rec, out, tv in zip(records, dual.run_images(images), stock):
        dets = dual.detections(out, Combination(rule="cal-only"), image_id=rec["id"],
                               image_size=(rec["height"], rec["width"]), max_dets=per_image)
        top = 10
        assert len(dets) == len(tv["scores"]) >= top
        np.testing.assert_allclose([d["score"] for d in dets[:top]], tv["scores"][:top].numpy(), rtol=0, atol=1e-4)
        assert [d["category_id"] for d in dets[:top]] == [cat_ids[int(k) - 1] for k in tv["labels"][:top]]
        np.testing.assert_allclose([_xywh_to_xyxy(d["bbox"]) for d in dets[:top]], tv["boxes"][:top].numpy(),
                                   rtol=0, atol=1e-3)


# ----------------------------------------------------------------------------- bad input


@pytest.fixture(scope="module")
def other_ckpt(tiny_data, work) -> Path:
    """A second tiny detector (other seed, 3 steps) with the same classes."""
    arch = replace(tiny_arch(num_classes=TINY_DATA.num_classes, image_size=TINY_DATA.image_size),
                   rpn_post_nms_top_n_test=24)
    return train_detector(data_dir=tiny_data, out_dir=work / "other_detector", arch=arch, progress=False,
                          config=replace(TINY_TRAIN, seed=1, max_steps=3))


def test_inject_refuses_head_of_another_detector(other_ckpt, head_3fc, work):
    out = work / "wrong.pt"
    line = error_line(run_cli("inject", "--ckpt", other_ckpt, "--head", head_3fc, "--out", out))
    assert "another detector" in line and sha256_file(other_ckpt)[:12] in line
    assert not out.exists()


def test_replace_refuses_head_that_changes_shared_fcs(tiny_ckpt, head_3fc, work):
    out = work / "replace_3fc.pt"
    line = error_line(run_cli("inject", "--ckpt", tiny_ckpt, "--head", head_3fc, "--out", out, "--combine", "replace"))
    assert "lastfc" in line and "--combine sel" in line
    assert not out.exists()


def test_inject_refuses_an_already_injected_checkpoint(sel_ckpt, head_3fc, work):
    line = error_line(run_cli("inject", "--ckpt", sel_ckpt, "--head", head_3fc, "--out", work / "twice.pt"))
    assert "already carries a calibrated head" in line


def test_corrupt_checkpoint_is_refused(tiny_ckpt, tiny_data, head_3fc, work):
    bad = work / "corrupt.pt"
    data = tiny_ckpt.read_bytes()
    bad.write_bytes(data[: len(data) // 2])  # a copy cut short
    for result in (run_cli("eval", "--ckpt", bad, "--data", tiny_data, "--out", work / "e_bad", "--quiet"),
                   run_cli("inject", "--ckpt", bad, "--head", head_3fc, "--out", work / "from_bad.pt")):
        line = error_line(result)
        assert str(bad) in line and "corrupt" in line
    assert not (work / "from_bad.pt").exists()


def test_dataset_without_val_images_is_refused(tiny_ckpt, tiny_data, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    shutil.rmtree(data / "images" / "val")
    line = error_line(run_cli("eval", "--ckpt", tiny_ckpt, "--data", data, "--out", tmp_path / "e", "--quiet"))
    assert "10 of 10 images are missing" in line
    (data / "val.json").unlink()
    line = error_line(run_cli("eval", "--ckpt", tiny_ckpt, "--data", data, "--out", tmp_path / "e", "--quiet"))
    assert "no val.json" in line


def test_unknown_combine_scheme_is_refused(tiny_ckpt, sel_ckpt, head_3fc, tiny_data, work):
    out = work / "bogus.pt"
    line = error_line(run_cli("inject", "--ckpt", tiny_ckpt, "--head", head_3fc, "--out", out, "--combine", "bogus"))
    assert "bogus" in line and all(name in line for name in RULES) and "replace" in line
    assert not out.exists()
    line = error_line(run_cli("eval", "--ckpt", sel_ckpt, "--data", tiny_data, "--combine", "sel,bogus",
                              "--out", work / "e_bogus", "--quiet"))
    assert "bogus" in line and all(name in line for name in RULES)


def test_plain_checkpoint_has_no_calibrated_scheme(tiny_ckpt, tiny_data, work):
    line = error_line(run_cli("eval", "--ckpt", tiny_ckpt, "--data", tiny_data, "--combine", "sel",
                              "--out", work / "e_plain_sel", "--quiet"))
    assert "no calibrated head" in line and "serve inject" in line


# ----------------------------------------------------------------------------- the combination record


@pytest.fixture(scope="module")
def head_recorded(tiny_store, work) -> Path:
    """A head whose run recorded a non-default ``[combine]`` (what `serve inject` defaults to)."""
    cfg = load_config(None, {"schedule.max_steps": 30, "schedule.milestones": "20", "run.seed": 5, "run.device": "cpu",
                             "combine.rule": "sel-thr", "combine.T": T_MIX, "combine.boundary": "lt",
                             "combine.thr": 0.3, "combine.scale_ratio": "orig/cal"})
    return train_from_store(cache=str(tiny_store), config=cfg, out_dir=work / "run_recorded", progress=False).out_dir


def test_inject_defaults_to_the_head_runs_recorded_combination(tiny_ckpt, head_recorded, work):
    recorded = Combination(rule="sel-thr", T=T_MIX, boundary="lt", thr=0.3, scale_ratio="orig/cal")
    out = work / "recorded.pt"
    assert run_cli("inject", "--ckpt", tiny_ckpt, "--head", head_recorded, "--out", out).exit_code == 0
    assert DualHeadDetector(path=out, device=CPU).default == recorded
    # Each flag given overrides its field only.
    out2 = work / "recorded_T.pt"
    result = run_cli("inject", "--ckpt", tiny_ckpt, "--head", head_recorded, "--out", out2, "--T", "inf",
                     "--combine", "sel-scale")
    assert result.exit_code == 0, result.output
    assert DualHeadDetector(path=out2, device=CPU).default == Combination(
        rule="sel-scale", T=float("inf"), boundary="lt", thr=0.3, scale_ratio="orig/cal")
    record = torch.load(out2, map_location="cpu", weights_only=True)["calibration"]["combination"]
    assert record["T"] == "inf" and json.dumps(record, allow_nan=False)


def test_thr_given_at_inject_time_is_what_the_checkpoint_scores_with(tiny_ckpt, head_3fc, tiny_data, work):
    out = work / "sel_thr.pt"
    result = run_cli("inject", "--ckpt", tiny_ckpt, "--head", head_3fc, "--out", out, "--combine", "sel-thr",
                     "--T", T_MIX, "--thr", "0.5", "--boundary", "lt", "--scale-ratio", "orig/cal")
    assert result.exit_code == 0, result.output
    assert "thr=0.5" in result.stdout
    det = DualHeadDetector(path=out, device=CPU)
    assert det.default == Combination(rule="sel-thr", T=T_MIX, boundary="lt", thr=0.5, scale_ratio="orig/cal")
    _, images = val_images(tiny_data, 2)
    out0 = det.run_images(images)[0]
    high = det.scores(out0, det.default)[0]
    low = det.scores(out0, det.with_default(thr=0.05))[0]
    assert not torch.equal(high, low)  # thr bites: cal scores in [0.05, 0.5) are zeroed at 0.5 only
    p_orig, p_cal = det.probabilities(out0)
    counts = torch.as_tensor(det.calibration.instance_count)
    want = combine_scores("sel-thr", p_orig=p_orig, p_cal=p_cal, instance_count=counts, config=det.default)[0]
    torch.testing.assert_close(high, want, rtol=0, atol=0)
    scale = det.with_default(rule="sel-scale")
    assert not torch.equal(det.scores(out0, scale)[0], det.scores(out0, scale.override(scale_ratio="cal/orig"))[0])


@pytest.mark.parametrize("T,want", [(T_MIX, float(T_MIX)), ("inf", float("inf"))])
def test_a_calibration_record_of_the_older_format_still_loads(sel_ckpt, work, T, want):
    """Checkpoints injected before the combination record kept top-level combine/T/boundary."""
    payload = torch.load(sel_ckpt, map_location="cpu", weights_only=True)
    record = dict(payload["calibration"])
    del record["combination"]
    record.update(combine="sel", T=T, boundary="lt")
    old = work / f"old_format_{T}.pt"
    torch.save({**payload, "calibration": record}, old)
    det = DualHeadDetector(path=old, device=CPU)
    assert det.default == Combination(rule="sel", T=want, boundary="lt")  # thr, scale_ratio: defaults
    assert det.calibration.instance_count == DualHeadDetector(path=sel_ckpt, device=CPU).calibration.instance_count


def test_malformed_calibration_record_is_a_checkpoint_error(sel_ckpt, tiny_data, work):
    payload = torch.load(sel_ckpt, map_location="cpu", weights_only=True)
    bad = work / "bad_record.pt"
    torch.save({**payload, "calibration": {**payload["calibration"], "combination": {"rule": "sel", "T": "lots"}}}, bad)
    line = error_line(run_cli("eval", "--ckpt", bad, "--data", tiny_data, "--out", work / "e_bad_record", "--quiet"))
    assert "calibration record is malformed" in line and "lots" in line and "re-inject" in line


@pytest.mark.parametrize("flags,words", [
    (["--T", "-3"], ["T=-3"]),
    (["--boundary", "lte"], ["lte", "'le'"]),
    (["--thr", "1.5"], ["thr=1.5", "[0, 1)"]),
    (["--scale-ratio", "up"], ["up", "cal/orig"]),
])
def test_bad_combination_flags_of_inject_are_one_line(flags, words, tiny_ckpt, head_3fc, work):
    out = work / "bad_flag.pt"
    line = error_line(run_cli("inject", "--ckpt", tiny_ckpt, "--head", head_3fc, "--out", out, *flags))
    assert all(w in line for w in words), line
    assert not out.exists()

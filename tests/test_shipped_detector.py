"""The shipped embedded detector: bytes, architecture and class table as recorded; refusals; val AP."""

from __future__ import annotations

import shutil

import pytest
import torch
from typer.testing import CliRunner

from cache_schema.errors import CheckpointError, DatasetError
from cache_schema.runtime import sha256_file
from extract.cli import app as extract_app
from extract.datasets import SynthConfig, generate
from extract.datasets.synthetic import class_glyphs
from extract.datasets.synthetic_config import GENERATOR_VERSION
from extract.detectors import shipped
from extract.detectors.checkpoint import load_detector, read_torch_file
from extract.detectors.presets import get_preset
from extract.detectors.train_config import TRAJECTORY_FIELDS
from extract.detectors.shipped import ShippedDetector, check_data_matches, shipped_checkpoint
from serve.evaluate import evaluate_detector


def test_shipped_file_is_the_one_its_manifest_records():
    record = ShippedDetector.read()
    path = shipped_checkpoint()
    assert path.stat().st_size == record.size and sha256_file(path) == record.sha256
    state = read_torch_file(path, what="detector")["state_dict"]
    assert {v.dtype for v in state.values() if v.is_floating_point()} == {torch.float16}
    assert record.size < 16 * 2**20  # small enough for the repository


def test_shipped_arch_classes_and_recipe_match_the_code():
    record = ShippedDetector.read()
    det = load_detector(shipped_checkpoint())
    preset = get_preset(record.recipe["preset"])
    data = SynthConfig()
    assert det.arch == preset.arch(num_classes=data.num_classes)
    # The trajectory is the preset's (a time budget or resume settings may differ, they do not
    # change the weights a step produces).
    assert {k: record.recipe["train"][k] for k in TRAJECTORY_FIELDS} == {k: preset.train.to_dict()[k] for k in TRAJECTORY_FIELDS}
    assert record.generator == GENERATOR_VERSION and record.data_config == data.to_dict()
    names = [g.name for g in class_glyphs(data)]
    assert [c["name"] for c in det.categories] == names
    assert [c["id"] for c in det.categories] == list(range(1, data.num_classes + 1))
    assert next(det.model.parameters()).dtype == torch.float32  # rebuilt in float32
    steps = [row["step"] for row in record.val_log]
    assert steps == sorted(steps) and steps[-1] <= record.training["steps_done"] <= record.training["total_steps"]


def test_a_damaged_shipped_file_is_refused_in_one_line(tmp_path, monkeypatch):
    record = ShippedDetector.read()
    shutil.copy(shipped.SHIPPED_DIR / f"{record.name}.json", tmp_path)
    (tmp_path / record.file.name).write_bytes(record.file.read_bytes()[: record.size // 2])
    monkeypatch.setattr(shipped, "SHIPPED_DIR", tmp_path)
    with pytest.raises(CheckpointError, match="is damaged") as info:
        shipped_checkpoint()
    assert "\n" not in str(info.value)


def test_a_truncated_checkpoint_is_one_line_at_extraction(tiny_data, tmp_path):
    bad = tmp_path / "truncated.pt"
    bad.write_bytes(shipped_checkpoint().read_bytes()[:100_000])
    result = CliRunner().invoke(extract_app, ["--ckpt", str(bad), "--data", str(tiny_data), "--out", str(tmp_path / "s")])
    assert result.exit_code == 2 and "truncated" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "s").exists()


def test_extraction_refuses_the_shipped_detector_on_another_benchmark(tiny_data, tmp_path):
    with pytest.raises(DatasetError, match="another benchmark config"):
        check_data_matches(shipped_checkpoint(), tiny_data)
    result = CliRunner().invoke(extract_app, ["--ckpt", str(shipped_checkpoint()), "--data", str(tiny_data),
                                              "--out", str(tmp_path / "s")])
    assert result.exit_code == 2 and "another benchmark config" in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "s").exists()


def test_other_checkpoints_are_not_checked_against_the_benchmark(tiny_ckpt, tiny_data):
    check_data_matches(tiny_ckpt, tiny_data)  # no error: only shipped files carry a benchmark


@pytest.mark.slow
def test_shipped_detector_reproduces_its_recorded_val_ap(tmp_path):
    record = ShippedDetector.read()
    data = generate(SynthConfig(), tmp_path / "data", progress=False)
    check_data_matches(shipped_checkpoint(), data)
    metrics = evaluate_detector(ckpt=shipped_checkpoint(), data=data, out_dir=tmp_path / "eval", combines=("orig",),
                                progress=False).rows["orig"]
    assert metrics.num_images == record.val["images"]
    for iou in ("segm", "bbox"):
        for key in ("AP", "AP1", "AP4"):
            assert getattr(metrics, iou).summary[key] == pytest.approx(record.val[iou][key], abs=0.003), (iou, key)

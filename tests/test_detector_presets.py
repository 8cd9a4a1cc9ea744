"""Detector recipes (presets), training snapshots and their val-evaluation hook."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from cache_schema.errors import ConfigError
from extract.detectors.arch import DetectorArch
from extract.detectors.checkpoint import load_detector
from extract.detectors.presets import PRESETS, get_preset
from extract.detectors.toy import ToyShapes, tiny_arch
from extract.detectors.train import SNAPSHOT_DIR, run_training
from extract.detectors.train_config import DetectorTrainConfig
from serve.evaluate import evaluate_detector
from serve.snapshot_eval import LOG_NAME, SnapshotEval, read_val_log
from serve.umbrella import app


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_builds_a_valid_arch_and_schedule(name):
    preset = get_preset(name)
    arch = preset.arch(num_classes=200)
    assert isinstance(arch, DetectorArch) and arch.num_classes == 200
    for field, value in preset.arch_changes.items():
        assert getattr(arch, field) == value
    assert DetectorTrainConfig.from_dict(preset.train.to_dict()) == preset.train
    assert preset.train.total_steps(3200) >= 1


def test_embedded_preset_trains_several_epochs_and_logs_val():
    train = get_preset("embedded").train
    assert train.epochs >= 4 and train.snapshot_every is not None
    assert train.total_steps(3200) == int(train.epochs * 3200 / train.global_batch)


def test_unknown_preset_is_one_line(tmp_path):
    with pytest.raises(ConfigError, match="unknown detector preset 'nope'"):
        get_preset("nope")
    result = CliRunner().invoke(app, ["detector", "train", "--data", str(tmp_path), "--out", str(tmp_path / "r"),
                                      "--preset", "nope"])
    assert result.exit_code == 2 and "unknown detector preset" in result.output


class _Record:
    """Snapshot hook that remembers what it got (module level, so it would pickle to workers)."""

    def __init__(self, log: Path) -> None:
        self.log = log

    def __call__(self, path: Path, step: int) -> None:
        with self.log.open("a") as f:
            f.write(json.dumps({"path": str(path), "step": step, "threads": torch.get_num_threads()}) + "\n")
        torch.set_num_threads(2)  # a hook changing threads must not change training's


def test_snapshots_every_n_steps_and_at_the_end(tmp_path):
    data = ToyShapes(num_images=8, seed=0)
    config = DetectorTrainConfig(max_steps=5, lr=0.02, warmup_steps=2, processes=1, threads_per_process=1,
                                 checkpoint_every=100, time_budget_s=None, seed=1, snapshot_every=2)
    log = tmp_path / "hook.jsonl"
    final = run_training(dataset=data, categories=data.categories, out_dir=tmp_path / "run", config=config,
                         arch=tiny_arch(), progress=False, on_snapshot=_Record(log))
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    assert [c["step"] for c in calls] == [2, 4, 5]
    assert all(c["threads"] == 1 for c in calls)  # the hook ran in training's thread layout
    files = sorted((tmp_path / "run" / SNAPSHOT_DIR).glob("*.pt"))
    assert [f.name for f in files] == ["step_000002.pt", "step_000004.pt", "step_000005.pt"]
    last, done = load_detector(files[-1]), load_detector(final)
    for (k, a), b in zip(last.model.state_dict().items(), done.model.state_dict().values()):
        assert torch.equal(a, b), k  # the last snapshot is the final detector
    assert last.meta["steps_done"] == 5 and last.meta["snapshot"] is True
    early = load_detector(files[0]).model.state_dict()
    assert any(not torch.equal(early[k], v) for k, v in done.model.state_dict().items())


def test_snapshot_eval_logs_the_real_evaluation_once(tiny_ckpt, tiny_data, tmp_path):
    hook = SnapshotEval(data=tiny_data, run_dir=tmp_path, images=6, images_per_epoch=16, global_batch=2)
    hook(tiny_ckpt, 8)
    hook(tiny_ckpt, 8)  # already logged: not evaluated twice
    rows = read_val_log(tmp_path / LOG_NAME)
    assert len(rows) == 1 and rows[0]["step"] == 8 and rows[0]["epoch"] == 1.0 and rows[0]["images"] == 6
    direct = evaluate_detector(ckpt=tiny_ckpt, data=tiny_data, out_dir=tmp_path / "direct", combines=("orig",),
                               limit=6, progress=False).rows["orig"]
    assert rows[0]["AP"] == direct.segm.summary["AP"] and rows[0]["box_AP"] == direct.bbox.summary["AP"]
    assert rows[0]["AP4"] == direct.segm.summary["AP4"]
    assert not list(tmp_path.glob(".eval_step_*"))  # its working folder is gone


def test_val_log_drops_a_torn_last_line(tmp_path):
    path = tmp_path / LOG_NAME
    path.write_text('{"step": 1, "AP": 0.1}\n{"step": 2, "AP": 0.')
    assert read_val_log(path) == [{"step": 1, "AP": 0.1}]
    assert read_val_log(tmp_path / "missing.jsonl") == []


def test_eval_images_must_not_be_negative(tiny_data, tmp_path):
    result = CliRunner().invoke(app, ["detector", "train", "--data", str(tiny_data), "--out", str(tmp_path / "r"),
                                      "--eval-images", "-1"])
    assert result.exit_code == 2 and "--eval-images -1" in result.output

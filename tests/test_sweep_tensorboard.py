"""TensorBoard runs of sweep trials: the scalars read back equal the training log at its steps, AP
points land at their steps, and rewriting a run replaces it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from cache_schema.errors import ConfigError
from heads.config import config_from_dict, config_to_dict
from heads.sources import InMemoryRoiSource
from heads.sweep.tensorboard import run_name, write_sweep_events, write_trial_events
from heads.train import train_head
from tests.test_sweep_plots import metrics
from tests.test_train_heads_support import detector_state, make_world


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A real 20-step head run with the val monitor every 10 steps and a FASA-free log."""
    roiset, info, _ = make_world(seed=0, num_images=30, num_classes=6, feature_shape=(4, 2, 2))
    config = config_from_dict({"schedule": {"max_steps": 20, "milestones": [15], "lr": 0.05},
                               "run": {"seed": 1, "log_interval": 5, "device": "cpu", "threads": 1},
                               "eval": {"interval": 10}})
    out = tmp_path_factory.mktemp("tb") / "run"
    train_head(config=config, source=InMemoryRoiSource(roiset=roiset, num_classes=6), class_info=info,
               init_state=detector_state(in_features=16, hidden=8, num_classes=6), out_dir=out, val=roiset,
               progress=False)
    return out


def scalars(run_logdir: Path) -> dict[str, list[tuple[int, float]]]:
    acc = EventAccumulator(str(run_logdir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_scalars_equal_the_log_at_its_steps(run_dir, tmp_path):
    log = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    ap_points = [(10, metrics(0.1, bins=(0.0, 0.05, 0.1, 0.2))), (20, metrics(0.2, bins=(-1.0, 0.1, 0.2, 0.3)))]
    out = write_trial_events(run_dir, tmp_path, name="trial-a", ap_points=ap_points)
    assert out == tmp_path / "trial-a"
    got = scalars(out)
    for key in ("loss", "lr", "rois_per_step"):
        assert [s for s, _ in got[f"train/{key}"]] == [r["step"] for r in log] == [5, 10, 15, 20]
        assert [v for _, v in got[f"train/{key}"]] == pytest.approx([r[key] for r in log], rel=1e-6)
    val_records = [r for r in log if "acc_fg" in r]
    assert [r["step"] for r in val_records] == [10, 20]
    for key in ("acc_fg", "acc_bin1", "acc_bin2", "acc_bin3", "acc_bin4"):
        want = [(r["step"], r[key]) for r in val_records if r[key] is not None]
        assert [s for s, _ in got.get(f"val/{key}", [])] == [s for s, _ in want]
        assert [v for _, v in got.get(f"val/{key}", [])] == pytest.approx([v for _, v in want], rel=1e-6)
    assert not any(tag.startswith("val/n_") for tag in got)  # RoI counts are not curves
    assert got["eval/AP"] == [(10, pytest.approx(10.0)), (20, pytest.approx(20.0))]
    assert got["eval/AP1"] == [(10, pytest.approx(0.0))]  # AP1 = -1 at step 20: no category, no point
    assert got["eval/AP4"] == [(10, pytest.approx(20.0)), (20, pytest.approx(30.0))]


def test_rewriting_a_trial_replaces_its_events(run_dir, tmp_path):
    first = scalars(write_trial_events(run_dir, tmp_path, name="t", ap_points=[(20, metrics(0.1))]))
    out = write_trial_events(run_dir, tmp_path, name="t", ap_points=[(20, metrics(0.3))])
    assert len(list(out.glob("events.out.tfevents.*"))) == 1
    again = scalars(out)
    assert again["train/loss"] == first["train/loss"]  # no duplicated points
    assert again["eval/AP"] == [(20, pytest.approx(30.0))]


def test_run_names_cannot_leave_the_logdir(run_dir, tmp_path):
    for bad in ("../x", "a/b", "", ".hidden"):
        with pytest.raises(ConfigError, match="run name"):
            write_trial_events(run_dir, tmp_path, name=bad)


def test_sweep_events_one_run_per_trial(run_dir, tmp_path):
    sweep, train_id, trial_id = tmp_path / "sweep", "a" * 16, "b" * 16
    shutil.copytree(run_dir, sweep / "heads" / train_id)
    result = {"trial_id": trial_id, "train_id": train_id, "rule": "sel", "values": {"combine.T": 300},
              "config": config_to_dict(config_from_dict({})), "rows": {"orig": metrics(0.1), "sel": metrics(0.25)},
              "diagnostics": {"dynamics": [{"step": 10, "rows": {"sel": metrics(0.2)}}]}}
    (sweep / "results").mkdir()
    (sweep / "results" / f"{trial_id}.json").write_text(json.dumps(result))
    written = write_sweep_events(sweep)
    assert written == [sweep / "tensorboard" / run_name("combine.T=300", trial_id)]  # label + short id
    assert written[0].name == "combine.T=300-bbbbbbbb"
    got = scalars(written[0])
    assert got["eval/AP"] == [(10, pytest.approx(20.0)), (20, pytest.approx(25.0))]  # snapshot, then final
    assert [s for s, _ in got["train/loss"]] == [5, 10, 15, 20]

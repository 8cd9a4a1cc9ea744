"""``roicache demo`` end to end on a tiny configuration: every stage for real, then a second run
that must reuse every artefact (same numbers, no retraining, no re-extraction)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from serve.demo import SWEEP_RULES, SWEEP_T, DemoConfig, run_demo
from tests.pipeline_fixtures import TINY_DATA, TINY_EXTRACT, TINY_TRAIN

pytestmark = pytest.mark.slow

TINY_DEMO = DemoConfig(
    data=TINY_DATA, detector=TINY_TRAIN, train_detector=True, extract=TINY_EXTRACT, T=9.0, speed_steps=3,
    calibration={"schedule.max_steps": 40, "schedule.milestones": "30", "sampler.name": "bilevel",
                 "head.name": "3fc_ft", "loss.name": "ce", "run.threads": 1, "run.device": "cpu"})
ROWS = ("orig", "cal-only", "dual (sel, T=9)")


@pytest.fixture(scope="module")
def demo_runs(tmp_path_factory) -> tuple[Path, dict, dict]:
    out = tmp_path_factory.mktemp("demo") / "run"
    first = run_demo(out_dir=out, progress=False, config=TINY_DEMO)
    mtimes = {p: p.stat().st_mtime_ns for p in (out / "detector" / "detector.pt", out / "heads" / "simcal" / "head.pt")}
    second = run_demo(out_dir=out, progress=False, config=TINY_DEMO)
    assert {p: p.stat().st_mtime_ns for p in mtimes} == mtimes  # reused, not rewritten
    return out, first, second


def test_demo_table_rows_are_real_lvis_numbers(demo_runs):
    out, first, _ = demo_runs
    assert tuple(first["rows"]) == ROWS
    for name in ROWS:
        segm = first["rows"][name]["segm"]
        assert segm["num_detections"] > 0
        assert 0.0 <= segm["summary"]["AP"] <= 1.0
        for key in ("APr", "APc", "APf", "AP1", "AP2", "AP3", "AP4"):
            assert key in segm["summary"]
    # The rows are the full evaluation's own files, not copies of one another.
    full = json.loads((out / "eval_full" / "eval_summary.json").read_text())["rows"]
    assert first["rows"]["orig"] == full["orig"] and first["rows"]["dual (sel, T=9)"] == full["sel"]
    assert full["orig"] != full["cal-only"]
    assert first["detector_steps"]["steps_done"] == TINY_DEMO.detector.max_steps


def test_demo_speed_record_and_plots(demo_runs):
    out, first, _ = demo_runs
    speed = first["speed"]
    metrics = json.loads((out / "heads" / "simcal" / "metrics.json").read_text())
    assert speed["cached_steps_per_s"] == metrics["steps_per_second"] and speed["cached_steps"] == 40
    assert speed["steps"] == 3 and speed["online_steps_per_s"] > 0
    assert speed["speedup"] == pytest.approx(speed["cached_steps_per_s"] / speed["online_steps_per_s"])
    for name in ("ap_by_bin.png", "ap_per_class.png"):
        assert (out / "plots" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_second_demo_run_reuses_everything(demo_runs):
    _, first, second = demo_runs
    assert second["rows"] == first["rows"] and second["speed"] == first["speed"]
    assert second["timings"]["detector"] < 1.0 and second["timings"]["extract"] < 5.0
    assert second["timings"]["calibrate"] < 5.0
    # inject writes the same bytes again, so the finished full evaluation is found and reused.
    assert second["timings"]["full_eval"] < 5.0


def test_demo_sweep_has_every_rule_and_threshold_from_one_head(demo_runs):
    out, first, second = demo_runs
    results = [json.loads(p.read_text()) for p in (out / "sweep" / "results").glob("*.json")]
    assert len(results) == len(SWEEP_RULES) + len(SWEEP_T)
    assert len({r["train_id"] for r in results}) == 1  # combine axes reuse one trained head
    assert {r["rule"] for r in results} == {*SWEEP_RULES, "sel"}
    assert sorted(r["config"]["combine"]["T"] for r in results if r["rule"] == "sel") == sorted(SWEEP_T)
    # T = 0: no class has at most 0 training instances, so sel is the original head exactly.
    zero = next(r for r in results if r["rule"] == "sel" and r["config"]["combine"]["T"] == 0.0)
    assert zero["rows"]["sel"]["segm"]["summary"] == zero["rows"]["orig"]["segm"]["summary"]
    assert second["sweep_table"] == first["sweep_table"] and (out / "sweep" / "table.md").is_file()


def test_demo_sweep_reuses_step_4s_head_which_is_the_head_it_would_train(demo_runs, tmp_path):
    """The sweep gets a copy of the calibrated head instead of training it again; trained by the
    sweep itself (a fresh directory, the same grid's base), the head is the same bit for bit."""
    import torch

    from heads.sweep.grid import SweepGrid
    from heads.sweep.runner import run_sweep
    from serve.demo import _demo_grid

    out, first, _ = demo_runs
    assert first["sweep_heads_trained"] == 0
    base = SweepGrid(base=_demo_grid(TINY_DEMO).base, axes=(), source="<test>")
    own = run_sweep(cache=str(out / "cache.zarr"), grid=base, out_dir=tmp_path / "own", jobs=1, progress=False)
    assert own.trained == 1
    (trained,) = (tmp_path / "own" / "heads").iterdir()
    (copied,) = (out / "sweep" / "heads").iterdir()
    assert trained.name == copied.name  # the same training identity
    a, b = (torch.load(d / "head.pt", map_location="cpu", weights_only=False)["state_dict"] for d in (trained, copied))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

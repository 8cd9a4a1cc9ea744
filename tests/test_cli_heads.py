"""Acceptance of the ``heads`` command (train / eval) on the tiny real store (issue 4).

Every run here is real: the session's tiny detector and store (``tests/conftest.py``), typer's
``CliRunner`` on ``heads.cli.app``, the LVIS API for the AP tables. Heads train 30 steps only.
"""

from __future__ import annotations

import json
import shutil
import tomllib
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from cache_schema import finalize, open_store
from cache_schema.head_init import read_head_weights
from cache_schema.runtime import sha256_file
from extract.detectors.toy import tiny_arch
from extract.detectors.train import train_detector
from heads.build import build_sampler
from heads.cli import app
from heads.combine import RULES, Combination
from heads.config import load_config
from heads.losses import LOSSES
from heads.models import HEADS, load_head
from heads.pipeline import choose_source
from heads.samplers import SAMPLERS
from heads.train import train_head
from tests.pipeline_fixtures import TINY_DATA, TINY_TRAIN, build_store

RUNNER = CliRunner()
TRAIN_ARGS = ["--steps", "30", "--milestones", "20", "--seed", "5", "--quiet"]


def run_cli(*args: str):
    return RUNNER.invoke(app, [str(a) for a in args])


def error_line(result) -> str:
    """The single ``error:`` line of a failed command (exit 2, nothing else on stderr)."""
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("error: ")
    return lines[0]


def state_of(path: Path) -> dict[str, torch.Tensor]:
    head, _, _ = load_head(path)
    return {k: v.detach().clone() for k, v in head.state_dict().items()}


def log_records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def trained(tiny_store, tmp_path_factory) -> Path:
    """``heads train`` (3fc_ft, bilevel, ce — the defaults) for 30 steps, no final eval."""
    out = tmp_path_factory.mktemp("heads_cli") / "run"
    result = run_cli("train", "--cache", tiny_store, "--out", out, "--no-eval", *TRAIN_ARGS)
    assert result.exit_code == 0, result.output
    assert "head written to" in result.stdout and "30 steps" in result.stdout
    return out


@pytest.fixture(scope="module")
def other_store(tiny_data, tmp_path_factory) -> Path:
    """A store of a second tiny detector (other seed, 5 steps) on the same data."""
    root = tmp_path_factory.mktemp("other_detector")
    arch = replace(tiny_arch(num_classes=TINY_DATA.num_classes, image_size=TINY_DATA.image_size),
                   rpn_post_nms_top_n_test=24)
    ckpt = train_detector(data_dir=tiny_data, out_dir=root / "detector", arch=arch, progress=False,
                          config=replace(TINY_TRAIN, seed=1, max_steps=5))
    return build_store(ckpt, tiny_data, root / "store.zarr", levels=("pooled",))


# ----------------------------------------------------------------------------- train


def test_train_writes_head_metrics_log_and_resolved_config(trained, tiny_store, tiny_ckpt):
    names = {p.name for p in trained.iterdir()}
    assert {"head.pt", "metrics.json", "log.jsonl", "config.toml", "config.json", "last.pt"} <= names
    cfg = tomllib.loads((trained / "config.toml").read_text())
    assert cfg["run"]["seed"] == 5
    assert cfg["schedule"]["max_steps"] == 30 and cfg["schedule"]["milestones"] == [20]
    assert (cfg["sampler"]["name"], cfg["loss"]["name"], cfg["head"]["name"]) == ("bilevel", "ce", "3fc_ft")
    # The TOML written is the resolved config: reading it back gives the same settings as config.json.
    assert json.loads((trained / "config.json").read_text()) == {k: v for k, v in cfg.items()}
    metrics = json.loads((trained / "metrics.json").read_text())
    assert metrics["steps"] == 30 and metrics["resumed_from"] == 0 and np.isfinite(metrics["final_loss"])
    records = log_records(trained)
    assert records[-1]["step"] == 30
    # lr of the last step: 0.01 x 0.1 once step 20 is passed.
    assert records[-1]["lr"] == pytest.approx(0.001)
    assert records[-1]["loss"] == pytest.approx(metrics["final_loss"])
    head, spec, meta = load_head(trained / "head.pt")
    assert (spec.name, spec.level, spec.num_classes) == ("3fc_ft", "pooled", 6)
    assert meta["seed"] == 5 and meta["config"]["run"]["seed"] == 5
    assert meta["store"]["detector_sha256"] == sha256_file(tiny_ckpt)
    store = open_store(tiny_store)
    assert meta["instance_count"] == [int(v) for v in store.classes.instance_count]
    # 30 SGD steps moved the classifier away from the detector's layer it started from.
    init = read_head_weights(store)
    moved = (head.cls.weight.detach() - torch.from_numpy(init["cls.weight"]).float()).abs().max()
    assert float(moved) > 1e-5


@pytest.mark.parametrize(("flag", "valid"), [("--sampler", SAMPLERS), ("--loss", LOSSES), ("--head", HEADS)])
def test_unknown_plugin_name_is_one_line_listing_valid_names(flag, valid, tiny_store, tmp_path):
    result = run_cli("train", "--cache", tiny_store, "--out", tmp_path / "run", flag, "nope", *TRAIN_ARGS)
    line = error_line(result)
    assert "'nope'" in line
    assert all(name in line for name in valid)
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_store_without_needed_level_is_refused(tiny_ckpt, tiny_data, tmp_path):
    fc_only = build_store(tiny_ckpt, tiny_data, tmp_path / "fc.zarr", levels=("fc",))
    result = run_cli("train", "--cache", fc_only, "--out", tmp_path / "run", "--head", "3fc_ft", *TRAIN_ARGS)
    line = error_line(result)
    assert "'pooled'" in line and "--levels pooled" in line and "3fc_ft" in line
    assert not (tmp_path / "run" / "head.pt").exists()


def test_head_of_another_detector_is_refused_by_eval(trained, other_store):
    result = run_cli("eval", "--cache", other_store, "--head", trained, "--quiet")
    line = error_line(result)
    assert "another detector" in line and "detector_sha256" in line and "heads train" in line


def _poison_train_image(store_path: Path, position: int) -> None:
    """Overwrite image ``position``'s pooled features with NaN through the store's own writer."""
    store = open_store(store_path, mode="r+")
    split = store.split("train")
    k, n = split.stride, int(split.num_rois()[position])
    arrays = {path: np.asarray(split.array(path)[position * k: position * k + n])
              for path in split.roi_array_paths()}
    arrays["feat/pooled"] = np.full_like(arrays["feat/pooled"], np.nan)
    store.invalidate(split="train", images=[position])
    split.write_image(position, arrays=arrays)
    assert finalize(store)


def test_nan_features_stop_training_with_one_line(tiny_store, tmp_path):
    copy = tmp_path / "store.zarr"
    shutil.copytree(tiny_store, copy)
    # Poison an image the seeded sampler draws at step 0, so the check must fire on it.
    store = open_store(copy)
    cfg = load_config(None, {"run.seed": 5})
    source = choose_source(store, "pooled", stream="never")
    sampler = build_sampler(cfg.sampler, index=source.index, class_info=store.classes, seed=5)
    block = int(source.index.blocks_of_rows(sampler.batch(0).rows)[0])
    _poison_train_image(copy, int(source.index.images[block]))
    result = run_cli("train", "--cache", copy, "--out", tmp_path / "run", "--no-eval", *TRAIN_ARGS)
    line = error_line(result)
    assert "NaN" in line and "train step 0" in line and "re-extract" in line
    assert not (tmp_path / "run" / "metrics.json").exists() and not (tmp_path / "run" / "head.pt").exists()


class _Crash(Exception):
    pass


class _CrashAfter:
    """A real RoI source that dies on its ``calls+1``-th gather (a crash mid-run)."""

    def __init__(self, source, *, calls: int) -> None:
        self.source, self.index, self.left = source, source.index, calls

    @property
    def feature_shape(self):
        return self.source.feature_shape

    def gather(self, rows):
        if self.left == 0:
            raise _Crash("simulated crash")
        self.left -= 1
        return self.source.gather(rows)


def test_interrupted_run_resumes_to_the_uninterrupted_weights(tiny_store, tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text("[run]\ncheckpoint_interval = 20\nlog_interval = 10\n")
    args = ["--config", toml, "--steps", "40", "--milestones", "30", "--seed", "3", "--no-eval", "--quiet"]
    whole = tmp_path / "whole"
    assert run_cli("train", "--cache", tiny_store, "--out", whole, *args).exit_code == 0

    # First attempt: the same settings, crashing during step 25 (last.pt holds step 20).
    cut = tmp_path / "cut"
    store = open_store(tiny_store)
    cfg = load_config(toml, {"schedule.max_steps": 40, "schedule.milestones": "30", "run.seed": 3})
    source = _CrashAfter(choose_source(store, "pooled", stream="never"), calls=25)
    with pytest.raises(_Crash):
        train_head(config=cfg, source=source, class_info=store.classes, init_state=read_head_weights(store),
                   out_dir=cut, progress=False, init_from=store.meta.detector.checkpoint_sha256)
    assert torch.load(cut / "last.pt", weights_only=True)["step"] == 20
    assert not (cut / "head.pt").exists() and not (cut / "metrics.json").exists()
    assert [r["step"] for r in log_records(cut)] == [10, 20]

    # Second attempt: the plain command on the same folder resumes at 20 and ends as `whole`.
    result = run_cli("train", "--cache", tiny_store, "--out", cut, *args)
    assert result.exit_code == 0, result.output
    assert json.loads((cut / "metrics.json").read_text())["resumed_from"] == 20
    assert json.loads((whole / "metrics.json").read_text())["resumed_from"] == 0
    a, b = state_of(whole / "head.pt"), state_of(cut / "head.pt")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    strip = lambda recs: [{k: v for k, v in r.items() if k != "seconds"} for r in recs]  # noqa: E731
    assert strip(log_records(cut)) == strip(log_records(whole))
    assert [r["step"] for r in log_records(whole)] == [10, 20, 30, 40]


# ----------------------------------------------------------------------------- cached eval


def _results(path: Path) -> list[dict]:
    return json.loads(path.read_text())


def test_cached_eval_sel_T0_is_orig_and_T_huge_is_cal_only(trained, tiny_store, tmp_path):
    low, high = tmp_path / "T0", tmp_path / "Thuge"
    r0 = run_cli("eval", "--cache", tiny_store, "--head", trained, "--combine", "orig,sel", "--T", "0",
                 "--out", low, "--quiet")
    r1 = run_cli("eval", "--cache", tiny_store, "--head", trained, "--combine", "cal-only,sel", "--T", "1e9",
                 "--out", high, "--quiet")
    assert r0.exit_code == 0 and r1.exit_code == 0, (r0.output, r1.output)
    rows0 = json.loads((low / "eval_summary.json").read_text())["rows"]
    rows1 = json.loads((high / "eval_summary.json").read_text())["rows"]
    # Every class has >= 1 training instance: T=0 selects no calibrated score, T=1e9 all of them.
    assert rows0["sel"] == rows0["orig"]
    assert rows1["sel"] == rows1["cal-only"]
    assert _results(low / "results_sel.json") == _results(low / "results_orig.json")
    assert _results(high / "results_sel.json") == _results(high / "results_cal-only.json")
    # ... and the two heads really differ, so the equalities above are not vacuous.
    assert _results(low / "results_orig.json") != _results(high / "results_cal-only.json")
    assert rows0["orig"]["segm"]["num_detections"] > 0
    # The table printed on stdout has one row per scheme.
    assert [line.split()[0] for line in r0.stdout.splitlines()[2:]] == ["orig", "sel"]


def test_cached_eval_unknown_combine_lists_schemes(trained, tiny_store):
    line = error_line(run_cli("eval", "--cache", tiny_store, "--head", trained, "--combine", "orig,bogus", "--quiet"))
    assert "bogus" in line and all(name in line for name in RULES)


def test_cached_eval_unknown_evaluator_is_one_line(trained, tiny_store):
    line = error_line(run_cli("eval", "--cache", tiny_store, "--head", trained, "--evaluator", "exact", "--quiet"))
    assert "exact" in line and all(name in line for name in ("auto", "fast", "lvis-api"))


def test_cached_eval_results_carry_boxes_and_the_evaluator_note(trained, tiny_store, tmp_path):
    result = run_cli("eval", "--cache", tiny_store, "--head", trained, "--combine", "sel", "--out", tmp_path, "--quiet")
    assert result.exit_code == 0, result.output
    results = _results(tmp_path / "results_sel.json")
    assert results and all("bbox" in r and "segmentation" not in r for r in results)  # masks were never pasted
    notes = json.loads((tmp_path / "metrics_sel.json").read_text())["notes"]
    assert any(n.startswith("evaluator: fast") for n in notes)


# ----------------------------------------------------------------------------- the [combine] section


RECORDED = Combination(rule="sel-thr", T=9, boundary="lt", thr=0.4, scale_ratio="orig/cal")


@pytest.fixture(scope="module")
def trained_combine(tiny_store, tmp_path_factory) -> Path:
    """``heads train`` whose combination flags set the run's ``[combine]``; with the final evaluation."""
    out = tmp_path_factory.mktemp("heads_cli_combine") / "run"
    result = run_cli("train", "--cache", tiny_store, "--out", out, *TRAIN_ARGS, "--combine", "sel-thr", "--T", "9",
                     "--boundary", "lt", "--thr", "0.4", "--scale-ratio", "orig/cal")
    assert result.exit_code == 0, result.output
    return out


def test_train_records_the_combination_and_evaluates_with_it(trained_combine):
    cfg = tomllib.loads((trained_combine / "config.toml").read_text())
    assert Combination.from_dict(cfg["combine"]) == RECORDED
    _, _, meta = load_head(trained_combine / "head.pt")
    assert Combination.from_dict(meta["config"]["combine"]) == RECORDED
    summary = json.loads((trained_combine / "eval" / "eval_summary.json").read_text())
    assert list(summary["rows"]) == ["orig", "cal-only", "sel-thr"]  # the config's rule, besides the two heads
    assert summary["combinations"]["sel-thr"] == RECORDED.to_dict()


def test_train_with_a_toml_combine_section(tiny_store, tmp_path):
    toml = tmp_path / "c.toml"
    toml.write_text('[combine]\nrule = "sel"\nT = 100\nboundary = "lt"\nthr = 0.05\nscale_ratio = "orig/cal"\n')
    out = tmp_path / "run"
    result = run_cli("train", "--cache", tiny_store, "--out", out, "--config", toml, "--T", "inf", "--no-eval",
                     "--steps", "2", "--milestones", "1", "--quiet")
    assert result.exit_code == 0, result.output
    _, _, meta = load_head(out / "head.pt")
    assert Combination.from_dict(meta["config"]["combine"]) == Combination(T=float("inf"), boundary="lt",
                                                                           scale_ratio="orig/cal")
    assert "T = inf" in (out / "config.toml").read_text()  # TOML has inf; config.json says "inf"
    assert json.loads((out / "config.json").read_text())["combine"]["T"] == "inf"


def test_eval_defaults_to_the_head_runs_recorded_combination(trained_combine, tiny_store, tmp_path):
    rec, thr = tmp_path / "recorded", tmp_path / "thr"
    r = run_cli("eval", "--cache", tiny_store, "--head", trained_combine, "--combine", "sel-thr,orig", "--out", rec,
                "--quiet")
    assert r.exit_code == 0, r.output
    combos = json.loads((rec / "eval_summary.json").read_text())["combinations"]
    assert combos == {"sel-thr": RECORDED.to_dict(), "orig": RECORDED.override(rule="orig").to_dict()}
    # --thr overrides that one field; T, boundary and scale_ratio stay the recorded ones.
    r = run_cli("eval", "--cache", tiny_store, "--head", trained_combine, "--combine", "sel-thr", "--thr", "0.05",
                "--out", thr, "--quiet")
    assert r.exit_code == 0, r.output
    assert json.loads((thr / "eval_summary.json").read_text())["combinations"]["sel-thr"] == \
        RECORDED.override(thr=0.05).to_dict()
    assert _results(rec / "results_sel-thr.json") != _results(thr / "results_sel-thr.json")  # thr reached the result


def test_eval_of_a_head_with_default_combine_takes_the_record_defaults(trained, tiny_store, tmp_path):
    r = run_cli("eval", "--cache", tiny_store, "--head", trained, "--combine", "sel", "--out", tmp_path, "--quiet")
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "eval_summary.json").read_text())["combinations"] == {"sel": Combination().to_dict()}


@pytest.mark.parametrize("cmd,flags,words", [
    ("train", ["--T", "-1"], ["T=-1"]),
    ("train", ["--combine", "bogus"], ["bogus", "sel-thr"]),
    ("train", ["--thr", "1"], ["thr=1.0"]),
    ("eval", ["--boundary", "lte"], ["lte", "'le'"]),
    ("eval", ["--scale-ratio", "down"], ["down", "orig/cal"]),
])
def test_bad_combination_flags_are_one_line(cmd, flags, words, trained, tiny_store, tmp_path):
    where = ["--out", tmp_path / "run"] if cmd == "train" else ["--head", trained]
    line = error_line(run_cli(cmd, "--cache", tiny_store, *where, *flags, "--quiet"))
    assert all(w in line for w in words), line
    assert not (tmp_path / "run").exists()

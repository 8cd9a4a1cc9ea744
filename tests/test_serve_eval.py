"""Acceptance of ``serve eval`` (full inference, LVIS API) against plain and cached evaluation.

One full inference of an injected ``sel`` checkpoint over the 10 tiny val images scores
``orig``, ``cal-only`` and ``sel`` at T = 9, 0 and inf; one of the plain checkpoint scores
``orig``. Real parts only (session fixtures of ``tests/conftest.py``, ``CliRunner``).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from heads.combine import Combination
from heads.config import load_config
from heads.pipeline import evaluate_from_store, train_from_store
from serve.cli import app

RUNNER = CliRunner()
T_MIX = 9  # tiny train counts are 5..15: a real mix of calibrated and original classes


def run_cli(*args):
    return RUNNER.invoke(app, [str(a) for a in args])


def results(path: Path) -> list[dict]:
    return json.loads(path.read_text())


def summary(out: Path) -> dict:
    return json.loads((out / "eval_summary.json").read_text())


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("serve_eval")


@pytest.fixture(scope="module")
def head_run(tiny_store, work) -> Path:
    cfg = load_config(None, {"schedule.max_steps": 30, "schedule.milestones": "20", "run.seed": 5,
                             "run.device": "cpu"})
    return train_from_store(cache=str(tiny_store), config=cfg, out_dir=work / "run", progress=False).out_dir


@pytest.fixture(scope="module")
def injected_eval(tiny_ckpt, head_run, tiny_data, work) -> Path:
    ckpt, out = work / "sel.pt", work / "eval_sel"
    assert run_cli("inject", "--ckpt", tiny_ckpt, "--head", head_run, "--out", ckpt, "--T", T_MIX).exit_code == 0
    result = run_cli("eval", "--ckpt", ckpt, "--data", tiny_data, "--out", out, "--combine", "orig,cal-only,sel",
                     "--sweep-T", "0,inf", "--quiet")
    assert result.exit_code == 0, result.output
    assert "10 images" in result.stdout
    return out


@pytest.fixture(scope="module")
def plain_eval(tiny_ckpt, tiny_data, work) -> Path:
    out = work / "eval_plain"
    result = run_cli("eval", "--ckpt", tiny_ckpt, "--data", tiny_data, "--out", out, "--quiet")
    assert result.exit_code == 0, result.output
    return out


def test_rows_and_thresholds_of_a_sweep(injected_eval):
    s = summary(injected_eval)
    assert list(s["rows"]) == ["orig", "cal-only", f"sel@T={T_MIX}", "sel@T=0", "sel@T=inf"]
    assert s["T"] == {"orig": T_MIX, "cal-only": T_MIX, f"sel@T={T_MIX}": T_MIX, "sel@T=0": 0, "sel@T=inf": "inf"}
    assert s["images"] == 10


def test_sel_T0_equals_the_plain_detector(injected_eval, plain_eval):
    plain = results(plain_eval / "results_orig.json")
    assert len(plain) > 0
    assert results(injected_eval / "results_sel_T0.json") == plain
    assert results(injected_eval / "results_orig.json") == plain
    assert summary(injected_eval)["rows"]["sel@T=0"] == summary(plain_eval)["rows"]["orig"]


def test_sel_T_inf_equals_cal_only(injected_eval):
    cal = results(injected_eval / "results_cal-only.json")
    assert results(injected_eval / "results_sel_Tinf.json") == cal
    rows = summary(injected_eval)["rows"]
    assert rows["sel@T=inf"] == rows["cal-only"]
    # Not vacuous: the calibrated head ranks detections differently from the original one.
    assert cal != results(injected_eval / "results_orig.json")
    # sel at T=9 is neither: it takes cal scores for some classes only.
    mixed = results(injected_eval / f"results_sel_T{T_MIX}.json")
    assert mixed != cal and mixed != results(injected_eval / "results_orig.json")


def test_full_inference_matches_cached_evaluation(injected_eval, head_run, tiny_store):
    cached = evaluate_from_store(cache=str(tiny_store), head=head_run,
                                 combinations=Combination(T=T_MIX).per_rule(("orig", "cal-only", "sel")),
                                 out_dir=None, progress=False).rows
    full = summary(injected_eval)["rows"]
    pairs = {"orig": "orig", "cal-only": "cal-only", "sel": f"sel@T={T_MIX}"}
    for cached_name, full_name in pairs.items():
        c, f = cached[cached_name].to_dict(), full[full_name]
        for kind in ("segm", "bbox"):
            # Same RoIs, same heads; only the store's float16 features (and float32 batch-order
            # rounding of the logits) differ, ~1e-5 on a score — below any ranking change here.
            assert c[kind]["num_detections"] == f[kind]["num_detections"]
            assert abs(c[kind]["summary"]["AP"] - f[kind]["summary"]["AP"]) < 1e-6, (cached_name, kind)
            for cat, ap in c[kind]["per_category"].items():
                assert abs(ap - f[kind]["per_category"][cat]) < 1e-6, (cached_name, kind, cat)


def test_fast_evaluator_equals_the_lvis_api_on_a_real_store(head_run, tiny_store):
    rows = {ev: evaluate_from_store(cache=str(tiny_store), head=head_run,
                                    combinations=Combination(T=T_MIX).per_rule(("orig", "sel")),
                                    out_dir=None, progress=False, evaluator=ev).rows for ev in ("fast", "lvis-api")}
    for name in ("orig", "sel"):
        fast, api = rows["fast"][name], rows["lvis-api"][name]
        for kind in ("segm", "bbox"):
            # Bit-identical: mask IoUs from the stored pixel counts equal those of the pasted RLEs.
            assert getattr(fast, kind).summary == getattr(api, kind).summary, (name, kind)
            assert getattr(fast, kind).per_category == getattr(api, kind).per_category, (name, kind)
            assert getattr(fast, kind).num_detections == getattr(api, kind).num_detections > 0
        assert any(n.startswith("evaluator: fast") for n in fast.notes)
        assert any(n.startswith("evaluator: lvis-api") for n in api.notes)
    assert rows["fast"]["sel"].segm["AP"] > 0


def test_a_store_without_mask_overlaps_falls_back_to_the_lvis_api(head_run, tiny_store, tmp_path):
    import shutil

    import zarr

    from cache_schema.errors import SchemaError

    old = tmp_path / "old.zarr"
    shutil.copytree(tiny_store, old)
    zarr.open_group(str(old / "val"), mode="r+").attrs["mask_overlaps"] = 0  # as stores made before them
    orig = (Combination(rule="orig"),)
    auto = evaluate_from_store(cache=str(old), head=head_run, combinations=orig, out_dir=None, progress=False)
    note = [n for n in auto.rows["orig"].notes if n.startswith("evaluator")]
    assert note and "lvis-api" in note[0] and "re-extract val" in note[0]
    assert auto.rows["orig"].segm["AP"] == evaluate_from_store(
        cache=str(tiny_store), head=head_run, combinations=orig, out_dir=None, progress=False).rows["orig"].segm["AP"]
    with pytest.raises(SchemaError, match="--evaluator fast is not possible"):
        evaluate_from_store(cache=str(old), head=head_run, combinations=orig, out_dir=None, progress=False,
                            evaluator="fast")


# ----------------------------------------------------------------------------- thr and scale_ratio


@pytest.fixture(scope="module")
def thr_ckpt(tiny_ckpt, head_run, work) -> Path:
    """Injected with sel-thr at thr = 0.5 and sel-scale's orig/cal direction (not the defaults)."""
    ckpt = work / "sel_thr.pt"
    result = run_cli("inject", "--ckpt", tiny_ckpt, "--head", head_run, "--out", ckpt, "--combine", "sel-thr",
                     "--T", T_MIX, "--thr", "0.5", "--scale-ratio", "orig/cal")
    assert result.exit_code == 0, result.output
    return ckpt


def test_injected_thr_and_scale_ratio_reach_full_inference_as_cached(thr_ckpt, head_run, tiny_data, tiny_store, work):
    out = work / "eval_thr"
    result = run_cli("eval", "--ckpt", thr_ckpt, "--data", tiny_data, "--out", out, "--combine", "sel-thr,sel-scale",
                     "--quiet")
    assert result.exit_code == 0, result.output
    injected = Combination(T=T_MIX, thr=0.5, scale_ratio="orig/cal")
    assert summary(out)["combinations"] == {c.rule: c.to_dict() for c in injected.per_rule(("sel-thr", "sel-scale"))}
    full = summary(out)["rows"]
    cached = evaluate_from_store(cache=str(tiny_store), head=head_run,
                                 combinations=injected.per_rule(("sel-thr", "sel-scale")), out_dir=None, progress=False).rows
    defaults = evaluate_from_store(cache=str(tiny_store), head=head_run,
                                   combinations=Combination(T=T_MIX).per_rule(("sel-thr", "sel-scale")),
                                   out_dir=None, progress=False).rows
    for name in ("sel-thr", "sel-scale"):
        c, f = cached[name].to_dict(), full[name]
        for kind in ("segm", "bbox"):
            assert c[kind]["num_detections"] == f[kind]["num_detections"]
            assert abs(c[kind]["summary"]["AP"] - f[kind]["summary"]["AP"]) < 1e-6, (name, kind)
        # Not vacuous: the record's defaults (thr 0.05, cal/orig) give other detections.
        assert defaults[name].to_dict() != c, name


def test_serve_eval_flags_override_the_injected_combination_per_field(thr_ckpt, tiny_data, work):
    hi, lo = work / "eval_thr_hi", work / "eval_thr_lo"
    for out, flags in ((hi, ()), (lo, ("--thr", "0.05", "--boundary", "lt"))):
        result = run_cli("eval", "--ckpt", thr_ckpt, "--data", tiny_data, "--out", out, "--limit", 2, "--quiet", *flags)
        assert result.exit_code == 0, result.output
    assert list(summary(hi)["rows"]) == ["sel-thr"]  # the checkpoint's rule by default
    assert summary(hi)["combinations"]["sel-thr"] == Combination(rule="sel-thr", T=T_MIX, thr=0.5,
                                                                scale_ratio="orig/cal").to_dict()
    assert summary(lo)["combinations"]["sel-thr"] == Combination(rule="sel-thr", T=T_MIX, boundary="lt", thr=0.05,
                                                                scale_ratio="orig/cal").to_dict()
    assert results(hi / "results_sel-thr.json") != results(lo / "results_sel-thr.json")


def test_bad_serve_eval_override_is_one_line(thr_ckpt, tiny_data, work):
    result = run_cli("eval", "--ckpt", thr_ckpt, "--data", tiny_data, "--out", work / "e_bad_thr", "--thr", "2", "--quiet")
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "thr=2.0" in lines[0] and "[0, 1)" in lines[0]

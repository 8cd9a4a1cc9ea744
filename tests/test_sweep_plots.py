"""Sweep plots and per-class diagnostics: every plot is a readable PNG, write_plots draws what the
result files support, and the diagnostics equal hand-computed values."""

from __future__ import annotations

import json
import math
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest
import torch

from heads.config import config_from_dict, config_to_dict
from heads.evaluation import BinSpec
from heads.evaluation.metrics import SUMMARY_KEYS, IouMetrics, Metrics
from heads.models import HeadSpec, build_head, head_from_state
from heads.sweep.diagnostics import (
    classifier_weight_norms,
    mean_class_scores,
    snapshot_dynamics,
    trial_diagnostics,
)
from heads.sweep.plots import (
    ap_percent,
    plot_ap_bins,
    plot_dynamics,
    plot_mean_scores,
    plot_T_sweep,
    plot_weight_norms,
    read_trials,
    write_plots,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def metrics(ap: float, bins=(0.01, 0.05, 0.2, 0.4)) -> dict:
    """A real ``Metrics.to_dict()`` record: AP and AP1..AP4 as given (fractions), the rest 0.1."""
    summary = {k: 0.1 for k in SUMMARY_KEYS} | {"AP": ap} | {f"AP{i + 1}": b for i, b in enumerate(bins)}
    segm = IouMetrics(summary=summary, per_category={1: ap}, num_detections=10)
    return Metrics(segm=segm, bbox=None, bins=BinSpec.lvis(), num_images=5).to_dict()


def assert_png(path: Path) -> None:
    assert path.is_file() and path.read_bytes()[:8] == PNG_SIGNATURE
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[0] >= 200 and image.shape[1] >= 400
    assert float(image[..., :3].std()) > 0.01  # something was drawn, not a blank canvas


def test_ap_percent_reads_mask_then_box_and_marks_missing_as_nan():
    m = metrics(0.25)
    assert ap_percent(m, "AP") == pytest.approx(25.0) and ap_percent(m, "AP2") == pytest.approx(5.0)
    assert math.isnan(ap_percent(metrics(0.25, bins=(-1.0, 0.1, 0.1, 0.1)), "AP1"))
    box_only = {**m, "segm": None, "bbox": m["segm"]}
    assert ap_percent(box_only, "AP") == pytest.approx(25.0)
    assert math.isnan(ap_percent(m, "APx"))


def test_each_plot_writes_a_png(tmp_path):
    counts = np.array([1, 3, 8, 40, 200, 2000, 0])
    written = [
        plot_ap_bins({"orig": metrics(0.1), "sel T=300": metrics(0.2, bins=(0.1, 0.15, 0.2, 0.3))}, tmp_path / "a.png"),
        plot_dynamics({"run": [(100, metrics(0.1)), (50, metrics(0.05)), (200, metrics(0.2))]}, tmp_path / "d.png"),
        plot_T_sweep([(300.0, metrics(0.2)), (math.inf, metrics(0.15)), (0.0, metrics(0.1))], tmp_path / "t.png",
                     reference={"orig": metrics(0.1), "cal-only": metrics(0.15)}),
        plot_weight_norms({"3fc_ft": np.linspace(0.5, 2.0, 7), "lastfc": np.linspace(1.0, 1.5, 7)}, counts,
                          tmp_path / "w.png"),
        plot_mean_scores({"3fc_ft": np.array([0.1, np.nan, 0.3, 0.4, 0.5, 0.6, np.nan])}, counts, tmp_path / "s.png"),
    ]
    assert written == [tmp_path / n for n in ("a.png", "d.png", "t.png", "w.png", "s.png")]
    for path in written:
        assert_png(path)


def test_plots_are_deterministic(tmp_path):
    rows = {"orig": metrics(0.1), "b": metrics(0.3)}
    a, b = plot_ap_bins(rows, tmp_path / "1.png"), plot_ap_bins(rows, tmp_path / "2.png")
    assert np.array_equal(matplotlib.image.imread(a), matplotlib.image.imread(b))


# ----------------------------------------------------------------------------- write_plots
def _config(rule: str, T: float, **sections) -> dict:
    return config_to_dict(config_from_dict({"combine": {"rule": rule, "T": T}, **sections}))


def _result(trial: str, train: str, *, rule: str, T: float, axes: dict, ap: float, diagnostics=None) -> dict:
    """A result file in the shape `heads sweep` writes (heads.sweep.results.TrialResult.to_dict)."""
    rows = {"orig": metrics(0.1)} | ({} if rule == "orig" else {rule: metrics(ap)})
    d = {"format": "roicache.sweep-trial", "format_version": 1, "trial_id": trial, "train_id": train,
         "config": _config(rule, T), "values": axes, "label": ", ".join(f"{k}={v}" for k, v in axes.items()),
         "store": {}, "rule": rule, "rows": rows, "train_seconds": 1.0, "steps_per_second": 10.0, "seed": 0}
    if diagnostics is not None:
        d["diagnostics"] = diagnostics
    return d


def _write(sweep: Path, results: list[dict]) -> None:
    (sweep / "results").mkdir(parents=True)
    for r in results:
        (sweep / "results" / f"{r.get('trial_id') or r['trial']}.json").write_text(json.dumps(r))


HEAD_A, HEAD_B = "a" * 16, "b" * 16


def _diagnostics(scale: float) -> dict:
    return {"weight_norms": [scale, 2 * scale, 3 * scale], "mean_scores": [0.1, None, 0.5],
            "instance_count": [2, 30, 500],
            "dynamics": [{"step": s, "rows": {"cal-only": metrics(s / 1000)}} for s in (100, 200, 300)]}


def test_write_plots_draws_what_the_results_support(tmp_path):
    sweep = tmp_path / "sweep"
    results = [_result(f"{i:016x}", HEAD_A, rule="sel", T=t, axes={"sampler.name": "bilevel", "combine.T": t},
                       ap=0.2 + 0.01 * i, diagnostics=_diagnostics(1.0)) for i, t in enumerate((100, 300, math.inf))]
    results[2]["config"]["combine"]["T"] = "inf"  # how config_to_dict writes T = inf in JSON
    results.append(_result("f" * 16, HEAD_B, rule="cal-only", T=300, axes={"sampler.name": "rfs", "combine.T": 300},
                           ap=0.15, diagnostics=_diagnostics(2.0)))
    _write(sweep, results)
    written = write_plots(sweep)
    names = [p.name for p in written]
    assert names == ["ap_bins.png", f"T_sweep_{HEAD_A}_sel.png", "dynamics.png", "weight_norms.png",
                     "mean_scores.png"]
    assert all(p.parent == sweep / "plots" for p in written)
    for path in written:
        assert_png(path)
    trials = read_trials(sweep)
    assert [t.T for t in trials[:3]] == [100.0, 300.0, math.inf]
    assert trials[0].head_label == "sampler.name=bilevel"  # combine.* does not name a head


def test_write_plots_without_diagnostics_or_T_axis_draws_the_bars_only(tmp_path):
    sweep = tmp_path / "sweep"
    # The brief's naming variant (``trial``, ``axes``, rule only in the config) is read as well.
    loose = {"trial": "c" * 16, "train_id": HEAD_A, "config": _config("sel", 300), "axes": {"loss.name": "focal"},
             "rows": {"orig": metrics(0.1), "sel": metrics(0.2)}}
    _write(sweep, [loose, _result("d" * 16, HEAD_B, rule="orig", T=300, axes={"loss.name": "ce"}, ap=0.1)])
    (sweep / "results" / "broken.json").write_text("{not json")  # a half-written file is skipped
    written = write_plots(sweep)
    assert [p.name for p in written] == ["ap_bins.png"]
    trial = read_trials(sweep)[0]
    assert trial.rule == "sel" and trial.label == "loss.name=focal"


def test_write_plots_of_an_empty_sweep(tmp_path):
    assert write_plots(tmp_path) == []


# ----------------------------------------------------------------------------- diagnostics
def _spec(name: str, *, in_shape, hidden: int) -> HeadSpec:
    level = "fc" if name in ("lastfc", "ncm") else "pooled"
    return HeadSpec(name=name, level=level, in_shape=in_shape, num_classes=3, hidden=hidden, loss="ce")


def test_classifier_weight_norms_are_the_class_rows_norms():
    rows = torch.tensor([[3.0, 4.0], [0.0, 0.0], [1.0, 0.0], [5.0, 12.0]])  # class 0..2, background
    lastfc_spec = _spec("lastfc", in_shape=(2,), hidden=0)
    lastfc = head_from_state(lastfc_spec, {"cls.weight": rows, "cls.bias": torch.ones(4)}, where="test")
    np.testing.assert_allclose(classifier_weight_norms(lastfc, lastfc_spec), [5.0, 0.0, 1.0])
    spec3 = _spec("3fc_rand", in_shape=(2, 1, 1), hidden=2)
    head3 = build_head(spec3, init_state=None, seed=0)
    with torch.no_grad():
        head3.cls.weight.copy_(torch.tensor([[6.0, 8.0], [1.0, 1.0], [0.0, 2.0], [9.0, 9.0]]))
    np.testing.assert_allclose(classifier_weight_norms(head3, spec3), [10.0, math.sqrt(2.0), 2.0])
    ncm_spec = _spec("ncm", in_shape=(2,), hidden=0)
    ncm = build_head(ncm_spec, init_state=None, seed=0)
    ncm.set_means(sums=torch.tensor([[6.0, 8.0], [0.0, 0.0], [2.0, 0.0], [1.0, 1.0]], dtype=torch.float64),
                  counts=torch.tensor([2, 0, 1, 5]))
    norms = classifier_weight_norms(ncm, ncm_spec)
    assert norms[0] == pytest.approx(5.0) and math.isnan(norms[1]) and norms[2] == pytest.approx(2.0)


def test_mean_class_scores_on_a_hand_derived_example():
    probs = np.array([[0.6, 0.1, 0.0, 0.3],    # class 0
                      [0.2, 0.5, 0.0, 0.3],    # class 0
                      [0.1, 0.7, 0.1, 0.1],    # class 1
                      [0.9, 0.0, 0.0, 0.1]],   # background (label C = 3): left out
                     dtype=np.float32)
    labels = np.array([0, 0, 1, 3], dtype=np.int64)
    got = mean_class_scores(probs, labels, 3)
    assert got.dtype == np.float64 and got.shape == (3,)
    np.testing.assert_allclose(got[:2], [(0.6 + 0.2) / 2, 0.7], rtol=1e-6)
    assert math.isnan(got[2])  # class 2 has no val RoI


# ----------------------------------------------------------------------------- on a real store
@pytest.fixture(scope="module")
def snapshot_run(tiny_store, tmp_path_factory) -> Path:
    from heads.pipeline import train_from_store

    config = config_from_dict({"head": {"name": "lastfc"}, "schedule": {"max_steps": 6, "milestones": [5]},
                               "run": {"device": "cpu", "threads": 1, "log_interval": 2},
                               "eval": {"snapshots": [3, 6]}})
    out = tmp_path_factory.mktemp("diag") / "run"
    train_from_store(cache=str(tiny_store), config=config, out_dir=out, progress=False)
    return out


def test_trial_diagnostics_and_dynamics_of_a_real_head(tiny_store, snapshot_run):
    from cache_schema import open_store
    from heads.models import load_head
    from heads.pipeline import load_eval_inputs

    store = open_store(str(tiny_store))
    inputs = load_eval_inputs(store, levels=("fc",))  # lastfc reads fc
    diag = trial_diagnostics(inputs, snapshot_run)
    c = store.classes.num_classes
    assert set(diag) == {"weight_norms", "mean_scores", "instance_count"}
    assert all(len(v) == c for v in diag.values())
    head, spec, _ = load_head(snapshot_run / "head.pt")
    np.testing.assert_allclose(diag["weight_norms"], classifier_weight_norms(head, spec))
    assert all(v is None or 0.0 <= v <= 1.0 for v in diag["mean_scores"])
    json.dumps(diag, allow_nan=False)  # strict JSON: NaN became null
    dynamics = snapshot_dynamics(inputs=inputs, run_dir=snapshot_run)
    assert [p["step"] for p in dynamics] == [3, 6] and all(set(p["rows"]) == {"cal-only"} for p in dynamics)
    assert all(-1.0 <= p["rows"]["cal-only"]["bbox"]["summary"]["AP"] <= 1.0 for p in dynamics)

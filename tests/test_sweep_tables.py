"""The sweep's tables (issue 12): seeds aggregated per configuration, median / mean ± std, orig first.

Pure tests on hand-made result records (no store).
"""

from __future__ import annotations

import csv
import io
import statistics

import pytest

from cache_schema.errors import SchemaError
from heads.config import config_from_dict, config_to_dict
from heads.evaluation import BinSpec, IouMetrics, Metrics
from heads.evaluation.metrics import SUMMARY_KEYS
from heads.sweep.results import PlannedTrial, SweepRecord, TrialResult
from heads.sweep.tables import build_rows, csv_text, markdown_text


def metrics(ap: float) -> dict:
    summary = {k: ap for k in SUMMARY_KEYS} | {"AP1": -1.0, "AP2": ap / 2, "AP3": ap, "AP4": ap}
    iou = IouMetrics(summary=summary, per_category={1: ap}, num_detections=3)
    return Metrics(segm=iou, bbox=IouMetrics(summary=dict(summary, AP=ap / 4), per_category={}, num_detections=3),
                   bins=BinSpec(), num_images=2).to_dict()


def result(i: int, sampler: str, seed: int, ap: float) -> TrialResult:
    config = config_from_dict({"sampler": {"name": sampler}, "run": {"seed": seed}})
    return TrialResult(trial_id=f"{i:016x}", train_id=f"{i:016x}", config=config_to_dict(config),
                       values={"sampler.name": sampler, "run.seed": seed}, label=f"sampler.name={sampler}",
                       store={}, rule="sel", rows={"orig": metrics(0.01), "sel": metrics(ap)}, train_seconds=2.0 * i,
                       steps_per_second=10.0, seed=seed)


def record(results) -> SweepRecord:
    return SweepRecord(grid_source="g.toml", grid_text="", cache="store", store={}, fields=("sampler.name", "run.seed"),
                       bins="lvis", evaluator="auto",
                       trials=tuple(PlannedTrial(trial_id=r.trial_id, train_id=r.train_id, values=r.values,
                                                 label=r.label) for r in results))


def test_seeds_are_aggregated_per_configuration():
    results = (result(1, "bilevel", 0, 0.10), result(2, "bilevel", 1, 0.20), result(3, "bilevel", 2, 0.60),
               result(4, "rfs", 0, 0.30))
    rows = build_rows(record(results), results)
    assert [(r.rule, r.values, len(r.trial_ids)) for r in rows] == [
        ("orig", {}, 1), ("sel", {"sampler.name": "bilevel"}, 3), ("sel", {"sampler.name": "rfs"}, 1)]
    ap = rows[1].stats["AP"]
    assert (ap.median, ap.mean, ap.std) == pytest.approx((20.0, 30.0, statistics.stdev([10.0, 20.0, 60.0])))
    assert rows[1].stats["box AP"].median == pytest.approx(5.0)
    assert rows[1].stats["AP1"] is None  # -1: no ground truth in that bin
    assert rows[2].stats["AP"].std == 0.0 and rows[1].train_seconds == pytest.approx(4.0)
    assert rows[0].train_seconds is None and rows[0].stats["AP"].median == pytest.approx(1.0)

    table = list(csv.DictReader(io.StringIO(csv_text(record(results), rows))))
    assert "run.seed" not in table[0] and table[1]["AP median"] == "20.000" and table[1]["AP1 median"] == ""
    assert table[1]["n_seeds"] == "3" and table[1]["trials"].split() == [r.trial_id for r in results[:3]]
    md = markdown_text(record(results), rows)
    assert "| bilevel | sel | 3 | 20.0 (30.0 ± 26.5) |" in md and "| rfs | sel | 1 | 30.0 |" in md


def test_a_result_without_its_rule_row_is_refused():
    good = result(1, "bilevel", 0, 0.1)
    with pytest.raises(SchemaError, match="lack 'orig' or the trial's rule"):
        TrialResult(**{**vars(good), "rows": {"orig": metrics(0.1)}})
    assert TrialResult.from_dict(good.to_dict(), where="x") == good


def test_a_combine_rule_axis_is_shown_once_as_the_rule_column():
    """The rule of each row is the ``rule`` column; a ``combine.rule`` axis would only repeat it."""
    results = []
    for i, rule in enumerate(("sel", "avg"), start=1):
        config = config_from_dict({"combine": {"rule": rule}})
        results.append(TrialResult(trial_id=f"{i:016x}", train_id=f"{1:016x}", config=config_to_dict(config),
                                   values={"combine.rule": rule}, label=f"combine.rule={rule}", store={}, rule=rule,
                                   rows={"orig": metrics(0.01), rule: metrics(0.1 * i)}, train_seconds=1.0,
                                   steps_per_second=10.0, seed=0))
    rec = SweepRecord(grid_source="g.toml", grid_text="", cache="store", store={}, fields=("combine.rule",),
                      bins="lvis", evaluator="auto",
                      trials=tuple(PlannedTrial(trial_id=r.trial_id, train_id=r.train_id, values=r.values,
                                                label=r.label) for r in results))
    rows = build_rows(rec, tuple(results))
    header, *table = list(csv.reader(io.StringIO(csv_text(rec, rows))))
    assert header[:2] == ["rule", "n_seeds"] and "combine.rule" not in header
    assert [(r[0], r[header.index("AP median")]) for r in table] == [("orig", "1.000"), ("sel", "10.000"),
                                                                       ("avg", "20.000")]
    md = markdown_text(rec, rows).splitlines()
    assert md[2].startswith("| rule | n | AP |") and "| avg | 1 | 20.0 |" in md[-1]

"""The sweep's tables, rebuilt from its result files: ``DIR/table.csv`` and ``DIR/table.md``.

One row per configuration: trials whose resolved configs differ only in ``run.seed`` are one
row, their seeds aggregated (median, mean and sample standard deviation; std 0 for one seed).
The first row is ``orig``, the original head (the same for every trial of a store). Columns: the
varied fields (``run.seed`` aside, and ``combine.rule``, which the rule column shows), the
combination rule, the number of seeds, AP, the bins (AP1-AP4), APr, APc, APf (mask AP when the
store keeps val masks, else box AP — as ``heads eval``), box AP, and the mean training seconds.
Values are percent; a group with no ground truth in the evaluated images (LVIS's -1) is left empty.
"""

from __future__ import annotations

import csv
import io
import statistics
from dataclasses import dataclass
from pathlib import Path

from heads.checkpointing import write_atomic
from heads.sweep.identity import canonical_json
from heads.sweep.plots import write_plots
from heads.sweep.results import SweepRecord, TrialResult, read_results, read_sweep_record
from heads.sweep.tensorboard import write_sweep_events

SEED_FIELD = "run.seed"
#: An axis over it would repeat the ``rule`` column (``-`` on the orig row): the column is left out.
RULE_FIELD = "combine.rule"
BOX_AP = "box AP"


def shown_fields(record: SweepRecord) -> list[str]:
    """The varied fields that get a column: all but ``run.seed`` (aggregated) and ``combine.rule``
    (the ``rule`` column)."""
    return [f for f in record.fields if f not in (SEED_FIELD, RULE_FIELD)]


@dataclass(frozen=True, kw_only=True)
class Stat:
    """Percent statistics of one metric over a row's seeds (``n`` values that had ground truth)."""

    median: float
    mean: float
    std: float
    n: int

    @classmethod
    def of(cls, values: list[float]) -> "Stat | None":
        """``values``: fractions in [0, 1]; ``None`` when empty."""
        if not values:
            return None
        pct = [100.0 * v for v in values]
        std = statistics.stdev(pct) if len(pct) > 1 else 0.0
        return cls(median=statistics.median(pct), mean=statistics.fmean(pct), std=std, n=len(pct))


@dataclass(frozen=True, kw_only=True)
class TableRow:
    """One configuration: its varied values, rule, trials and per-metric statistics."""

    values: dict
    rule: str
    trial_ids: tuple[str, ...]
    stats: dict[str, Stat | None]
    train_seconds: float | None


def metric_names(results: tuple[TrialResult, ...]) -> tuple[str, ...]:
    """``AP``, the bin names of the evaluation (AP1..AP4 for LVIS and COCO-LT), APr, APc, APf, box AP."""
    bins = results[0].metrics("orig").bins.names if results else ("AP1", "AP2", "AP3", "AP4")
    return ("AP", *bins, "APr", "APc", "APf", BOX_AP)


def _value(result: TrialResult, rule: str, name: str) -> float | None:
    m = result.metrics(rule)
    if name == BOX_AP:
        v = m.bbox["AP"] if m.bbox is not None else None
    else:
        v = m.primary.summary.get(name)
    return None if v is None or v < 0 else float(v)  # -1: no ground truth in that group


def _row(results: list[TrialResult], rule: str, values: dict, names: tuple[str, ...], *, trained: bool) -> TableRow:
    """``trained``: False for the original head's row (no training time of its own)."""
    seconds = [r.train_seconds for r in results if r.train_seconds is not None] if trained else []
    stats = {n: Stat.of([v for v in (_value(r, rule, n) for r in results) if v is not None]) for n in names}
    return TableRow(values=values, rule=rule, trial_ids=tuple(r.trial_id for r in results), stats=stats,
                    train_seconds=statistics.fmean(seconds) if seconds else None)


def build_rows(record: SweepRecord, results: tuple[TrialResult, ...]) -> tuple[TableRow, ...]:
    """The ``orig`` reference row, then one row per configuration (seeds aggregated), in the
    grid's order of first appearance."""
    if not results:
        return ()
    names = metric_names(results)
    groups: dict[str, list[TrialResult]] = {}
    for r in results:
        config = {sec: dict(values) for sec, values in r.config.items()}
        config["run"].pop("seed", None)
        groups.setdefault(canonical_json(config), []).append(r)
    shown = shown_fields(record)
    rows = [_row([results[0]], "orig", {}, names, trained=False)]
    for members in groups.values():
        values = {f: members[0].values.get(f) for f in shown}
        rows.append(_row(members, members[0].rule, values, names, trained=True))
    return tuple(rows)


def _num(x: float | None) -> str:
    return "" if x is None else f"{x:.3f}"


def csv_text(record: SweepRecord, rows: tuple[TableRow, ...]) -> str:
    shown = shown_fields(record)
    names = list(rows[0].stats) if rows else []
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow([*shown, "rule", "n_seeds", *(f"{n} {s}" for n in names for s in ("median", "mean", "std")),
                     "train_seconds", "trials"])
    for row in rows:
        cells = [_field_text(row.values.get(f)) for f in shown] + [row.rule, len(row.trial_ids)]
        for n in names:
            st = row.stats[n]
            cells += ["", "", ""] if st is None else [_num(st.median), _num(st.mean), _num(st.std)]
        cells += [_num(row.train_seconds), " ".join(row.trial_ids)]
        writer.writerow(cells)
    return out.getvalue()


def _field_text(value) -> str:
    if value is None:
        return ""
    if isinstance(value, list):
        return "[" + ", ".join(_field_text(v) for v in value) + "]"
    return str(value).lower() if isinstance(value, bool) else str(value)


def _cell(st: Stat | None) -> str:
    if st is None:
        return "-"
    return f"{st.median:.1f}" if st.n == 1 else f"{st.median:.1f} ({st.mean:.1f} ± {st.std:.1f})"


def markdown_text(record: SweepRecord, rows: tuple[TableRow, ...]) -> str:
    shown = shown_fields(record)
    names = list(rows[0].stats) if rows else []
    header = [*shown, "rule", "n", *names, "train s"]
    caption = (f"Sweep of grid {record.grid_source} on {record.cache}: {len(record.trials)} trials. Cells: median "
               "over seeds (mean ± std) in percent; mask AP when the store keeps val masks, else box AP.")
    lines = [caption, "", "| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for row in rows:
        cells = [_field_text(row.values.get(f)) or "-" for f in shown] + [row.rule, str(len(row.trial_ids))]
        cells += [_cell(row.stats[n]) for n in names]
        cells.append("-" if row.train_seconds is None else f"{row.train_seconds:.1f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


@dataclass(frozen=True, kw_only=True)
class Report:
    """What :func:`write_report` wrote: the tables, the rows, finished / total trials."""

    csv_path: Path
    md_path: Path
    rows: tuple[TableRow, ...]
    finished: int
    total: int
    markdown: str


def write_report(out_dir: Path) -> Report:
    """Rebuild ``table.csv`` and ``table.md`` (atomically) from ``out_dir``'s finished trials,
    then the plots (``DIR/plots``) and the TensorBoard runs (``DIR/tensorboard``)."""
    out_dir = Path(out_dir)
    record = read_sweep_record(out_dir)
    results = read_results(out_dir, record)
    rows = build_rows(record, results)
    md = markdown_text(record, rows)
    write_atomic(out_dir / "table.csv", csv_text(record, rows).encode())
    write_atomic(out_dir / "table.md", md.encode())
    write_plots(out_dir)
    write_sweep_events(out_dir)  # DIR/tensorboard: one run per trial, `tensorboard --logdir DIR/tensorboard`
    return Report(csv_path=out_dir / "table.csv", md_path=out_dir / "table.md", rows=rows, finished=len(results),
                  total=len(record.trials), markdown=md)


__all__ = ["Stat", "TableRow", "Report", "build_rows", "csv_text", "markdown_text", "write_report", "metric_names",
           "shown_fields"]

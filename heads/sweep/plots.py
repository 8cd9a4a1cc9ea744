"""Plots of a sweep (PNG, matplotlib's Agg backend): AP per bin, calibration dynamics, T sweeps,
per-class weight norms and mean scores.

Each ``plot_*`` takes plain data and an output path and returns the path. AP values come from
``Metrics.to_dict()`` records (:mod:`heads.evaluation.metrics`: fractions, ``-1`` = no category
with ground truth) and are drawn in percent; ``-1`` is drawn as a gap. Colours are fixed per
metric (AP, AP1..AP4) and per series position, so a re-plot of the same data is identical.
:func:`write_plots` reads a sweep directory's ``results/*.json`` and draws what the data supports.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on servers and CI
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.lines import Line2D

_PALETTE = plt.get_cmap("tab10").colors
_DEFAULT_BINS = ("AP1", "AP2", "AP3", "AP4")
_DPI = 120


def colour(i: int) -> tuple[float, float, float]:
    """The ``i``-th series colour (tab10, cycling): fixed by position, never by data."""
    return _PALETTE[i % len(_PALETTE)]


def bin_names(metrics: dict) -> tuple[str, ...]:
    """The AP-bin names of a metrics record (``AP1..AP4`` when it does not say)."""
    names = (metrics.get("bins") or {}).get("names")
    return tuple(names) if names else _DEFAULT_BINS


def ap_percent(metrics: dict, key: str) -> float:
    """``key`` (``"AP"``, ``"AP1"``, ...) of a ``Metrics.to_dict()`` record in percent: mask
    results when present, else box; NaN when missing or ``-1`` (no category with ground truth).
    A flat ``{"AP": 0.1, ...}`` summary is read as well."""
    part = metrics.get("segm") or metrics.get("bbox") or metrics
    value = (part.get("summary") or part).get(key)
    if not isinstance(value, (int, float)) or value < 0:
        return math.nan
    return 100.0 * float(value)


def _metric_colours(names: tuple[str, ...]) -> dict[str, tuple]:
    # AP first, then the bins: the same metric keeps its colour in every figure.
    return {name: colour(i) for i, name in enumerate(("AP",) + tuple(n for n in names if n != "AP"))}


def _save(fig, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=_DPI, format="png")
    plt.close(fig)
    return path


def plot_ap_bins(rows: dict[str, dict], path: Path) -> Path:
    """Grouped bars: one group per config label (dict order), one bar per metric (AP1..AP4, AP).

    Args:
        rows: label -> ``Metrics.to_dict()`` record (the bins are those of the first record).
        path: output PNG.
    """
    labels = list(rows)
    metrics = list(bin_names(next(iter(rows.values())))) + ["AP"] if rows else ["AP"]
    colours = _metric_colours(tuple(metrics))
    x = np.arange(len(labels))
    width = 0.8 / len(metrics)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(labels) + 2), 3.8))
    for j, name in enumerate(metrics):
        values = [ap_percent(rows[label], name) for label in labels]
        ax.bar(x + (j - (len(metrics) - 1) / 2) * width, values, width, label=name, color=colours[name])
    ax.set_xticks(x, labels, rotation=30 if len(labels) > 3 else 0, ha="right" if len(labels) > 3 else "center",
                  fontsize=8)
    ax.margins(y=0.2)  # head room for the legend above the tallest bar (bars keep their 0 base)
    ax.set_ylabel("AP (%)")
    ax.set_title("AP by training-instance bin")
    ax.legend(fontsize=8, ncol=len(metrics), loc="upper left")
    return _save(fig, path)


_LINESTYLES = ("-", "--", ":", "-.")


def plot_dynamics(points: dict[str, list[tuple[int, dict]]], path: Path) -> Path:
    """AP per bin (AP1..AP4) against training step, one line style per trial (SimCal Fig. 4a).

    Args:
        points: trial label -> ``[(step, Metrics.to_dict())]`` (steps: completed optimisation
            steps; sorted here).
        path: output PNG.
    """
    first = next((pts[0][1] for pts in points.values() if pts), {})
    names = bin_names(first)
    colours = _metric_colours(names)
    styles = {label: _LINESTYLES[i % len(_LINESTYLES)] for i, label in enumerate(points)}
    fig, ax = plt.subplots(figsize=(8, 4))
    for label, pts in points.items():
        pts = sorted(pts, key=lambda p: p[0])
        for name in names:
            ax.plot([s for s, _ in pts], [ap_percent(m, name) for _, m in pts], styles[label], marker="o",
                    markersize=3, color=colours[name])
    # Two legends' worth in one: colour = bin, line style = trial (not one entry per pair).
    handles = [Line2D([], [], color=colours[n], label=n) for n in names]
    if len(points) > 1:
        handles += [Line2D([], [], color="0.3", linestyle=styles[label], label=label) for label in points]
    ax.legend(handles=handles, fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.set_xlabel("training step")
    ax.set_ylabel("AP (%)")
    ax.set_title("AP per bin during training")
    return _save(fig, path)


def _T_positions(ts: list[float]) -> tuple[np.ndarray, list[str]]:
    """Evenly spaced x positions for the sorted thresholds and their tick labels (``inf`` as ∞):
    T spans 0..inf, which neither a linear nor a log axis shows."""
    return np.arange(len(ts)), ["∞" if math.isinf(t) else f"{t:g}" for t in ts]


def plot_T_sweep(points: list[tuple[float, dict]], path: Path, *, reference: dict | None = None,
                 rule: str = "sel") -> Path:
    """AP and AP1..AP4 of a ``sel*`` rule against its threshold T (SimCal Fig. 4c): one panel
    per metric, the rule as a line, the references as horizontal lines.

    Args:
        points: ``[(T, Metrics.to_dict())]``; T in training instances (``math.inf`` allowed),
            sorted here.
        path: output PNG.
        reference: name -> ``Metrics.to_dict()`` drawn flat across the T range (``orig`` dashed,
            ``cal-only`` dotted, others dash-dotted), or ``None``.
        rule: the rule's name in the legend (``sel``, ``sel-thr``, ...).
    """
    points = sorted(points, key=lambda p: p[0])
    x, ticks = _T_positions([t for t, _ in points])
    names = ("AP",) + bin_names(points[0][1] if points else {})
    colours = _metric_colours(names)
    styles = {"orig": "--", "cal-only": ":"}
    fig, axes = plt.subplots(1, len(names), figsize=(2.6 * len(names), 3.2), squeeze=False)
    for ax, name in zip(axes[0], names):
        ax.plot(x, [ap_percent(m, name) for _, m in points], "-o", markersize=3, color=colours[name], label=rule)
        for ref_name, metrics in (reference or {}).items():
            ax.axhline(ap_percent(metrics, name), linestyle=styles.get(ref_name, "-."), color="0.35",
                       linewidth=1, label=ref_name)
        ax.set_xticks(x, ticks, fontsize=7)
        ax.set_title(name)
        ax.set_xlabel("T (training instances)")
    axes[0][0].set_ylabel("AP (%)")
    axes[0][0].legend(fontsize=7)
    return _save(fig, path)


def _per_class_scatter(values: dict[str, np.ndarray], instance_count: np.ndarray, path: Path, *,
                       ylabel: str, title: str) -> Path:
    """Per-class values against training instances (log x), classes sorted by count; classes
    with no training instance (not on a log axis) and NaN values are left out."""
    counts = np.asarray(instance_count, dtype=np.float64)
    order = np.argsort(counts, kind="stable")
    order = order[counts[order] > 0]
    fig, ax = plt.subplots(figsize=(7, 4))
    for i, (label, v) in enumerate(values.items()):
        v = np.asarray(v, dtype=np.float64)[order]
        keep = np.isfinite(v)
        ax.scatter(counts[order][keep], v[keep], s=8, alpha=0.7, color=colour(i), label=label)
    ax.set_xscale("log")
    ax.set_xlabel("training instances of the class")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if values:
        ax.legend(fontsize=7)
    return _save(fig, path)


def plot_weight_norms(norms: dict[str, np.ndarray], instance_count: np.ndarray, path: Path) -> Path:
    """Per-class classifier weight norm (``classifier_weight_norms``, float ``[C]``) against
    training instances (int ``[C]``, log x), one colour per head (FASA Fig. 4)."""
    return _per_class_scatter(norms, instance_count, path, ylabel="classifier weight norm (L2)",
                              title="Classifier weight norm per class")


def plot_mean_scores(scores: dict[str, np.ndarray], instance_count: np.ndarray, path: Path) -> Path:
    """Per-class mean true-class probability on val RoIs (``mean_class_scores``, float ``[C]``,
    NaN = no val RoI) against training instances (int ``[C]``, log x), one colour per head
    (FASA Fig. 1b)."""
    return _per_class_scatter(scores, instance_count, path, ylabel="mean score of the true class",
                              title="Mean val score per class")


# ----------------------------------------------------------------------------- sweep directories
@dataclass(frozen=True, kw_only=True)
class TrialRecord:
    """What the plots read from one ``results/<trial_id>.json`` (:class:`heads.sweep.results.TrialResult`).

    Attributes:
        T: ``combine.T`` (training instances; ``math.inf`` allowed), NaN when the config lacks it.
        combine: the rest of the ``[combine]`` record (T and rule left out), for grouping.
        axes: the trial's axis values (field -> value).
        rows: rule -> ``Metrics.to_dict()``.
        diagnostics: ``{"weight_norms", "mean_scores", "instance_count", "dynamics"}`` as present.
    """

    trial_id: str
    train_id: str
    label: str
    rule: str
    T: float
    combine: tuple
    axes: dict
    rows: dict
    diagnostics: dict = field(default_factory=dict)
    head: str = ""

    @property
    def row(self) -> dict | None:
        """The metrics of the trial's own rule."""
        return self.rows.get(self.rule)

    @property
    def head_label(self) -> str:
        """The axis values that shape the head (``combine.*`` left out), or its train id."""
        bits = [f"{k}={v}" for k, v in self.axes.items() if not k.startswith("combine.")]
        return ", ".join(bits) or self.train_id[:8]


def _float(value) -> float:
    try:
        return float(value)  # also reads "inf", how JSON results write T = inf
    except (TypeError, ValueError):
        return math.nan


def read_trial(data: dict, *, name: str) -> TrialRecord | None:
    """One result file's content as a :class:`TrialRecord`, or ``None`` when it has no metrics
    rows. Tolerant of naming: ``trial_id``/``trial``, ``values``/``axes``, the rule from ``rule``
    or ``config.combine.rule``."""
    rows = data.get("rows")
    if not isinstance(rows, dict) or not rows:
        return None
    combine = dict((data.get("config") or {}).get("combine") or {})
    rule = data.get("rule") or combine.get("rule") or next(iter(rows))
    axes = dict(data.get("values") or data.get("axes") or {})
    trial_id = str(data.get("trial_id") or data.get("trial") or name)
    label = data.get("label") or ", ".join(f"{k}={v}" for k, v in axes.items()) or trial_id[:8]
    rest = tuple(sorted((k, json.dumps(v)) for k, v in combine.items() if k not in ("rule", "T")))
    return TrialRecord(trial_id=trial_id, train_id=str(data.get("train_id") or trial_id), label=str(label),
                       rule=str(rule), T=_float(combine.get("T")), combine=rest, axes=axes, rows=rows,
                       diagnostics=dict(data.get("diagnostics") or {}),
                       head=str(((data.get("config") or {}).get("head") or {}).get("name") or ""))


def read_trials(sweep_dir: Path) -> list[TrialRecord]:
    """Every readable ``sweep_dir/results/*.json``, in the order ``sweep.json`` lists the trials
    (then by file name); unreadable or row-less files are skipped (a sweep still running)."""
    sweep_dir = Path(sweep_dir)
    try:
        planned = [t.get("trial_id") for t in json.loads((sweep_dir / "sweep.json").read_text()).get("trials", [])]
    except (OSError, ValueError, AttributeError):
        planned = []
    rank = {tid: i for i, tid in enumerate(planned)}
    trials = []
    for path in sorted((sweep_dir / "results").glob("*.json")):
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        trial = read_trial(data, name=path.stem) if isinstance(data, dict) else None
        if trial is not None:
            trials.append(trial)
    return sorted(trials, key=lambda t: (rank.get(t.trial_id, len(rank)), t.trial_id))


def _unique(label: str, taken: dict) -> str:
    n, out = 2, label
    while out in taken:
        out, n = f"{label} ({n})", n + 1
    return out


def _ap_rows(trials: list[TrialRecord]) -> dict[str, dict]:
    """``orig`` once (it does not depend on the trained head), then each trial's own row."""
    rows: dict[str, dict] = {}
    orig = next((t.rows["orig"] for t in trials if "orig" in t.rows), None)
    if orig is not None:
        rows["orig"] = orig
    for t in trials:
        if t.row is not None and t.rule != "orig":
            rows[_unique(t.label, rows)] = t.row
    return rows


def _T_groups(trials: list[TrialRecord]) -> dict[tuple, list[TrialRecord]]:
    """``sel*`` trials that differ only by ``combine.T``: same head, rule and other settings."""
    groups: dict[tuple, list[TrialRecord]] = {}
    for t in trials:
        if t.rule.startswith("sel") and not math.isnan(t.T) and t.row is not None:
            groups.setdefault((t.train_id, t.rule, t.combine), []).append(t)
    return {k: g for k, g in groups.items() if len({t.T for t in g}) >= 2}


def _T_reference(trials: list[TrialRecord], train_id: str) -> dict[str, dict]:
    """``orig`` and, when some trial of the same head has it, ``cal-only``."""
    ref = {}
    for name in ("orig", "cal-only"):
        row = next((t.rows[name] for t in trials if name in t.rows and (name == "orig" or t.train_id == train_id)), None)
        if row is not None:
            ref[name] = row
    return ref


def _per_head(trials: list[TrialRecord], key: str) -> dict[str, np.ndarray]:
    """head label -> diagnostics[key] as float64 (``None`` -> NaN), once per trained head."""
    out: dict[str, np.ndarray] = {}
    seen = set()
    for t in trials:
        values = t.diagnostics.get(key)
        if values and t.train_id not in seen:
            seen.add(t.train_id)
            out[_unique(t.head_label, out)] = np.array([math.nan if v is None else v for v in values], dtype=np.float64)
    return out


def _dynamics(trials: list[TrialRecord]) -> dict[str, list[tuple[int, dict]]]:
    """head label -> ``[(step, metrics)]`` from ``diagnostics.dynamics`` (the ``cal-only`` row —
    the calibrated head alone, SimCal Fig. 4a — when present, else the trial's rule's, else the
    first), once per trained head."""
    out: dict[str, list[tuple[int, dict]]] = {}
    seen = set()
    for t in trials:
        points = []
        for point in t.diagnostics.get("dynamics") or []:
            rows = point.get("rows") or {}
            row = rows.get("cal-only") or rows.get(t.rule) or next(iter(rows.values()), None)
            if row is not None and isinstance(point.get("step"), int):
                points.append((point["step"], row))
        if points and t.train_id not in seen:
            seen.add(t.train_id)
            out[_unique(t.head_label, out)] = points
    return out


def write_plots(sweep_dir: Path) -> list[Path]:
    """Draw into ``sweep_dir/plots/`` what the finished trials of ``sweep_dir/results`` support:

    ``ap_bins.png`` (any trial), ``T_sweep_<train_id>_<rule>.png`` (per group of ``sel*`` trials
    differing only by ``combine.T``), ``dynamics.png`` (``diagnostics.dynamics``),
    ``weight_norms.png`` / ``mean_scores.png`` (``diagnostics`` with ``instance_count``).
    Returns the paths written, in that order (empty when no trial has finished).
    """
    trials = read_trials(sweep_dir)
    out_dir = Path(sweep_dir) / "plots"
    written = []
    rows = _ap_rows(trials)
    if rows:
        written.append(plot_ap_bins(rows, out_dir / "ap_bins.png"))
    for (train_id, rule, _), group in _T_groups(trials).items():
        points = [(t.T, t.row) for t in group]
        written.append(plot_T_sweep(points, out_dir / f"T_sweep_{train_id}_{rule}.png",
                                    reference=_T_reference(trials, train_id), rule=rule))
    dynamics = _dynamics(trials)
    if dynamics:
        written.append(plot_dynamics(dynamics, out_dir / "dynamics.png"))
    counts = next((t.diagnostics["instance_count"] for t in trials if t.diagnostics.get("instance_count")), None)
    for key, plot in (("weight_norms", plot_weight_norms), ("mean_scores", plot_mean_scores)):
        # An ncm head's "norm" is its class mean's, on another scale (and cosine ncm ignores it):
        # drawn with the trained classifiers' rows it would flatten them, so it is left out there.
        values = _per_head([t for t in trials if key != "weight_norms" or t.head != "ncm"], key)
        if values and counts is not None:
            written.append(plot(values, np.asarray(counts), out_dir / f"{key}.png"))
    return written


__all__ = [
    "TrialRecord",
    "ap_percent",
    "bin_names",
    "colour",
    "plot_T_sweep",
    "plot_ap_bins",
    "plot_dynamics",
    "plot_mean_scores",
    "plot_weight_norms",
    "read_trial",
    "read_trials",
    "write_plots",
]

"""TensorBoard runs of a sweep's trials: training curves from ``log.jsonl`` plus AP at evaluation
points, one run folder per trial (``tensorboard --logdir LOGDIR`` overlays them).

Scalar tags (x = completed optimisation steps):
    ``train/loss``, ``train/lr``, ``train/rois_per_step``  each ``log.jsonl`` record (window means)
    ``val/acc_fg``, ``val/acc_bin1`` ...                   the RoI-accuracy monitor (fractions)
    ``eval/AP``, ``eval/AP1`` ...                         cached-evaluation AP in percent
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

from torch.utils.tensorboard import SummaryWriter

from cache_schema.errors import ConfigError
from heads.sweep.plots import ap_percent, bin_names, read_trials
from heads.train import log_lines

TRAIN_KEYS = ("loss", "lr", "rois_per_step")
_EVENT_GLOB = "events.out.tfevents.*"
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.=,+-]*$")


def read_log(path: Path) -> list[dict]:
    """The step records of a run's ``log.jsonl`` (event records such as ``fasa_adapt`` and a
    line cut short by a crash are skipped), by increasing step."""
    records = [r for _, r in log_lines(path) if isinstance(r.get("step"), int) and "event" not in r]
    return sorted(records, key=lambda r: r["step"])


def log_scalars(record: dict) -> dict[str, float]:
    """Tag -> value of one log record: the training keys and every ``acc_*`` field (``None``,
    a bin without val RoIs, is left out)."""
    out = {f"train/{k}": record[k] for k in TRAIN_KEYS if isinstance(record.get(k), (int, float))}
    out.update({f"val/{k}": v for k, v in record.items() if k.startswith("acc_") and isinstance(v, (int, float))})
    return {tag: float(v) for tag, v in out.items()}


def ap_scalars(metrics: dict) -> dict[str, float]:
    """``eval/AP`` and ``eval/AP1``.. (percent) of a ``Metrics.to_dict()`` record; NaN (no
    category with ground truth) left out."""
    values = {f"eval/{k}": ap_percent(metrics, k) for k in ("AP",) + bin_names(metrics)}
    return {tag: v for tag, v in values.items() if not math.isnan(v)}


def _clear_events(run_logdir: Path) -> None:
    """Remove earlier event files of this run: TensorBoard reads every file in the folder, so a
    rewrite that kept them would show each point twice."""
    for path in run_logdir.glob(_EVENT_GLOB):
        path.unlink()


def write_trial_events(run_dir: Path, logdir: Path, *, name: str,
                       ap_points: list[tuple[int, dict]] | tuple = ()) -> Path:
    """Write the TensorBoard run ``logdir/name`` of one trial and return its folder.

    Args:
        run_dir: the trial's ``heads train`` folder (its ``log.jsonl``; a missing log gives a run
            with the AP points only).
        logdir: TensorBoard's root folder.
        name: the run's folder name (letters, digits, ``_.=,+-``; no path separators).
        ap_points: ``[(step, Metrics.to_dict())]`` of cached evaluations at those steps.
    Idempotent: earlier event files of ``logdir/name`` are replaced, not appended to.
    """
    if not _SAFE_NAME.match(name):
        raise ConfigError(f"TensorBoard run name {name!r} must be letters, digits and _.=,+- (no path separators)")
    out = Path(logdir) / name
    out.mkdir(parents=True, exist_ok=True)
    _clear_events(out)
    with SummaryWriter(log_dir=str(out)) as writer:
        for record in read_log(Path(run_dir) / "log.jsonl"):
            for tag, value in log_scalars(record).items():
                writer.add_scalar(tag, value, global_step=record["step"])
        for step, metrics in sorted(ap_points, key=lambda p: p[0]):
            for tag, value in ap_scalars(metrics).items():
                writer.add_scalar(tag, value, global_step=int(step))
    return out


def _final_step(run_dir: Path) -> int | None:
    """Steps of the finished run (its ``metrics.json``), ``None`` when it is not readable."""
    try:
        return int(json.loads((run_dir / "metrics.json").read_text())["steps"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def run_name(label: str, trial_id: str) -> str:
    """A readable, safe TensorBoard run name: the trial's label (its axis values) with every
    character outside ``_SAFE_NAME``'s set replaced, plus the id's first 8 hex digits (labels
    of distinct trials may coincide once sanitised)."""
    safe = re.sub(r"[^A-Za-z0-9_.=,+-]+", "_", label).strip("_.")[:80]
    return f"{safe}-{trial_id[:8]}" if safe else trial_id


def write_sweep_events(sweep_dir: Path, logdir: Path | None = None) -> list[Path]:
    """One TensorBoard run per finished trial of ``sweep_dir`` (default ``sweep_dir/tensorboard``),
    named by :func:`run_name`: its head's training curves, the AP of its rule at the final step and,
    where ``diagnostics.dynamics`` scored the snapshots with that same rule, at each snapshot step
    (the sweep scores snapshots with ``cal-only``, so only cal-only trials get them here; the
    dynamics plot draws them for every head)."""
    sweep_dir = Path(sweep_dir)
    logdir = Path(logdir) if logdir is not None else sweep_dir / "tensorboard"
    written = []
    for trial in read_trials(sweep_dir):
        run_dir = sweep_dir / "heads" / trial.train_id
        points = [(p["step"], p["rows"][trial.rule]) for p in trial.diagnostics.get("dynamics") or []
                  if isinstance(p.get("step"), int) and trial.rule in (p.get("rows") or {})]
        final = _final_step(run_dir)
        if final is not None and trial.row is not None and final not in {s for s, _ in points}:
            points.append((final, trial.row))
        written.append(write_trial_events(run_dir, logdir, name=run_name(trial.label, trial.trial_id), ap_points=points))
    return written


__all__ = ["ap_scalars", "log_scalars", "read_log", "write_sweep_events", "write_trial_events"]

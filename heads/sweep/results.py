"""A sweep directory's records: ``sweep.json`` (the grid and its trials) and one
``results/<trial_id>.json`` per finished trial.

Layout of ``DIR``::

    sweep.json              SweepRecord: the grid file's text, the store, the trials in order
    heads/<train_id>/       one `heads train` run directory per distinct training config
    results/<trial_id>.json TrialResult, written atomically when the trial is finished
    table.csv  table.md     rebuilt from the results (heads.sweep.tables)

A result file exists only once complete (temporary name, fsync, rename; a temporary
``*.json.tmp`` is never read), so a killed sweep leaves finished trials and nothing half-written,
and a rerun redoes exactly the trials without a file.
"""

from __future__ import annotations

import json
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path

from cache_schema.errors import ConfigError, SchemaError
from heads.checkpointing import write_json_atomic
from heads.evaluation import Metrics
from heads.sweep.identity import check_id

RESULT_FORMAT = "roicache.sweep-trial"
SWEEP_FORMAT = "roicache.sweep"
FORMAT_VERSION = 1


@dataclass(frozen=True, kw_only=True)
class TrialResult:
    """One finished trial.

    Attributes:
        trial_id, train_id: content addresses (:mod:`heads.sweep.identity`).
        config: the resolved config (``heads.config.config_to_dict``: nested plain dict).
        values: the trial's axis values (field -> plain JSON value), in axis order.
        label: ``field=value, ...`` for messages.
        store: the store fingerprint the trial ran on.
        rule: the trial's combination rule (a key of ``rows``).
        rows: rule -> ``Metrics.to_dict()`` of cached evaluation: ``orig`` and ``rule``.
        train_seconds: wall seconds of the training attempt that finished the head (``None``: ncm).
        steps_per_second: of that attempt (``None`` when it ran no step).
        seed: ``run.seed``.
        diagnostics: what :mod:`heads.sweep.plots` draws besides the rows
            (:mod:`heads.sweep.diagnostics`: ``weight_norms``, ``mean_scores``,
            ``instance_count``, and ``dynamics`` when the head run kept snapshots).
    """

    trial_id: str
    train_id: str
    config: dict
    values: dict
    label: str
    store: dict
    rule: str
    rows: dict[str, dict]
    train_seconds: float | None
    steps_per_second: float | None
    seed: int
    diagnostics: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_id("trial id", self.trial_id)
        check_id("train id", self.train_id)
        if "orig" not in self.rows or self.rule not in self.rows:
            raise SchemaError(f"trial {self.trial_id}: rows {sorted(self.rows)} lack 'orig' or the trial's rule "
                              f"{self.rule!r}; delete the file and rerun the sweep")
        if not isinstance(self.seed, int) or self.seed < 0:
            raise SchemaError(f"trial {self.trial_id}: seed {self.seed!r} must be an integer >= 0")

    def metrics(self, rule: str) -> Metrics:
        """The :class:`~heads.evaluation.Metrics` of row ``rule``."""
        return Metrics.from_dict(self.rows[rule])

    def to_dict(self) -> dict:
        return {"format": RESULT_FORMAT, "format_version": FORMAT_VERSION, **asdict(self)}

    @classmethod
    def from_dict(cls, d: dict, *, where: str) -> "TrialResult":
        if not isinstance(d, dict) or d.get("format") != RESULT_FORMAT or d.get("format_version") != FORMAT_VERSION:
            raise SchemaError(f"{where} is not a sweep trial result (format {RESULT_FORMAT} v{FORMAT_VERSION})")
        try:
            return cls(**{f.name: d[f.name] for f in fields(cls) if f.name in d or f.default_factory is MISSING})
        except KeyError as e:
            raise SchemaError(f"{where} lacks {e}; delete it and rerun the sweep") from None


@dataclass(frozen=True, kw_only=True)
class PlannedTrial:
    """A trial of the sweep as ``sweep.json`` lists it (order = the grid's expansion order)."""

    trial_id: str
    train_id: str
    values: dict
    label: str

    def __post_init__(self) -> None:
        check_id("trial id", self.trial_id)
        check_id("train id", self.train_id)


@dataclass(frozen=True, kw_only=True)
class SweepRecord:
    """``DIR/sweep.json``: what the directory is a sweep of.

    Attributes:
        grid_source: the grid file's path as given; grid_text: its text.
        cache: the store's path or URL; store: its fingerprint.
        fields: the varied fields, in axis order; bins, evaluator: the evaluation settings.
        trials: every trial of the grid, in expansion order.
    """

    grid_source: str
    grid_text: str
    cache: str
    store: dict
    fields: tuple[str, ...]
    bins: str
    evaluator: str
    trials: tuple[PlannedTrial, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "fields", tuple(self.fields))
        object.__setattr__(self, "trials", tuple(self.trials))
        ids = [t.trial_id for t in self.trials]
        if len(set(ids)) != len(ids):
            raise SchemaError("sweep record lists a trial twice; the sweep directory is damaged, rerun the sweep "
                              "with --overwrite")

    @property
    def trial_ids(self) -> tuple[str, ...]:
        return tuple(t.trial_id for t in self.trials)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["fields"] = list(self.fields)
        return {"format": SWEEP_FORMAT, "format_version": FORMAT_VERSION, **d}

    @classmethod
    def from_dict(cls, d: dict, *, where: str) -> "SweepRecord":
        if not isinstance(d, dict) or d.get("format") != SWEEP_FORMAT or d.get("format_version") != FORMAT_VERSION:
            raise SchemaError(f"{where} is not a sweep record (format {SWEEP_FORMAT} v{FORMAT_VERSION})")
        try:
            values = {f.name: d[f.name] for f in fields(cls)}
            values["trials"] = tuple(PlannedTrial(**t) for t in d["trials"])
        except (KeyError, TypeError) as e:
            raise SchemaError(f"{where} is malformed ({type(e).__name__}: {e}); rerun the sweep with "
                              "--overwrite") from None
        return cls(**values)


def sweep_path(out_dir: Path) -> Path:
    return Path(out_dir) / "sweep.json"


def result_path(out_dir: Path, trial_id: str) -> Path:
    return Path(out_dir) / "results" / f"{trial_id}.json"


def head_dir(out_dir: Path, train_id: str) -> Path:
    return Path(out_dir) / "heads" / train_id


def write_sweep_record(out_dir: Path, record: SweepRecord) -> None:
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    write_json_atomic(sweep_path(out_dir), record.to_dict())


def read_sweep_record(out_dir: Path) -> SweepRecord:
    """``DIR/sweep.json``; a directory without one is not a sweep directory."""
    path = sweep_path(out_dir)
    if not path.is_file():
        raise ConfigError(f"{out_dir} is not a sweep directory (no sweep.json); run `heads sweep --out {out_dir}` "
                          "first")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise SchemaError(f"{path} is not valid JSON ({e}); rerun the sweep with --overwrite") from None
    return SweepRecord.from_dict(data, where=str(path))


def write_result(out_dir: Path, result: TrialResult) -> Path:
    """Atomically write ``results/<trial_id>.json`` (temporary name, fsync, rename)."""
    path = result_path(out_dir, result.trial_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, result.to_dict())
    return path


def read_result(out_dir: Path, trial_id: str) -> TrialResult | None:
    """The finished trial ``trial_id``, or ``None`` when it has no readable result file (then
    the trial is simply run again)."""
    path = result_path(out_dir, trial_id)
    try:
        return TrialResult.from_dict(json.loads(path.read_text()), where=str(path))
    except (OSError, json.JSONDecodeError, SchemaError):
        return None


def read_results(out_dir: Path, record: SweepRecord) -> tuple[TrialResult, ...]:
    """The finished trials of ``record``, in its trial order (results of other grids that share
    the directory are left out; ``*.json.tmp`` files are never read)."""
    found = (read_result(out_dir, trial_id) for trial_id in record.trial_ids)
    return tuple(r for r in found if r is not None)


__all__ = ["TrialResult", "PlannedTrial", "SweepRecord", "read_sweep_record", "write_sweep_record", "write_result",
           "read_result", "read_results", "result_path", "head_dir", "sweep_path"]

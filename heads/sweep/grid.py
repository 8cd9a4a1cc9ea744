"""Sweep grids: a base head config and axes over its fields, expanded into trials.

A grid file (TOML)::

    base = "calibrate.toml"       # optional: a `heads train --config` file, relative to this file

    # Config sections override the base file key by key, written at the top level ...
    [schedule]
    max_steps = 3000
    milestones = [2000, 2750]
    # ... or as [base.schedule] (then a base file is named inside the table: [base] file = "...").

    [sweep]                       # optional: the evaluation every trial shares
    bins = "lvis"                 # AP bins: lvis | coco-lt
    evaluator = "auto"            # auto | fast | lvis-api (see `heads eval`)

    [[axis]]                      # crosswise: one field and its values
    field = "sampler.name"
    values = ["bilevel", "rfs"]

    [[axis]]                      # zip: fields varied together, one value of each per point
    zip = { "schedule.max_steps" = [1000, 3000], "schedule.milestones" = [[700, 900], [2000, 2750]] }

    [[axis]]
    field = "combine.T"           # post-training: trials that differ only here share one head
    values = [100, 300, inf]

A field is any ``section.key`` of the head config (:data:`heads.config.SECTIONS`: ``sampler``,
``loss``, ``head``, ``schedule``, ``eval``, ``run``, ``fasa``, ``combine``); values are written as
in a config file and checked by the config's own validation, per axis first (so an error names
the axis), then per trial. Seeds are an axis like any other (``field = "run.seed"``); the tables
aggregate over it.

Expansion is the cross product of the axes in the order they are declared, the first axis
varying slowest; a zip axis contributes its points (tuples) as one axis. No axis gives one
trial, the base. Every trial is a resolved :class:`~heads.config.TrainConfig` plus its axis
values. Two trials that would train the same head and score it the same way (an axis over
``run.device`` or ``eval.interval``, say) are refused: they are the same trial.
"""

from __future__ import annotations

import dataclasses
import itertools
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cache_schema.errors import ConfigError
from heads.config import SECTIONS, TrainConfig, config_from_dict, config_to_dict, load_config
from heads.evaluation import BinSpec
from heads.pipeline import EVALUATORS
from heads.sweep.identity import canonical_json, trial_key

TOP_KEYS = ("base", "sweep", "axis")
AXIS_KEYS = ("field", "values", "zip")
BIN_PRESETS = ("lvis", "coco-lt")


def config_fields() -> tuple[str, ...]:
    """Every dotted field an axis may vary, in config order (``sampler.name``, ...)."""
    return tuple(f"{sec}.{f.name}" for sec, cls in SECTIONS.items() for f in dataclasses.fields(cls))


def _frozen(value: Any) -> Any:
    """Lists (TOML arrays) as tuples, recursively: axis values stay immutable."""
    return tuple(_frozen(v) for v in value) if isinstance(value, (list, tuple)) else value


def _plain(value: Any) -> Any:
    """Tuples as lists, recursively: JSON-ready."""
    return [_plain(v) for v in value] if isinstance(value, (list, tuple)) else value


def _check_field(name: str) -> None:
    valid = config_fields()
    if name in valid:
        return
    section = name.split(".", 1)[0]
    if section in SECTIONS:  # a typo in the key: the section's fields are the useful list
        valid = tuple(f for f in valid if f.startswith(section + "."))
    raise ConfigError(f"field {name!r} is not a config field; valid fields: {', '.join(valid)}")


@dataclass(frozen=True, kw_only=True)
class Axis:
    """One axis of a grid.

    Attributes:
        fields: dotted config fields (one for a crosswise axis, one or more for a zip axis).
        points: the axis's values, each a tuple of one value per field (TOML lists as tuples).
    """

    fields: tuple[str, ...]
    points: tuple[tuple[Any, ...], ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "fields", tuple(self.fields))
        object.__setattr__(self, "points", tuple(tuple(_frozen(v) for v in p) for p in self.points))
        if not self.fields:
            raise ConfigError("an axis needs a field (field = ..., values = [...]) or a zip table")
        for name in self.fields:
            _check_field(name)
        if len(set(self.fields)) != len(self.fields):
            raise ConfigError(f"{self.label} names a field twice")
        if not self.points:
            raise ConfigError(f"{self.label} has no values; give at least one")
        if any(len(p) != len(self.fields) for p in self.points):
            raise ConfigError(f"{self.label}: every point needs one value per field ({len(self.fields)})")

    @property
    def label(self) -> str:
        """``sampler.name`` or ``zip(schedule.max_steps, schedule.milestones)``: how messages name it."""
        return self.fields[0] if len(self.fields) == 1 else f"zip({', '.join(self.fields)})"


@dataclass(frozen=True, kw_only=True)
class Trial:
    """One point of the grid.

    Attributes:
        index: position in the expansion (0-based, deterministic).
        config: the resolved, validated config.
        values: ``(field, value)`` of every axis field, in axis order (TOML lists as tuples).
    """

    index: int
    config: TrainConfig
    values: tuple[tuple[str, Any], ...]

    def __post_init__(self) -> None:
        names = [f for f, _ in self.values]
        if self.index < 0 or len(set(names)) != len(names):
            raise ConfigError(f"trial {self.index}: index must be >= 0 and each field set once, got {names}")

    def value_dict(self) -> dict[str, Any]:
        """Axis values as plain JSON types (tuples as lists)."""
        return {f: _plain(v) for f, v in self.values}

    @property
    def label(self) -> str:
        """``sampler.name=rfs, combine.T=100`` (``base`` when the grid has no axis)."""
        return ", ".join(f"{f}={_plain(v)}" for f, v in self.values) or "base"


def _resolve(base: dict, values: dict[str, Any]) -> TrainConfig:
    return config_from_dict(base, {f: _plain(v) for f, v in values.items()})


@dataclass(frozen=True, kw_only=True)
class SweepGrid:
    """A parsed grid; ``trials`` is its expansion, computed and validated on construction.

    Attributes:
        base: the config every trial starts from.
        axes: in declared order.
        bins: AP-bin preset of the evaluation (``lvis`` | ``coco-lt``).
        evaluator: cached evaluation's evaluator (``auto`` | ``fast`` | ``lvis-api``).
        source: the grid file's path as given (``<inline>`` for a grid built in code).
        text: the grid file's text (recorded in the sweep directory).
    """

    base: TrainConfig = field(default_factory=TrainConfig)
    axes: tuple[Axis, ...] = ()
    bins: str = "lvis"
    evaluator: str = "auto"
    source: str = "<inline>"
    text: str = ""
    trials: tuple[Trial, ...] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "axes", tuple(self.axes))
        where = self.where
        if self.bins not in BIN_PRESETS:
            raise ConfigError(f"{where}: [sweep] bins = {self.bins!r} is unknown; valid: {', '.join(BIN_PRESETS)}")
        if self.evaluator not in EVALUATORS:
            raise ConfigError(f"{where}: [sweep] evaluator = {self.evaluator!r} is unknown; "
                              f"valid: {', '.join(EVALUATORS)}")
        seen: dict[str, int] = {}
        for i, axis in enumerate(self.axes, 1):
            for name in axis.fields:
                if name in seen:
                    raise ConfigError(f"{where}: field {name} is on axis {seen[name]} and axis {i}; "
                                      "vary each field on one axis (zip fields that change together)")
                seen[name] = i
        object.__setattr__(self, "trials", self._expand())

    @property
    def where(self) -> str:
        """How messages name the grid: ``grid PATH``."""
        return f"grid {self.source}"

    @property
    def bin_spec(self) -> BinSpec:
        return BinSpec.preset(self.bins)

    @property
    def varied_fields(self) -> tuple[str, ...]:
        """Every axis field, in axis order."""
        return tuple(f for axis in self.axes for f in axis.fields)

    def _expand(self) -> tuple[Trial, ...]:
        base = config_to_dict(self.base)
        for i, axis in enumerate(self.axes, 1):  # each value alone first: the error names its axis
            for point in axis.points:
                try:
                    _resolve(base, dict(zip(axis.fields, point)))
                except ConfigError as e:
                    shown = ", ".join(f"{f}={_plain(v)!r}" for f, v in zip(axis.fields, point))
                    raise ConfigError(f"{self.where}: axis {i} ({axis.label}) value {shown}: {e}") from None
        trials, keys = [], {}
        for index, combo in enumerate(itertools.product(*(axis.points for axis in self.axes))):
            values = tuple((f, v) for axis, point in zip(self.axes, combo) for f, v in zip(axis.fields, point))
            trial = Trial(index=index, config=self._config(base, values, index), values=values)
            key = canonical_json(trial_key(trial.config, bins=self.bins, evaluator=self.evaluator))
            if key in keys:
                other = trials[keys[key]]
                raise ConfigError(f"{self.where}: trials {other.index} ({other.label}) and {index} ({trial.label}) "
                                  "would train the same head and score it the same way; drop the axis that "
                                  "changes neither (e.g. run.device, run.threads, eval.interval)")
            keys[key] = index
            trials.append(trial)
        return tuple(trials)

    def _config(self, base: dict, values: tuple[tuple[str, Any], ...], index: int) -> TrainConfig:
        try:
            return _resolve(base, dict(values))
        except ConfigError as e:
            label = ", ".join(f"{f}={_plain(v)}" for f, v in values)
            raise ConfigError(f"{self.where}: trial {index} ({label}): {e}") from None


def _base_config(data: Any, top: dict, *, where: str, base_dir: Path) -> TrainConfig:
    """``base``: absent (defaults), a config file name, or a table of sections (optionally
    ``file``); ``top``: config sections written at the grid's top level, which override the file
    like ``[base.*]`` sections (a key set in both places is refused)."""
    if data is None:
        data = {}
    if isinstance(data, str):
        data = {"file": data}
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: base must be a config file name or a table of config sections, got {data!r}")
    sections = {k: dict(v) if isinstance(v, dict) else v for k, v in data.items()}
    file = sections.pop("file", None)
    for name, values in top.items():
        inline = sections.setdefault(name, {})
        twice = [k for k in values if isinstance(inline, dict) and k in inline]
        if twice:
            raise ConfigError(f"{where}: {name}.{twice[0]} is set in both [base.{name}] and [{name}]; keep one")
        if isinstance(inline, dict):
            inline.update(values)
    if file is not None and not isinstance(file, str):
        raise ConfigError(f"{where}: base file must be a path string, got {file!r}")
    try:
        start = load_config(base_dir / file if file is not None else None)
        return config_from_dict(config_to_dict(start), sections)
    except ConfigError as e:
        raise ConfigError(f"{where}: base: {e}") from None


def _axis(entry: Any) -> Axis:
    if not isinstance(entry, dict):
        raise ConfigError("must be a table ([[axis]] with field/values or zip)")
    unknown = [k for k in entry if k not in AXIS_KEYS]
    if unknown:
        raise ConfigError(f"unknown key {unknown[0]!r}; valid keys: {', '.join(AXIS_KEYS)}")
    if "zip" in entry:
        if "field" in entry or "values" in entry:
            raise ConfigError("give either field + values or zip, not both")
        table = entry["zip"]
        if not isinstance(table, dict) or not table:
            raise ConfigError('zip must be a non-empty table { "field" = [values], ... }')
        if any(not isinstance(v, list) for v in table.values()):
            raise ConfigError("every zip field needs a list of values")
        lengths = {f: len(v) for f, v in table.items()}
        if len(set(lengths.values())) != 1:
            shown = ", ".join(f"{f}: {n}" for f, n in lengths.items())
            raise ConfigError(f"zip lists have unequal lengths ({shown}); give every field one value per point")
        return Axis(fields=tuple(table), points=tuple(zip(*table.values())))
    if not isinstance(entry.get("field"), str) or "values" not in entry:
        raise ConfigError("needs field = \"section.key\" and values = [...] (or a zip table)")
    if not isinstance(entry["values"], list):
        raise ConfigError(f"{entry['field']}: values must be a list")
    return Axis(fields=(entry["field"],), points=tuple((v,) for v in entry["values"]))


def grid_from_dict(data: dict, *, source: str = "<inline>", base_dir: Path = Path("."), text: str = "") -> SweepGrid:
    """A grid from parsed TOML (see the module doc); ``base_dir`` resolves a base file name,
    ``source`` (the file's path) names the grid in messages."""
    where = f"grid {source}"
    unknown = [k for k in data if k not in TOP_KEYS and k not in SECTIONS]
    if unknown:
        raise ConfigError(f"{where}: unknown key {unknown[0]!r}; valid top-level keys: {', '.join(TOP_KEYS)} and the "
                          f"config sections {', '.join(SECTIONS)}")
    top = {k: v for k, v in data.items() if k in SECTIONS}
    if any(not isinstance(v, dict) for v in top.values()):
        raise ConfigError(f"{where}: config sections at the top level must be tables ([sampler], ...)")
    sweep = data.get("sweep", {})
    if not isinstance(sweep, dict) or any(k not in ("bins", "evaluator") for k in sweep):
        raise ConfigError(f"{where}: [sweep] takes bins (lvis | coco-lt) and evaluator (auto | fast | lvis-api)")
    entries = data.get("axis", [])
    if not isinstance(entries, list):
        raise ConfigError(f"{where}: axes are [[axis]] tables (an array of tables)")
    axes = []
    for i, entry in enumerate(entries, 1):
        try:
            axes.append(_axis(entry))
        except ConfigError as e:
            raise ConfigError(f"{where}: axis {i}: {e}") from None
    return SweepGrid(base=_base_config(data.get("base"), top, where=where, base_dir=base_dir), axes=tuple(axes),
                     bins=sweep.get("bins", "lvis"), evaluator=sweep.get("evaluator", "auto"), source=source, text=text)


def load_grid(path: str | Path) -> SweepGrid:
    """Read and expand the grid file ``path``; every error is one :class:`ConfigError` line."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"grid file {path} does not exist; pass a TOML grid (format: docs/sweeps.md)")
    text = path.read_text()
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"grid file {path} is not valid TOML: {e}") from None
    return grid_from_dict(data, source=str(path), base_dir=path.parent, text=text)


__all__ = ["Axis", "Trial", "SweepGrid", "config_fields", "grid_from_dict", "load_grid"]

"""Head-training settings: frozen dataclasses, loaded from TOML in one place.

``load_config(path, overrides)`` reads ``[sampler] [loss] [head] [schedule] [eval] [run] [fasa]
[combine]`` sections, rejects unknown sections/keys (naming the valid ones), then applies overrides —
``{"sampler.name": "rfs", "schedule.lr": "0.02"}`` (dotted keys; strings from a command line are
converted to the field's type) or nested ``{"sampler": {"name": "rfs"}}``.

Defaults are SimCal's calibration recipe (supp. G.2): bi-level sampling, 16 classes × 1 image,
bg:fg 1:1, SGD momentum 0.9, lr 0.01, ×0.1 at steps 8,000 and 11,000, 12,000 steps. Weight decay:
the supplement gives none; 1e-4 is the value of SimCal's mmdetection configs (its stand-alone
calibration loop builds SGD without decay or momentum) — set ``schedule.weight_decay = 0`` for that.

``[combine]`` is the dual-head combination (:class:`heads.combine.Combination`: rule, T, boundary,
thr, scale_ratio) the final evaluation uses and ``heads eval`` / ``serve inject`` take as their
default; it is a post-training setting, so it is not part of :func:`training_identity`.
"""

from __future__ import annotations

import dataclasses
import json
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path

from cache_schema.errors import ConfigError
from heads.combine import Combination
from heads.losses import LOSSES
from heads.models import HEADS
from heads.samplers import SAMPLERS


def _choice(section: str, key: str, value: str, valid) -> None:
    if value not in valid:
        raise ConfigError(f"{section}.{key} = {value!r} is unknown; valid: {', '.join(valid)}")


@dataclass(frozen=True, kw_only=True)
class SamplerConfig:
    name: str = "bilevel"
    batch_rois: int = 512            # random, class_balanced: RoIs per step
    classes_per_batch: int = 16      # bilevel: n
    images_per_class: int = 1        # bilevel
    class_replacement: bool = True   # bilevel: draw classes with replacement (SimCal code)
    keep: str = "drawn_classes"      # bilevel: "drawn_classes" (paper) | "own_class" (code)
    background_ratio: float = 1.0    # bilevel, class_balanced: bg:fg
    rfs_threshold: float = 0.001     # rfs: t
    images_per_batch: int = 16       # rfs: k
    max_rois: int = 0                # rfs: RoI budget per step, 0 = all RoIs of the k images

    def __post_init__(self) -> None:
        _choice("sampler", "name", self.name, SAMPLERS)
        _choice("sampler", "keep", self.keep, ("drawn_classes", "own_class"))
        if min(self.batch_rois, self.classes_per_batch, self.images_per_class, self.images_per_batch) <= 0:
            raise ConfigError("sampler: batch_rois, classes_per_batch, images_per_class, images_per_batch must be > 0")
        if self.background_ratio < 0 or self.rfs_threshold <= 0 or self.max_rois < 0:
            raise ConfigError("sampler: background_ratio >= 0, rfs_threshold > 0 and max_rois >= 0 are required")


@dataclass(frozen=True, kw_only=True)
class LossConfig:
    name: str = "ce"
    reweight_base: float = 100.0
    reweight_min: float = 0.1
    reweight_max: float = 10.0
    background_weight: float = 1.0
    focal_gamma: float = 3.0
    focal_alpha: float = 0.5
    margin_c: float = 6.0
    gumbel_sigma: float = 1.0
    gumbel_clip_min: float = -4.0
    gumbel_clip_max: float = 10.0
    train_background: bool = True     # gumbel/gol: fit the background output too (see losses.py)
    gol_lambda: float = 0.0011
    gol_tail_by: str = "image_frequency"  # | "group" (LVIS 'r')
    gol_background_mode: str = "code"     # | "paper"
    gol_clamp_max: float = 0.0            # 0 = no clamp (paper); GOL code: 20

    def __post_init__(self) -> None:
        _choice("loss", "name", self.name, LOSSES)
        _choice("loss", "gol_tail_by", self.gol_tail_by, ("image_frequency", "group"))
        _choice("loss", "gol_background_mode", self.gol_background_mode, ("code", "paper"))
        if not 0 < self.reweight_min <= self.reweight_max or self.reweight_base <= 0:
            raise ConfigError("loss: reweight needs reweight_base > 0 and 0 < reweight_min <= reweight_max")
        if self.focal_gamma < 0 or self.focal_alpha <= 0 or self.gumbel_sigma <= 0:
            raise ConfigError("loss: focal_gamma >= 0, focal_alpha > 0 and gumbel_sigma > 0 are required")
        if self.gumbel_clip_min >= self.gumbel_clip_max or self.gol_clamp_max < 0:
            raise ConfigError("loss: gumbel_clip_min < gumbel_clip_max and gol_clamp_max >= 0 are required")


@dataclass(frozen=True, kw_only=True)
class HeadConfig:
    name: str = "3fc_ft"
    hidden: int = 0                  # 0 = the detector's width when its weights are given, else 1024
    classifier_init: str = "auto"    # auto | detector | loss (see heads.build)
    ncm_metric: str = "cosine"
    ncm_scale: float = 16.0
    stage: int = 0                   # cascade stage whose classifier the head replaces (0: the only one otherwise)

    def __post_init__(self) -> None:
        _choice("head", "name", self.name, HEADS)
        if self.stage < 0:
            raise ConfigError(f"head.stage is {self.stage}; stages count from 0")
        _choice("head", "classifier_init", self.classifier_init, ("auto", "detector", "loss"))
        _choice("head", "ncm_metric", self.ncm_metric, ("cosine", "euclidean"))
        if self.hidden < 0 or self.ncm_scale <= 0:
            raise ConfigError("head: hidden >= 0 and ncm_scale > 0 are required")


@dataclass(frozen=True, kw_only=True)
class ScheduleConfig:
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-4
    milestones: tuple[int, ...] = (8000, 11000)
    gamma: float = 0.1
    max_steps: int = 12000
    warmup_steps: int = 0            # linear warm-up from warmup_ratio*lr (0 = off)
    warmup_ratio: float = 1.0 / 3.0
    grad_clip: float = 0.0           # max global grad norm, 0 = off

    def __post_init__(self) -> None:
        object.__setattr__(self, "milestones", tuple(int(m) for m in self.milestones))
        if self.lr <= 0 or not 0 <= self.momentum < 1 or self.weight_decay < 0 or self.max_steps <= 0:
            raise ConfigError("schedule: lr > 0, 0 <= momentum < 1, weight_decay >= 0, max_steps > 0 are required")
        if list(self.milestones) != sorted(set(self.milestones)) or any(m <= 0 for m in self.milestones):
            raise ConfigError(f"schedule.milestones {list(self.milestones)} must be positive and strictly increasing")
        if not 0 < self.gamma <= 1 or self.warmup_steps < 0 or not 0 < self.warmup_ratio <= 1 or self.grad_clip < 0:
            raise ConfigError("schedule: 0 < gamma <= 1, warmup_steps >= 0, 0 < warmup_ratio <= 1, grad_clip >= 0")

    def lr_at(self, step: int) -> float:
        """Learning rate of (0-based) step ``step``: warm-up, then ×gamma at each milestone."""
        lr = self.lr * self.gamma ** sum(step >= m for m in self.milestones)
        if step < self.warmup_steps:
            lr *= self.warmup_ratio + (1 - self.warmup_ratio) * step / self.warmup_steps
        return lr


@dataclass(frozen=True, kw_only=True)
class EvalConfig:
    interval: int = 500              # steps between validation-accuracy logs (0 = only at the end)
    bins: tuple[int, ...] = (10, 100, 1000)  # training-instance-count bin edges (AP1..AP4 of LVIS)
    max_rois: int = 20000            # foreground val RoIs scored (seeded subsample), 0 = all
    batch_rois: int = 8192
    snapshots: tuple[int, ...] = ()  # steps whose head is kept in RUN/snapshots/ (calibration dynamics)

    def __post_init__(self) -> None:
        object.__setattr__(self, "bins", tuple(int(b) for b in self.bins))
        object.__setattr__(self, "snapshots", tuple(int(s) for s in self.snapshots))
        if list(self.bins) != sorted(set(self.bins)) or self.interval < 0 or self.max_rois < 0 or self.batch_rois <= 0:
            raise ConfigError("eval: bins strictly increasing, interval >= 0, max_rois >= 0, batch_rois > 0 required")
        if list(self.snapshots) != sorted(set(self.snapshots)) or any(s <= 0 for s in self.snapshots):
            raise ConfigError(f"eval.snapshots {list(self.snapshots)} must be positive steps, strictly increasing")


@dataclass(frozen=True, kw_only=True)
class RunConfig:
    seed: int = 0
    log_interval: int = 50
    checkpoint_interval: int = 500
    device: str = "auto"
    threads: int = 0                 # 0 = leave torch's thread count alone

    def __post_init__(self) -> None:
        if self.seed < 0 or self.log_interval <= 0 or self.checkpoint_interval <= 0 or self.threads < 0:
            raise ConfigError("run: seed >= 0, log_interval > 0, checkpoint_interval > 0, threads >= 0 are required")


@dataclass(frozen=True, kw_only=True)
class FasaConfig:
    """FASA plug-in (heads.fasa); off by default."""

    enabled: bool = False
    momentum: float = 0.1
    loss_weight: float = 0.1
    period: int = 500                # steps per adaptation ("epoch"); virtual features start after one
    alpha: float = 1.1
    beta: float = 0.9
    num_groups: int = 8

    def __post_init__(self) -> None:
        if not 0 < self.momentum <= 1 or self.loss_weight < 0 or self.period <= 0 or self.num_groups <= 0:
            raise ConfigError("fasa: 0 < momentum <= 1, loss_weight >= 0, period > 0, num_groups > 0 are required")
        if self.alpha < 1 or not 0 < self.beta <= 1:
            raise ConfigError("fasa: alpha >= 1 and 0 < beta <= 1 are required")


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    run: RunConfig = field(default_factory=RunConfig)
    fasa: FasaConfig = field(default_factory=FasaConfig)
    combine: Combination = field(default_factory=Combination)

    def __post_init__(self) -> None:
        if self.eval.snapshots and self.eval.snapshots[-1] > self.schedule.max_steps:
            raise ConfigError(f"eval.snapshots step {self.eval.snapshots[-1]} is past schedule.max_steps "
                              f"= {self.schedule.max_steps}; snapshot steps must be in 1..max_steps")


SECTIONS: dict[str, type] = {f.name: f.default_factory for f in dataclasses.fields(TrainConfig)}  # type: ignore[misc]


def _coerce(section: str, key: str, value, hint):
    """``value`` as the field's type; strings (command line) are parsed."""
    where = f"{section}.{key}"
    origin = typing.get_origin(hint)
    if origin is tuple:
        if isinstance(value, str):
            value = [v for v in value.replace(" ", "").split(",") if v]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where} must be a list of integers, got {value!r}")
        try:
            return tuple(int(v) for v in value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where} must be a list of integers, got {value!r}") from None
    if hint is bool:
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where} must be true or false, got {value!r}")
    if hint in (int, float):
        what = "an integer" if hint is int else "a number (or inf)"
        if isinstance(value, str):  # float() also reads "inf" (a JSON-written or command-line T)
            try:
                value = hint(value)
            except ValueError:
                raise ConfigError(f"{where} must be {what}, got {value!r}") from None
        ok = isinstance(value, int) if hint is int else isinstance(value, (int, float))
        if isinstance(value, bool) or not ok:
            raise ConfigError(f"{where} must be {what}, got {value!r}")
        return hint(value)
    if origin is typing.Literal:  # the section's own check names the valid choices
        if not isinstance(value, str):
            raise ConfigError(f"{where} must be one of {', '.join(map(repr, typing.get_args(hint)))}, got {value!r}")
        return value
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where} must be a string, got {value!r}")
        return value
    raise ConfigError(f"{where}: unsupported setting type {hint}")  # pragma: no cover


def _section(name: str, values: dict):
    cls = SECTIONS[name]
    hints = typing.get_type_hints(cls)
    valid = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in values if k not in valid]
    if unknown:
        raise ConfigError(f"unknown key {name}.{unknown[0]}; valid keys of [{name}]: {', '.join(valid)}")
    return cls(**{k: _coerce(name, k, v, hints[k]) for k, v in values.items()})


def _nest(overrides: dict) -> dict[str, dict]:
    nested: dict[str, dict] = {}
    for key, value in overrides.items():
        if isinstance(value, dict):
            nested.setdefault(key, {}).update(value)
        elif "." in key:
            sec, sub = key.split(".", 1)
            nested.setdefault(sec, {})[sub] = value
        else:
            raise ConfigError(f"override {key!r} must be section.key (e.g. sampler.name); sections: {', '.join(SECTIONS)}")
    return nested


def config_from_dict(data: dict, overrides: dict | None = None) -> TrainConfig:
    """Build a :class:`TrainConfig` from nested section dicts plus overrides."""
    merged = {k: dict(v) if isinstance(v, dict) else v for k, v in data.items()}
    for sec, values in _nest(overrides or {}).items():
        if sec in merged and not isinstance(merged[sec], dict):
            raise ConfigError(f"[{sec}] must be a table of settings")
        merged.setdefault(sec, {}).update(values)
    unknown = [k for k in merged if k not in SECTIONS]
    if unknown:
        raise ConfigError(f"unknown config section [{unknown[0]}]; valid sections: {', '.join(SECTIONS)}")
    for sec, values in merged.items():
        if not isinstance(values, dict):
            raise ConfigError(f"[{sec}] must be a table of settings, got {values!r}")
    return TrainConfig(**{sec: _section(sec, values) for sec, values in merged.items()})


def load_config(path: str | Path | None, overrides: dict | None = None) -> TrainConfig:
    """Read ``path`` (TOML; ``None`` = all defaults) and apply ``overrides``."""
    data: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist; pass an existing .toml or omit it for defaults")
        try:
            data = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"config file {path} is not valid TOML: {e}") from None
    return config_from_dict(data, overrides)


def _plain(section) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(section).items()}


def config_to_dict(config: TrainConfig) -> dict[str, dict]:
    """Plain nested dict (tuples as lists) — JSON ready: ``combine.T = inf`` is the string
    ``"inf"`` (:meth:`heads.combine.Combination.to_dict`), which :func:`config_from_dict` reads."""
    out = {sec: _plain(getattr(config, sec)) for sec in SECTIONS}
    out["combine"] = config.combine.to_dict()
    return out


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)  # a JSON string is a valid TOML basic string
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(type(v))  # pragma: no cover


def dump_toml(config: TrainConfig) -> str:
    """The resolved config as TOML text; ``load_config`` of it gives back ``config``."""
    lines = []
    for sec in SECTIONS:  # the values themselves, not config_to_dict's: TOML writes inf as inf
        values = _plain(getattr(config, sec))
        lines.append(f"[{sec}]")
        lines += [f"{k} = {_toml_value(v)}" for k, v in values.items()]
        lines.append("")
    return "\n".join(lines)


def training_identity(config: TrainConfig) -> dict:
    """The settings a resumed run must share with the interrupted one (what shapes the weights);
    logging, eval, checkpoint cadence, device and ``[combine]`` (applied after training) may
    change between attempts."""
    d = config_to_dict(config)
    return {"sampler": d["sampler"], "loss": d["loss"], "head": d["head"], "schedule": d["schedule"],
            "fasa": d["fasa"], "seed": d["run"]["seed"]}


__all__ = ["TrainConfig", "FasaConfig", "SamplerConfig", "LossConfig", "HeadConfig", "ScheduleConfig", "EvalConfig", "RunConfig",
           "load_config", "config_from_dict", "config_to_dict", "dump_toml", "training_identity"]

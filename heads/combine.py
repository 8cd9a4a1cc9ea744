"""Dual-head combination rules: how the original and the calibrated head's scores become one.

SimCal (DESIGN.md §3; SimCal supplement, "How to Combine the Dual Heads", Table 1/8) keeps the
original head for well-represented classes and uses the calibrated head for the tail. This module
implements that rule (``sel``) and the alternatives the supplement compares against.

Conventions (every rule):
    ``p_orig``, ``p_cal``: float32 ``[N, C+1]`` softmax probabilities, background LAST (index C).
    ``instance_count``: int64 ``[C]`` training instances per class (``N_z``).
    A rule returns a tuple of *score streams*, each float32 ``[N, C]`` (foreground only: the
    background column is dropped after combining). Score-level rules return one stream; the
    detection-level rule ``det`` returns two (orig, cal) that the detection assembly turns into
    two detection sets and merges with per-class NMS (:func:`heads.evaluation.detections.merge_det`).

Rules (``RULES``, name -> class):
    ``orig``       s = p_orig[:, :C]
    ``cal-only``   s = p_cal[:, :C]
    ``avg``        s = (p_orig[:, :C] + p_cal[:, :C]) / 2
    ``sel``        s[:, z] = p_cal[:, z] if sel(N_z, T) else p_orig[:, z]; background = p_orig[:, C]
    ``sel-thr``    as ``sel`` with p_cal[p_cal < thr] = 0 first (``thr``, 0.05)
    ``sel-scale``  as ``sel`` with p_cal[:, :C] * r first, r = mean_n p_cal[n, C] / mean_n p_orig[n, C]
                   (``scale_ratio="cal/orig"``, the supplement's wording) or the inverse
                   (``"orig/cal"``, DESIGN.md's wording); means over the N rows given (one image
                   in inference), result clipped to 1
    ``sel-norm``   as ``sel``, then the row [s, p_orig[:, C]] is divided by its sum
    ``det``        streams (p_orig[:, :C], p_cal[:, :C]); merged at detection level

The rule and its settings (T, boundary, thr, scale_ratio) are one validated record,
:class:`Combination`, used by ``heads train``'s ``[combine]`` section, ``heads eval``, the
checkpoint ``serve inject`` writes and ``serve eval``.

``sel(N_z, T)`` is ``N_z <= T`` (``boundary="le"``, the paper, T = 300) or ``N_z < T``
(``boundary="lt"``, the official code, which uses T = 100 on LVIS and 400 on COCO-LT).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, fields, replace
from typing import ClassVar, Literal

import numpy as np
import torch

from cache_schema.errors import CheckpointError, ConfigError

BOUNDARIES = ("le", "lt")
SCALE_RATIOS = ("cal/orig", "orig/cal")


#: One line per setting of :class:`Combination`: the help of the command-line flags.
FIELD_HELP = {
    "T": "sel*: classes with at most T training instances take the calibrated score (inf: all).",
    "boundary": "le (N <= T, paper) | lt (N < T, official code).",
    "thr": "sel-thr: calibrated scores below this probability are zeroed (paper: 0.05).",
    "scale_ratio": "sel-scale: cal/orig (supplement) | orig/cal (DESIGN.md) ratio of mean background scores.",
}


def _number(name: str, value) -> float:
    """``value`` as a float; refuses bools and non-numbers (a TOML/JSON typo must not pass)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"combine: {name}={value!r} must be a number")
    return float(value)


@dataclass(frozen=True, kw_only=True)
class Combination:
    """How the original and the calibrated head's scores become one: the rule and its settings.

    One record everywhere: ``heads train`` (its ``[combine]`` section), ``heads eval``, the
    ``calibration`` record ``serve inject`` writes into a checkpoint, ``serve eval``.

    Attributes:
        rule: a rule of :data:`RULES` (``orig``, ``cal-only``, ``avg``, ``sel``, ...).
        T: instance-count threshold of the ``sel*`` rules (training instances, float >= 0);
            ``math.inf`` selects the calibrated head for every class.
        boundary: ``"le"`` (N_z <= T, paper) or ``"lt"`` (N_z < T, official code).
        thr: probability in [0, 1) below which ``sel-thr`` zeroes calibrated scores.
        scale_ratio: direction of the background-mean ratio of ``sel-scale`` (see module doc).
    """

    rule: str = "sel"
    T: float = 300.0
    boundary: Literal["le", "lt"] = "le"
    thr: float = 0.05
    scale_ratio: Literal["cal/orig", "orig/cal"] = "cal/orig"

    def __post_init__(self) -> None:
        if not isinstance(self.rule, str) or self.rule not in RULES:
            raise ConfigError(f"combine: rule {self.rule!r} unknown; choose one of {', '.join(RULES)}")
        # Stored as float: T=300 (TOML int) and T=300.0 are the same combination.
        object.__setattr__(self, "T", _number("T", self.T))
        object.__setattr__(self, "thr", _number("thr", self.thr))
        if math.isnan(self.T) or self.T < 0:
            raise ConfigError(f"combine: T={self.T} must be a count >= 0 (or inf); e.g. T=300")
        if self.boundary not in BOUNDARIES:
            raise ConfigError(f"combine: boundary {self.boundary!r} unknown; use 'le' (N<=T, paper) or 'lt' (N<T, code)")
        if not 0.0 <= self.thr < 1.0:
            raise ConfigError(f"combine: thr={self.thr} must be in [0, 1); the paper uses 0.05")
        if self.scale_ratio not in SCALE_RATIOS:
            raise ConfigError(f"combine: scale_ratio {self.scale_ratio!r} unknown; use 'cal/orig' or 'orig/cal'")

    def use_cal(self, instance_count: torch.Tensor) -> torch.Tensor:
        """bool ``[C]``: classes whose score comes from the calibrated head (``instance_count``:
        int ``[C]`` training instances per class)."""
        counts = instance_count.to(torch.float64)
        return counts <= self.T if self.boundary == "le" else counts < self.T

    def override(self, **changes) -> "Combination":
        """A copy with the fields given and not None changed (``dataclasses.replace``, validated):
        how command-line flags left unset fall back to a recorded combination."""
        return replace(self, **{k: v for k, v in changes.items() if v is not None})

    def per_rule(self, rules: Iterable[str]) -> tuple["Combination", ...]:
        """These settings under each of ``rules`` (each rule once, order kept): the rows of one
        evaluation, which are keyed by rule."""
        return tuple(self.override(rule=r) for r in dict.fromkeys(rules))

    def to_dict(self) -> dict:
        """Plain JSON-valid dict; ``T = inf`` becomes the string ``"inf"`` (JSON has no infinity)."""
        return {"rule": self.rule, "T": self.T if math.isfinite(self.T) else "inf", "boundary": self.boundary,
                "thr": self.thr, "scale_ratio": self.scale_ratio}

    @classmethod
    def from_dict(cls, d: dict, *, where: str = "combination record") -> "Combination":
        """Inverse of :meth:`to_dict`; missing keys take the defaults (records written before a
        field existed). A malformed record raises :class:`CheckpointError` naming ``where``, a
        bad value the :class:`ConfigError` of validation."""
        if not isinstance(d, dict):
            raise CheckpointError(f"{where}: combination must be a table of settings, got {type(d).__name__}")
        valid = [f.name for f in fields(cls)]
        unknown = [k for k in d if k not in valid]
        if unknown:
            raise CheckpointError(f"{where}: unknown combination key {unknown[0]!r}; valid keys: {', '.join(valid)}")
        values = dict(d)
        if isinstance(values.get("T"), str):
            values["T"] = _parse_T(values["T"], where=where)
        return cls(**values)


def _parse_T(text: str, *, where: str = "combine") -> float:
    """A threshold written as text: a number or ``inf`` (JSON records, TOML strings)."""
    try:
        return float(text.strip())
    except ValueError:
        raise ConfigError(f"{where}: T={text!r} must be a number or inf, e.g. 300") from None


def recorded_combination(head_meta: dict | None) -> Combination:
    """The ``[combine]`` section a head run recorded (``heads train`` keeps its resolved config in
    the head's meta); the record's defaults for a head trained before that section existed."""
    section = ((head_meta or {}).get("config") or {}).get("combine")
    return Combination() if section is None else Combination.from_dict(section, where="the head's [combine] config")


def _check_probs(name: str, p: torch.Tensor, c: int | None) -> None:
    if p.ndim != 2 or p.shape[1] < 2:
        raise ConfigError(f"combine: {name} has shape {tuple(p.shape)}; expected [N, C+1] softmax probabilities")
    if c is not None and p.shape[1] != c + 1:
        raise ConfigError(
            f"combine: {name} has {p.shape[1]} columns but instance_count has {c} classes; "
            "use a head trained on this store (C+1 outputs, background last)"
        )


def _prepare(
    *, p_orig: torch.Tensor, p_cal: torch.Tensor | None, instance_count: torch.Tensor | np.ndarray, need_cal: bool
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    counts = torch.as_tensor(np.asarray(instance_count) if not isinstance(instance_count, torch.Tensor) else instance_count)
    if counts.ndim != 1:
        raise ConfigError(f"combine: instance_count has shape {tuple(counts.shape)}; expected [C]")
    c = int(counts.shape[0])
    _check_probs("p_orig", p_orig, c)
    if p_cal is None:
        if need_cal:
            raise ConfigError("combine: this rule needs the calibrated head's probabilities; pass cal logits or use 'orig'")
        return p_orig.float(), None, counts.to(p_orig.device)
    _check_probs("p_cal", p_cal, c)
    if p_cal.shape[0] != p_orig.shape[0]:
        raise ConfigError(f"combine: p_orig has {p_orig.shape[0]} rows, p_cal {p_cal.shape[0]}; they must score the same RoIs")
    return p_orig.float(), p_cal.float().to(p_orig.device), counts.to(p_orig.device)


class Rule:
    """Base of the combination rules: ``rule(p_orig=, p_cal=, instance_count=, config=)``.

    Returns a tuple of float32 ``[N, C]`` score streams (see module doc). ``detection_level``
    is True when the streams must be merged after detection (``det``).
    """

    name: ClassVar[str] = ""
    needs_cal: ClassVar[bool] = True
    detection_level: ClassVar[bool] = False

    def __call__(
        self,
        *,
        p_orig: torch.Tensor,
        p_cal: torch.Tensor | None,
        instance_count: torch.Tensor | np.ndarray,
        config: Combination,
    ) -> tuple[torch.Tensor, ...]:
        po, pc, counts = _prepare(p_orig=p_orig, p_cal=p_cal, instance_count=instance_count, need_cal=self.needs_cal)
        return tuple(s.contiguous() for s in self.streams(po, pc, counts, config))

    def streams(
        self, po: torch.Tensor, pc: torch.Tensor | None, counts: torch.Tensor, config: Combination
    ) -> tuple[torch.Tensor, ...]:
        raise NotImplementedError


class Orig(Rule):
    """s = p_orig[:, :C] (the original head alone)."""

    name = "orig"
    needs_cal = False

    def streams(self, po, pc, counts, config):
        return (po[:, :-1],)


class CalOnly(Rule):
    """s = p_cal[:, :C] (the calibrated head alone)."""

    name = "cal-only"

    def streams(self, po, pc, counts, config):
        return (pc[:, :-1],)


class Avg(Rule):
    """s = (p_orig[:, :C] + p_cal[:, :C]) / 2 (plain two-model ensemble)."""

    name = "avg"

    def streams(self, po, pc, counts, config):
        return ((po[:, :-1] + pc[:, :-1]) * 0.5,)


def _select(po_fg: torch.Tensor, pc_fg: torch.Tensor, counts: torch.Tensor, config: Combination) -> torch.Tensor:
    """Foreground columns of the ``sel`` rule: cal for tail classes, orig for the others."""
    return torch.where(config.use_cal(counts)[None, :], pc_fg, po_fg)


class Sel(Rule):
    """s[:, z] = p_cal[:, z] if N_z <= T (or < T) else p_orig[:, z]; background from orig."""

    name = "sel"

    def streams(self, po, pc, counts, config):
        return (_select(po[:, :-1], pc[:, :-1], counts, config),)


class SelThr(Rule):
    """``sel`` after zeroing calibrated scores below ``thr`` (drops low-confidence cal output)."""

    name = "sel-thr"

    def streams(self, po, pc, counts, config):
        pc_fg = pc[:, :-1]
        pc_fg = torch.where(pc_fg < config.thr, torch.zeros_like(pc_fg), pc_fg)
        return (_select(po[:, :-1], pc_fg, counts, config),)


class SelScale(Rule):
    """``sel`` after scaling calibrated foreground scores by the ratio of mean background scores.

    Why: the calibrated head is trained with a 1:1 background:foreground ratio, so its mean
    background probability is lower (and foreground higher) than the original head's; the ratio
    of the two means over the RoIs given (one image at inference) rescales its foreground.
    """

    name = "sel-scale"

    def streams(self, po, pc, counts, config):
        if po.shape[0] == 0:
            return (_select(po[:, :-1], pc[:, :-1], counts, config),)
        bg_orig = po[:, -1].double().mean()
        bg_cal = pc[:, -1].double().mean()
        num, den = (bg_cal, bg_orig) if config.scale_ratio == "cal/orig" else (bg_orig, bg_cal)
        # A zero mean (degenerate head) would give inf/nan: leave the scores unscaled then.
        ratio = float(num / den) if float(den) > 0.0 else 1.0
        # Clip at 1: a ratio > 1 may push a probability past 1, which is not a score.
        pc_fg = (pc[:, :-1] * ratio).clamp_(max=1.0)
        return (_select(po[:, :-1], pc_fg, counts, config),)


class SelNorm(Rule):
    """``sel``, then each row [s, p_orig[:, C]] (incl. orig background) divided by its sum."""

    name = "sel-norm"

    def streams(self, po, pc, counts, config):
        fg = _select(po[:, :-1], pc[:, :-1], counts, config)
        total = fg.sum(dim=1, keepdim=True) + po[:, -1:]
        # Rows summing to 0 cannot occur for softmax inputs; guard anyway so no NaN escapes.
        return (fg / total.clamp_min(torch.finfo(torch.float32).tiny),)


class Det(Rule):
    """Two streams (p_orig[:, :C], p_cal[:, :C]); each becomes a detection set, merged by NMS."""

    name = "det"
    detection_level = True

    def streams(self, po, pc, counts, config):
        return (po[:, :-1], pc[:, :-1])


RULES: dict[str, type[Rule]] = {
    cls.name: cls for cls in (Orig, CalOnly, Avg, Sel, SelThr, SelScale, SelNorm, Det)
}


def get_rule(name: str) -> Rule:
    """The rule called ``name`` (one of :data:`RULES`)."""
    try:
        return RULES[name]()
    except KeyError:
        raise ConfigError(f"unknown combination rule {name!r}; choose one of {', '.join(RULES)}") from None


def combine_scores(
    name: str,
    *,
    p_orig: torch.Tensor,
    p_cal: torch.Tensor | None,
    instance_count: torch.Tensor | np.ndarray,
    config: Combination | None = None,
) -> tuple[torch.Tensor, ...]:
    """Apply rule ``name``; returns its score streams (float32 ``[N, C]`` each, see module doc)."""
    rule = get_rule(name)
    return rule(p_orig=p_orig, p_cal=p_cal, instance_count=instance_count, config=config or Combination(rule=name))

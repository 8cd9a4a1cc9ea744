"""Metric records of an LVIS evaluation, AP bins by training-instance count, tables and files.

AP values are fractions in [0, 1] as LVISEval reports them; ``-1.0`` marks a group (frequency
group, area range or bin) with no category that has ground truth in the evaluated images —
LVISEval's own convention. Tables print percentages and ``-`` for ``-1``.
"""

from __future__ import annotations

import json
import math
import os
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cache_schema.errors import ConfigError

# LVISEval's summary keys we keep, in display order.
SUMMARY_KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "APr", "APc", "APf")


@dataclass(frozen=True, kw_only=True)
class BinSpec:
    """AP bins by TRAINING-instance count: bin ``i`` holds categories with count in
    ``[edges[i], edges[i+1])``; with ``first_open`` the first bin excludes its lower edge.

    Defaults are the LVIS bins (0, 10), [10, 100), [100, 1000), [1000, inf) named AP1..AP4
    (SimCal); :meth:`coco_lt` gives [1, 20), [20, 400), [400, 8000), [8000, inf).
    """

    edges: tuple[float, ...] = (0.0, 10.0, 100.0, 1000.0, math.inf)
    names: tuple[str, ...] = ("AP1", "AP2", "AP3", "AP4")
    first_open: bool = True

    def __post_init__(self) -> None:
        if len(self.edges) < 2 or len(self.names) != len(self.edges) - 1:
            raise ConfigError(f"BinSpec: {len(self.edges)} edges need {len(self.edges) - 1} names, got {len(self.names)}")
        if any(not b > a for a, b in zip(self.edges, self.edges[1:])):
            raise ConfigError(f"BinSpec: edges {self.edges} must increase strictly, e.g. (0, 10, 100, 1000, inf)")
        clash = set(self.names) & set(SUMMARY_KEYS)
        if clash or len(set(self.names)) != len(self.names):
            raise ConfigError(f"BinSpec: bin names {self.names} must be unique and not LVIS keys like {sorted(clash)}")

    @classmethod
    def lvis(cls) -> "BinSpec":
        """(0, 10), [10, 100), [100, 1000), [1000, inf)."""
        return cls()

    @classmethod
    def coco_lt(cls) -> "BinSpec":
        """[1, 20), [20, 400), [400, 8000), [8000, inf) (SimCal's COCO-LT)."""
        return cls(edges=(1.0, 20.0, 400.0, 8000.0, math.inf), first_open=False)

    @classmethod
    def preset(cls, name: str) -> "BinSpec":
        """``"lvis"`` or ``"coco-lt"``."""
        presets = {"lvis": cls.lvis, "coco-lt": cls.coco_lt}
        if name not in presets:
            raise ConfigError(f"unknown AP-bin preset {name!r}; use 'lvis' or 'coco-lt'")
        return presets[name]()

    def assign(self, counts: np.ndarray) -> np.ndarray:
        """int64 ``[C]``: bin index of each count, ``-1`` when it falls in no bin."""
        counts = np.asarray(counts, dtype=np.float64)
        out = np.full(counts.shape, -1, dtype=np.int64)
        for i, (lo, hi) in enumerate(zip(self.edges, self.edges[1:])):
            above = counts > lo if (i == 0 and self.first_open) else counts >= lo
            out[above & (counts < hi)] = i
        return out

    def to_dict(self) -> dict:
        return {"edges": [_json_float(e) for e in self.edges], "names": list(self.names), "first_open": self.first_open}

    @classmethod
    def from_dict(cls, d: Mapping) -> "BinSpec":
        return cls(edges=tuple(float(e) for e in d["edges"]), names=tuple(d["names"]), first_open=bool(d["first_open"]))


def _json_float(x: float) -> float | str:
    """Floats for strict JSON: infinities as the strings "inf"/"-inf" (json.loads-able via float())."""
    return x if math.isfinite(x) else ("inf" if x > 0 else "-inf")


@dataclass(frozen=True, kw_only=True)
class IouMetrics:
    """Results of one IoU type (``segm`` or ``bbox``).

    Attributes:
        summary: AP, AP50, AP75, APs, APm, APl, APr, APc, APf and the bin names -> AP in [0, 1]
            (``-1.0``: no category of that group has ground truth in the evaluated images).
        per_category: json category id -> AP (``-1.0`` when it has no ground truth there).
        num_detections: detections evaluated (after the per-image ``max_dets`` cut).
    """

    summary: dict[str, float]
    per_category: dict[int, float]
    num_detections: int

    def __post_init__(self) -> None:
        missing = [k for k in SUMMARY_KEYS if k not in self.summary]
        if missing:
            raise ConfigError(f"IouMetrics: summary lacks {missing}")

    def __getitem__(self, key: str) -> float:
        return self.summary[key]

    def to_dict(self) -> dict:
        return {
            "summary": dict(self.summary),
            "per_category": {str(k): v for k, v in self.per_category.items()},
            "num_detections": self.num_detections,
        }

    @classmethod
    def from_dict(cls, d: Mapping) -> "IouMetrics":
        return cls(
            summary={k: float(v) for k, v in d["summary"].items()},
            per_category={int(k): float(v) for k, v in d["per_category"].items()},
            num_detections=int(d["num_detections"]),
        )


@dataclass(frozen=True, kw_only=True)
class Metrics:
    """An LVIS evaluation: per IoU type results, the bins used and notes (e.g. empty results)."""

    segm: IouMetrics | None
    bbox: IouMetrics | None
    bins: BinSpec
    num_images: int
    max_dets: int = 300
    notes: tuple[str, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if self.segm is None and self.bbox is None:
            raise ConfigError("Metrics: neither segm nor bbox results; evaluate at least one IoU type")

    @property
    def primary(self) -> IouMetrics:
        """Mask results when present (the papers' headline AP), else box results."""
        return self.segm if self.segm is not None else self.bbox  # type: ignore[return-value]

    def to_dict(self) -> dict:
        return {
            "segm": self.segm.to_dict() if self.segm is not None else None,
            "bbox": self.bbox.to_dict() if self.bbox is not None else None,
            "bins": self.bins.to_dict(),
            "num_images": self.num_images,
            "max_dets": self.max_dets,
            "notes": list(self.notes),
        }

    @classmethod
    def from_dict(cls, d: Mapping) -> "Metrics":
        return cls(
            segm=IouMetrics.from_dict(d["segm"]) if d.get("segm") else None,
            bbox=IouMetrics.from_dict(d["bbox"]) if d.get("bbox") else None,
            bins=BinSpec.from_dict(d["bins"]),
            num_images=int(d["num_images"]),
            max_dets=int(d["max_dets"]),
            notes=tuple(d.get("notes", ())),
        )


def _mean_valid(s: np.ndarray) -> float:
    """LVISEval._summarize's reduction: the mean of the entries > -1, or -1 when there are none."""
    valid = s[s > -1]
    return float(np.mean(valid)) if len(valid) else -1.0


def summarize_precision(
    precision: np.ndarray,
    *,
    iou_thrs: np.ndarray,
    area_labels: Sequence[str],
    cat_ids: Sequence[int],
    frequency: Sequence[str],
    instance_count: Sequence[int],
    bins: BinSpec,
    num_detections: int,
) -> IouMetrics:
    """:class:`IouMetrics` from LVISEval's accumulated precision.

    Args:
        precision: float64 ``[T, R, K, A]`` (IoU thresholds, recall thresholds, categories, area
            ranges), ``-1`` where a category has no ground truth.
        iou_thrs: the ``T`` IoU thresholds; area_labels: the ``A`` area-range names ("all" first).
        cat_ids, frequency ("r"/"c"/"f"), instance_count: per category, in ``precision``'s order.
    The summary keys use LVISEval._summarize's own indexing and reduction, so the values are
    bit-identical to ``LVISEval.results`` for the same precision array (tested).
    """
    def area(label: str) -> list[int]:
        return [i for i, a in enumerate(area_labels) if a == label]

    def at_iou(thr: float) -> np.ndarray:
        return precision[np.where(thr == iou_thrs)[0]]

    groups = {g: [i for i, f in enumerate(frequency) if f == g] for g in ("r", "c", "f")}
    summary = {
        "AP": _mean_valid(precision[:, :, :, area("all")]),
        "AP50": _mean_valid(at_iou(0.50)[:, :, :, area("all")]),
        "AP75": _mean_valid(at_iou(0.75)[:, :, :, area("all")]),
        "APs": _mean_valid(precision[:, :, :, area("small")]),
        "APm": _mean_valid(precision[:, :, :, area("medium")]),
        "APl": _mean_valid(precision[:, :, :, area("large")]),
        **{f"AP{g}": _mean_valid(precision[:, :, groups[g], area("all")]) for g in ("r", "c", "f")},
    }
    which = bins.assign(np.asarray(instance_count, dtype=np.int64))
    for i, name in enumerate(bins.names):
        summary[name] = _mean_valid(precision[:, :, np.flatnonzero(which == i), 0])
    prec = precision[:, :, :, 0]
    valid = prec > -1
    total = np.where(valid, prec, 0.0).sum(axis=(0, 1))
    n = valid.sum(axis=(0, 1))
    per_cat = np.where(n > 0, total / np.maximum(n, 1), -1.0)
    return IouMetrics(summary=summary, per_category={int(c): float(a) for c, a in zip(cat_ids, per_cat)},
                      num_detections=num_detections)


def _pct(x: float | None) -> str:
    return "-" if x is None or x < 0 else f"{100.0 * x:.1f}"


def format_table(rows: Mapping[str, Metrics]) -> str:
    """Plain-text table: one row per entry, columns AP, the bins (AP1-AP4), APr, APc, APf, box AP.

    AP/bins/APr/APc/APf are mask AP when a row has mask results (else box AP); values in percent.
    """
    bin_names: list[str] = []
    for m in rows.values():
        bin_names += [n for n in m.bins.names if n not in bin_names]
    header = ["", "AP", *bin_names, "APr", "APc", "APf", "box AP"]
    body = []
    for name, m in rows.items():
        p = m.primary
        cells = [name, _pct(p["AP"]), *(_pct(p.summary.get(b)) for b in bin_names)]
        cells += [_pct(p["APr"]), _pct(p["APc"]), _pct(p["APf"])]
        cells.append(_pct(m.bbox["AP"]) if m.bbox is not None else "-")
        body.append(cells)
    widths = [max(len(str(r[i])) for r in [header, *body]) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in [header, *body]]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Write ``text`` to ``path`` via a temporary sibling and a rename, so a crash never leaves a
    partial file under the final name. Creates parent directories."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{threading.get_ident()}")  # unique per writer
    try:
        with tmp.open("w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_results(path: str | os.PathLike[str], results: list[dict]) -> Path:
    """Write detections in LVIS results format (a json list of dicts), atomically."""
    return atomic_write_text(path, json.dumps(results))


def write_metrics(path: str | os.PathLike[str], metrics: Metrics) -> Path:
    """Write ``metrics.to_dict()`` as indented json, atomically."""
    return atomic_write_text(path, json.dumps(metrics.to_dict(), indent=2, allow_nan=False))


def read_metrics(path: str | os.PathLike[str]) -> Metrics:
    """Inverse of :func:`write_metrics`."""
    with Path(path).open(encoding="utf-8") as f:
        return Metrics.from_dict(json.load(f))

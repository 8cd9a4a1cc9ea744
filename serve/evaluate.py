"""``serve eval``: full inference over the val images and LVIS evaluation (mask and box AP).

The detector runs once per image and every requested combination rule or threshold
(``--sweep-T``) is applied to its RoIs right away, so nothing per-RoI is kept between images.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from cache_schema.errors import ConfigError, DatasetError
from cache_schema.runtime import check_output, configure_threads, pick_device, sha256_file
from extract.datasets.images import read_rgb
from extract.datasets.lvis_json import check_images_exist, load_annotations, resolve_split
from extract.detectors.backends import check_class_table
from heads.combine import Combination
from heads.evaluation import BinSpec, LvisEvaluator, Metrics, format_table, read_metrics, write_metrics, write_results
from serve.dual import DualHeadDetector


@dataclass(frozen=True, kw_only=True)
class EvalRun:
    """Outcome of :func:`evaluate_detector`: one metrics row per (combine, T) asked for."""

    rows: dict[str, Metrics]
    images: int
    inference_seconds: float
    evaluation_seconds: float
    out_dir: Path

    def table(self) -> str:
        return format_table(self.rows)


def load_eval_run(out_dir: Path, ckpt: Path) -> EvalRun | None:
    """A finished evaluation of exactly ``ckpt`` in ``out_dir`` (to reuse it), or ``None``."""
    path = Path(out_dir) / "eval_summary.json"
    try:
        summary = json.loads(path.read_text())
        if summary.get("checkpoint_sha256") != sha256_file(ckpt):
            return None
        rows = {name: read_metrics(Path(out_dir) / f"metrics_{name.replace('@T=', '_T')}.json") for name in summary["rows"]}
    except (OSError, ValueError, KeyError):
        return None
    return EvalRun(rows=rows, images=summary["images"], inference_seconds=summary["inference_seconds"],
                   evaluation_seconds=summary["evaluation_seconds"], out_dir=Path(out_dir))


def _progress(enabled: bool) -> Progress:
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[rate]}"), TimeRemainingColumn(), disable=not enabled)


def image_count(annset, limit: int | None) -> int:
    """Images evaluated: all of ``annset``, or its first ``limit``."""
    return len(annset) if limit is None else min(limit, len(annset))


def run_inference(detector: DualHeadDetector, annset, *, combinations: tuple[Combination, ...], batch_size: int,
                  progress: bool, limit: int | None = None, max_dets: int = 300) -> list[list[dict]]:
    """LVIS results of every val image (position order) under each of ``combinations``: one
    list per combination. Images stream through (nothing per-RoI is kept); a progress bar shows
    images/s."""
    n = image_count(annset, limit)
    results: list[list[dict]] = [[] for _ in combinations]
    start = time.perf_counter()
    with _progress(progress) as bar:
        task = bar.add_task("inference", total=n, rate="")
        for lo in range(0, n, batch_size):
            idx = range(lo, min(lo + batch_size, n))
            inferred = detector.infer([read_rgb(annset.image_path(p)) for p in idx], combinations=combinations,
                                      max_dets=max_dets)
            for p, inf in zip(idx, inferred):
                im = annset.images[p]
                for k, dets in enumerate(inf.dets):
                    results[k] += detector.results(inf.out, dets, image_id=im.id, image_size=(im.height, im.width),
                                                   request=inf.request)
            rate = f"{idx.stop / max(time.perf_counter() - start, 1e-9):.2f} img/s"
            bar.update(task, advance=len(idx), rate=rate)
    return results


def _row_name(c: Combination, many_T: bool) -> str:
    if c.rule in ("orig", "cal-only", "avg", "det") or not many_T:
        return c.rule
    return f"{c.rule}@T={c.T:g}"


def evaluate_detector(*, ckpt: Path, data: Path, out_dir: Path, combines: tuple[str, ...] | None = None,
                      T: float | None = None, boundary: str | None = None, thr: float | None = None,
                      scale_ratio: str | None = None, sweep_T: tuple[float, ...] = (), bins: BinSpec | None = None,
                      device: str | None = None, batch_size: int = 4, max_dets: int = 300,
                      progress: bool = True, limit: int | None = None, detector_config: str | None = None,
                      overwrite: bool = True) -> EvalRun:
    """Run ``ckpt`` over ``data``'s val split and evaluate each requested combination.

    ``combines`` (rule names) default to the checkpoint's own rule (``orig`` for a plain
    detector); ``T``, ``boundary``, ``thr``, ``scale_ratio`` override, each when given, the
    injected combination's field (:class:`heads.combine.Combination`); ``sweep_T`` evaluates
    ``sel`` at each threshold (SimCal Fig. 4c). ``limit`` evaluates only the first images.
    """
    configure_threads()
    if batch_size < 1:
        raise ConfigError(f"--batch-size {batch_size} must be >= 1")
    if limit is not None and limit < 1:
        raise ConfigError(f"--limit {limit} must be >= 1 (or left out for every val image)")
    # Before inference: no time lost on a bad --out; False refuses a previous evaluation's folder.
    out_dir = check_output(out_dir, kind="dir", overwrite=overwrite, marker="eval_summary.json")
    changes = dict(T=T, boundary=boundary, thr=thr, scale_ratio=scale_ratio)
    Combination().override(**changes)  # a bad value is refused before the detector loads
    json_path, image_root = resolve_split(Path(data), "val")
    annset = load_annotations(json_path, image_root)
    if len(annset) == 0:
        raise DatasetError(f"{json_path} lists no images; give a dataset with val images")
    check_images_exist(annset)
    detector = DualHeadDetector(path=Path(ckpt), device=pick_device(device), config=detector_config)
    if detector.category_ids is None:  # names only (mmdet): checked by name, ids from the json
        check_class_table(detector.adapter.categories, annset, json_path)
        detector.category_ids = tuple(annset.cat_ids)
    if tuple(annset.cat_ids) != detector.category_ids:
        raise DatasetError(f"{json_path}: categories differ from the detector's; evaluate on the dataset it was trained on")
    wanted = [detector.with_default(rule=c, **changes) for c in (combines or (detector.default.rule,))]
    wanted += [detector.with_default(**{**changes, "rule": "sel", "T": t}) for t in sweep_T]
    wanted = list(dict.fromkeys(wanted))  # e.g. --combine sel --sweep-T 300 asks for sel@300 twice
    for c in wanted:
        detector.check(c)
    t0 = time.perf_counter()
    results = run_inference(detector, annset, combinations=tuple(wanted), batch_size=batch_size, progress=progress,
                            limit=limit, max_dets=max_dets)
    inference_s = time.perf_counter() - t0
    n = image_count(annset, limit)
    images = annset.images[:n]
    out_dir.mkdir(parents=True, exist_ok=True)
    t1 = time.perf_counter()
    names = [_row_name(c, bool(sweep_T)) for c in wanted]
    # The rules' LVIS evaluations run in parallel worker processes (see LvisEvaluator).
    with LvisEvaluator(gt_json=json_path, bins=bins, max_dets=max_dets, image_ids=[im.id for im in images]) as lvis:
        for name, res in zip(names, results):
            lvis.submit(name, res)
            write_results(out_dir / f"results_{name.replace('@T=', '_T')}.json", res)
        rows: dict[str, Metrics] = lvis.gather()
    for name, metrics in rows.items():
        write_metrics(out_dir / f"metrics_{name.replace('@T=', '_T')}.json", metrics)
    eval_s = time.perf_counter() - t1
    summary = {"checkpoint": str(ckpt), "checkpoint_sha256": sha256_file(ckpt), "images": n, "inference_seconds": inference_s,
               "evaluation_seconds": eval_s, "images_per_second": n / max(inference_s, 1e-9),
               "rows": {k: m.to_dict() for k, m in rows.items()},
               "T": {k: (c.T if math.isfinite(c.T) else "inf") for k, c in zip(names, wanted)},
               "combinations": {k: c.to_dict() for k, c in zip(names, wanted)}}
    (out_dir / "eval_summary.json").write_text(json.dumps(summary, indent=1))
    return EvalRun(rows=rows, images=n, inference_seconds=inference_s, evaluation_seconds=eval_s, out_dir=out_dir)

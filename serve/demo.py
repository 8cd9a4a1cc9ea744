"""``roicache demo``: the whole pipeline on the embedded benchmark, reusing what is still valid.

benchmark → detector → extract → heads train (bi-level, 3fc_ft) → serve inject → serve eval,
then one table in the shape of SimCal's Table 3 (orig / cal-only / dual rows), the calibration
speed-up against the online recipe, cached-vs-full evaluation, and plots under the run directory.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from rich.console import Console

from cache_schema import open_store
from cache_schema.errors import SchemaError
from cache_schema.runtime import sha256_file
from extract.datasets import SynthConfig, generate
from extract.detectors.train import train_detector
from extract.detectors.train_config import DetectorTrainConfig
from extract.writer import ExtractConfig, extract
from heads.config import load_config
from heads.evaluation import format_table
from heads.pipeline import evaluate_from_store, train_from_store
from serve.evaluate import evaluate_detector
from serve.inject import inject
from serve.online import calibrate_online
from serve.plots import plot_bins, plot_per_class

#: The demo's calibration schedule: SimCal's 12k-step schedule scaled to 1/4 (same lr, same
#: decay points relative to the end) so the demo fits its 30-minute budget on 2 CPU cores.
DEMO_SCHEDULE = {"schedule.max_steps": 3000, "schedule.milestones": "2000,2750"}
SPEED_STEPS = 20  # steps timed for the online-vs-cache ratio (per-step ratio; see bench/)


@dataclass(frozen=True, kw_only=True)
class DemoConfig:
    data: SynthConfig = field(default_factory=SynthConfig)
    detector: DetectorTrainConfig = field(default_factory=DetectorTrainConfig)
    extract: ExtractConfig = field(default_factory=ExtractConfig)
    calibration: dict = field(default_factory=lambda: {**DEMO_SCHEDULE, "sampler.name": "bilevel",
                                                       "head.name": "3fc_ft", "loss.name": "ce", "run.threads": 1})
    T: float = 300.0
    speed_steps: int = SPEED_STEPS


def _step(console: Console, title: str) -> float:
    console.rule(f"[bold]{title}")
    return time.perf_counter()


def _reusable_store(path: Path, ckpt: Path) -> bool:
    try:
        store = open_store(path)
    except SchemaError:
        return False
    return store.is_complete and store.meta.detector.checkpoint_sha256 == sha256_file(ckpt)


def _timed_calibration(out: Path, store: Path, ckpt: Path, overrides: dict, steps: int, progress: bool) -> dict:
    """Per-step wall time of the same calibration from the cache and through the detector."""
    record = out / "speed.json"
    if record.is_file() and json.loads(record.read_text()).get("checkpoint") == sha256_file(ckpt):
        return json.loads(record.read_text())
    short = {**overrides, "schedule.max_steps": steps, "schedule.milestones": f"{steps * 10}",
             "run.checkpoint_interval": steps, "eval.interval": 0}
    cfg = load_config(None, short)
    t0 = time.perf_counter()
    train_from_store(cache=str(store), config=cfg, out_dir=out / "cached", progress=progress)
    cached_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    calibrate_online(ckpt=ckpt, cache=str(store), config=cfg, out_dir=out / "online", progress=progress)
    online_s = time.perf_counter() - t0
    result = {"checkpoint": sha256_file(ckpt), "steps": steps, "cached_s": cached_s, "online_s": online_s,
              "speedup": online_s / max(cached_s, 1e-9)}
    record.write_text(json.dumps(result, indent=1))
    return result


def run_demo(*, out_dir: Path, progress: bool = True, config: DemoConfig | None = None) -> dict:
    """Run (or resume) the demo in ``out_dir``; returns the numbers it printed."""
    cfg = config or DemoConfig()
    console = Console()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}

    data = out_dir / "data"
    t = _step(console, "1/6 benchmark")
    if not (data / "meta.json").is_file():
        generate(cfg.data, data, progress=progress)
    timings["data"] = time.perf_counter() - t

    t = _step(console, "2/6 detector")
    ckpt = out_dir / "detector" / "detector.pt"
    if not ckpt.is_file():
        ckpt = train_detector(data_dir=data, out_dir=out_dir / "detector", config=cfg.detector, progress=progress)
    timings["detector"] = time.perf_counter() - t

    t = _step(console, "3/6 extract")
    store = out_dir / "cache.zarr"
    if not _reusable_store(store, ckpt):
        resume = store.exists()
        extract(ckpt=ckpt, data=data, out=str(store), progress=progress,
                config=replace(cfg.extract, resume=resume))
    timings["extract"] = time.perf_counter() - t

    t = _step(console, "4/6 heads train (bi-level, 3fc_ft)")
    run = out_dir / "heads" / "simcal"
    result = train_from_store(cache=str(store), config=load_config(None, cfg.calibration), out_dir=run, progress=progress)
    timings["calibrate"] = time.perf_counter() - t
    console.print(f"calibration: {result.steps} steps")

    t = _step(console, "5/6 serve inject + full evaluation")
    injected = out_dir / "detector_sel.pt"
    inject(ckpt=ckpt, head=run, combine="sel", T=cfg.T, out=injected)
    full = evaluate_detector(ckpt=injected, data=data, out_dir=out_dir / "eval_full",
                             combines=("orig", "cal-only", "sel"), progress=progress)
    timings["full_eval"] = time.perf_counter() - t

    t = _step(console, "6/6 cached evaluation and calibration speed")
    t_cached = time.perf_counter()
    cached = evaluate_from_store(cache=str(store), head=run, combines=("orig", "cal-only", "sel"), T=cfg.T,
                                 out_dir=out_dir / "eval_cached", progress=progress)
    cached_eval_s = time.perf_counter() - t_cached
    speed = _timed_calibration(out_dir / "speed", store, ckpt, cfg.calibration, cfg.speed_steps, progress)
    timings["cached_eval_and_speed"] = time.perf_counter() - t

    rows = {"orig": full.rows["orig"], "cal-only": full.rows["cal-only"], f"dual (sel, T={cfg.T:g})": full.rows["sel"]}
    plots = out_dir / "plots"
    plots.mkdir(exist_ok=True)
    plot_bins(rows, plots / "ap_by_bin.png")
    train_json = json.loads((data / "train.json").read_text())
    counts = {int(c["id"]): int(c["instance_count"]) for c in train_json["categories"]}
    plot_per_class(rows, counts, plots / "ap_per_class.png")

    full_s = full.inference_seconds + full.evaluation_seconds
    console.rule("[bold]result (mask AP, %; full inference on val, official LVIS API)")
    console.print(format_table(rows))
    console.print(f"calibration from the cache vs online through the detector ({speed['steps']} steps, same seed): "
                  f"{speed['speedup']:.1f}x faster per step")
    console.print(f"cached evaluation {cached_eval_s:.0f} s vs full evaluation {full_s:.0f} s "
                  f"({full_s / max(cached_eval_s, 1e-9):.1f}x); sel AP cached {100 * cached.rows['sel'].primary['AP']:.2f} "
                  f"vs full {100 * full.rows['sel'].primary['AP']:.2f}")
    console.print(f"stage times (s): " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items()))
    console.print(f"plots: {plots}")
    summary = {"rows": {k: m.to_dict() for k, m in rows.items()}, "speed": speed, "timings": timings,
               "cached_eval_s": cached_eval_s, "full_eval_s": full_s,
               "cached_rows": {k: m.to_dict() for k, m in cached.rows.items()}}
    (out_dir / "demo_summary.json").write_text(json.dumps(summary, indent=1))
    return summary

"""``roicache demo``: the whole pipeline on the embedded benchmark, reusing what is still valid.

benchmark → the shipped detector (or, with ``train_detector``, a short-recipe one trained here) →
extract → heads train (bi-level, 3fc_ft) → serve inject → serve eval → heads sweep (the
combination rules and sel's T, from cached evaluation), then one table in the shape of SimCal's
Table 3 (orig / cal-only / dual rows), the sweep's table, the calibration speed-up against the
online recipe, and plots under the run directory.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from rich.console import Console

from cache_schema import open_store
from cache_schema.errors import RoicacheError, SchemaError
from cache_schema.runtime import available_cores, sha256_file
from extract.datasets import SynthConfig, generate
from extract.detectors.checkpoint import read_torch_file
from extract.detectors.shipped import shipped_checkpoint
from extract.detectors.train import train_detector
from extract.detectors.train_config import DetectorTrainConfig
from extract.writer import ExtractConfig, extract
from heads.combine import Combination
from heads.config import load_config
from heads.models import load_head
from heads.evaluation import format_table
from heads.pipeline import train_from_store
from heads.sweep.grid import Axis, SweepGrid
from heads.sweep.jobs import head_finished
from heads.sweep.results import head_dir
from heads.sweep.runner import plan_sweep, run_sweep
from serve.evaluate import evaluate_detector, load_eval_run
from serve.inject import inject
from serve.online import calibrate_online
from serve.plots import plot_bins, plot_per_class

#: The demo's calibration schedule: SimCal's 12k-step schedule scaled to 1/4 (same lr, same
#: decay points relative to the end) so the demo fits its 30-minute budget on 2 CPU cores.
DEMO_SCHEDULE = {"schedule.max_steps": 3000, "schedule.milestones": "2000,2750"}
#: The demo's detector: the default recipe cut to 460 steps (~0.58 epoch, ~9.5 min on 2 idle CPU
#: cores at the 0.81 it/s measured there) so that a fresh `make demo` fits 30 minutes; the budget
#: stops it at 9.5 min on a slower machine. `roicache detector train` alone keeps 750 steps.
DEMO_DETECTOR = DetectorTrainConfig(max_steps=460, time_budget_s=9.5 * 60.0)
#: The demo's sweep (SimCal supplement Table 1 and Fig. 4c): every dual-head combination rule at
#: the demo's T, then ``sel`` across T — one calibrated head, each row a cached evaluation.
SWEEP_RULES = ("cal-only", "avg", "det", "sel-scale", "sel-norm")
SWEEP_T = (0.0, 10.0, 30.0, 100.0, 300.0, 1000.0, 3000.0)
SPEED_STEPS = 10  # online steps timed for the cache-vs-online per-step ratio (bench/ runs more)


@dataclass(frozen=True, kw_only=True)
class DemoConfig:
    data: SynthConfig = field(default_factory=SynthConfig)
    detector: DetectorTrainConfig = DEMO_DETECTOR
    train_detector: bool = False  # False: the shipped converged detector; True: train DEMO_DETECTOR
    extract: ExtractConfig = field(default_factory=ExtractConfig)
    calibration: dict = field(default_factory=lambda: {**DEMO_SCHEDULE, "sampler.name": "bilevel",
                                                       "head.name": "3fc_ft", "loss.name": "ce",
                                                       "run.threads": available_cores()})
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


def _finished_run(run: Path, config, store: Path) -> bool:
    """A head run that finished with exactly ``config`` on this store (so it can be reused)."""
    try:
        metrics = json.loads((run / "metrics.json").read_text())
        same_config = load_config(run / "config.toml", None) == config
        _, _, meta = load_head(run / "head.pt")
    except (OSError, ValueError, RoicacheError):
        return False
    return same_config and metrics.get("steps") == config.schedule.max_steps and \
        meta.get("store", {}).get("detector_sha256") == open_store(store).meta.detector.checkpoint_sha256


def _extract_parallel(ckpt: Path, data: Path, store: Path, config: ExtractConfig, progress: bool) -> None:
    """Fill the store with one shard process per core (each single-threaded: on a busy 2-core box
    that beats one process with two threads); shard 0 creates it, all resume what is missing."""
    shards = max(1, min(available_cores(), 4))
    if shards == 1:
        extract(ckpt=ckpt, data=data, out=str(store), progress=progress, config=replace(config, resume=True))
        return
    args = [sys.executable, "-m", "extract", "--ckpt", str(ckpt), "--data", str(data), "--out", str(store),
            "--splits", ",".join(config.splits), "--levels", ",".join(config.levels), "--resume",
            "--threads", "1", "--batch-size", str(config.batch_size)]
    procs = [subprocess.Popen([*args, "--shard", f"{i}/{shards}", *([] if progress and i == 0 else ["--quiet"])])
             for i in range(shards)]
    codes = [p.wait() for p in procs]
    if any(codes):
        raise RoicacheError(f"extraction shard(s) failed with exit codes {codes}; rerun `roicache demo` to resume")


def _timed_calibration(out: Path, store: Path, ckpt: Path, run: Path, overrides: dict, steps: int,
                       progress: bool) -> dict:
    """Per-step wall time of the calibration from the cache (the rate the main run in ``run``
    measured over its whole schedule) and through the detector (the first ``steps`` steps of the
    same schedule, same seed: per-step cost does not depend on the step)."""
    record = out / "speed.json"
    main_run = json.loads((run / "metrics.json").read_text())
    cached_rate = main_run.get("steps_per_second")
    if record.is_file() and (old := json.loads(record.read_text())).get("checkpoint") == sha256_file(ckpt) and \
            old.get("cached_steps_per_s") == cached_rate and old.get("steps") == steps:
        return old
    shutil.rmtree(out / "online", ignore_errors=True)  # a finished run there would resume at its end
    cfg = load_config(None, {**overrides, "schedule.max_steps": steps, "run.checkpoint_interval": steps,
                             "eval.interval": 0})
    t0 = time.perf_counter()
    online = calibrate_online(ckpt=ckpt, cache=str(store), config=cfg, out_dir=out / "online", progress=progress)
    online_total_s = time.perf_counter() - t0
    if not cached_rate or not online.steps_per_second:
        raise RoicacheError(f"no steps/s recorded in {run / 'metrics.json'} or the online run; delete {run} and rerun")
    result = {"checkpoint": sha256_file(ckpt), "steps": steps, "cached_steps": main_run["steps"],
              "cached_steps_per_s": cached_rate, "online_steps_per_s": online.steps_per_second,
              "online_total_s": online_total_s, "speedup": cached_rate / online.steps_per_second}
    record.write_text(json.dumps(result, indent=1))
    return result


def _demo_grid(cfg: DemoConfig) -> SweepGrid:
    """The sweep of :data:`SWEEP_RULES` at ``cfg.T`` then ``sel`` at each of :data:`SWEEP_T`, zipped
    on one axis so that a single head is trained with the demo's calibration config."""
    rules = (*SWEEP_RULES, *("sel",) * len(SWEEP_T))
    thresholds = (*(cfg.T,) * len(SWEEP_RULES), *SWEEP_T)
    axis = Axis(fields=("combine.rule", "combine.T"), points=tuple(zip(rules, thresholds)))
    return SweepGrid(base=load_config(None, cfg.calibration), axes=(axis,), source="<demo>")


def _seed_sweep_head(store: Path, grid: SweepGrid, sweep_dir: Path, run: Path) -> None:
    """Give the sweep step 4's head instead of letting it train the same one again (~1.5 min).

    The grid varies post-training fields only, so it has one training identity; that identity
    is content-addressed (every training field and the store's fingerprint) and training is
    deterministic (step 4's source, loaded or streamed, gives the sweep's head bit for bit), so
    a copy of the finished run is the head the sweep would train. Copied, not linked: the sweep
    writes its diagnostics next to it."""
    (train_id,) = {ids.train_id for ids in plan_sweep(open_store(str(store)), grid).ids}
    target = head_dir(sweep_dir, train_id)
    if not head_finished(target) and head_finished(run):
        partial = target.with_name(target.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)  # a killed copy
        shutil.copytree(run, partial)
        shutil.rmtree(target, ignore_errors=True)  # a killed sweep's unfinished attempt
        partial.rename(target)


def _sweep_table(md_path: Path) -> str:
    """The sweep's markdown table without its preamble (the lines that form the table)."""
    return "\n".join(line for line in md_path.read_text().splitlines() if line.startswith("|"))


def _detector_steps(ckpt: Path) -> dict:
    """Steps the demo's detector trained (and whether its time budget stopped it), from its meta."""
    meta = read_torch_file(ckpt, what="detector checkpoint").get("meta", {})
    return {k: meta.get(k) for k in ("steps_done", "total_steps", "stopped_by_time_budget", "epochs_done")}


def run_demo(*, out_dir: Path, progress: bool = True, config: DemoConfig | None = None) -> dict:
    """Run (or resume) the demo in ``out_dir``; returns the numbers it printed."""
    cfg = config or DemoConfig()
    console = Console()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}

    data = out_dir / "data"
    t = _step(console, "1/7 benchmark")
    if not (data / "meta.json").is_file():
        generate(cfg.data, data, progress=progress)
    timings["data"] = time.perf_counter() - t

    t = _step(console, "2/7 detector")
    if cfg.train_detector:
        ckpt = out_dir / "detector" / "detector.pt"
        if not ckpt.is_file():
            ckpt = train_detector(data_dir=data, out_dir=out_dir / "detector", config=cfg.detector, progress=progress)
    else:
        ckpt = shipped_checkpoint()
        console.print(f"the shipped detector: {ckpt}")
    timings["detector"] = time.perf_counter() - t

    t = _step(console, "3/7 extract")
    store = out_dir / "cache.zarr"
    if not _reusable_store(store, ckpt):
        _extract_parallel(ckpt, data, store, cfg.extract, progress)
    timings["extract"] = time.perf_counter() - t

    t = _step(console, "4/7 heads train (bi-level, 3fc_ft)")
    run = out_dir / "heads" / "simcal"
    calib = load_config(None, cfg.calibration)
    if _finished_run(run, calib, store):
        console.print(f"reusing the calibrated head in {run}")
    else:
        result = train_from_store(cache=str(store), config=calib, out_dir=run, progress=progress)
        console.print(f"calibration: {result.steps} steps, {result.steps_per_second or 0:.1f} steps/s")
    timings["calibrate"] = time.perf_counter() - t

    t = _step(console, "5/7 serve inject + full evaluation")
    injected = out_dir / "detector_sel.pt"
    inject(ckpt=ckpt, head=run, combination=Combination(rule="sel", T=cfg.T), out=injected, overwrite=True)
    full = load_eval_run(out_dir / "eval_full", injected) or evaluate_detector(
        ckpt=injected, data=data, out_dir=out_dir / "eval_full", combines=("orig", "cal-only", "sel"), progress=progress)
    timings["full_eval"] = time.perf_counter() - t

    t = _step(console, "6/7 heads sweep: combination rules and T, from cached evaluation")
    grid = _demo_grid(cfg)
    _seed_sweep_head(store, grid, out_dir / "sweep", run)
    sweep = run_sweep(cache=str(store), grid=grid, out_dir=out_dir / "sweep", progress=progress, overwrite=True)
    timings["sweep"] = time.perf_counter() - t

    t = _step(console, "7/7 calibration speed: the same calibration online, through the detector")
    speed = _timed_calibration(out_dir / "speed", store, ckpt, run, cfg.calibration, cfg.speed_steps, progress)
    timings["speed"] = time.perf_counter() - t

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
    console.print(f"calibration from the cache vs online through the detector (same config and seed; cache: all "
                  f"{speed['cached_steps']} steps, online: the first {speed['steps']}): {speed['cached_steps_per_s']:.1f} "
                  f"vs {speed['online_steps_per_s']:.2f} steps/s, {speed['speedup']:.0f}x faster per step")
    console.print(f"full evaluation: {full.images} images, {full.inference_seconds:.0f} s inference, "
                  f"{full.evaluation_seconds:.0f} s LVIS API (3 rules); `heads eval` gives the same numbers "
                  "from the cache alone (bench/RESULTS.md, P4)")
    steps = _detector_steps(ckpt)
    console.print(f"detector: {steps['steps_done']} of {steps['total_steps']} steps"
                  + (" (stopped by its time budget)" if steps["stopped_by_time_budget"] else ""))
    console.print("stage times (s): " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items()))
    console.print(f"sweep ({sweep.total} trials, {sweep.trained} head trained; {sweep.report.md_path}):")
    console.print(_sweep_table(sweep.report.md_path))
    console.print(f"plots: {plots} and {out_dir / 'sweep' / 'plots'}")
    summary = {"rows": {k: m.to_dict() for k, m in rows.items()}, "speed": speed, "timings": timings,
               "sweep_table": str(sweep.report.md_path), "sweep_heads_trained": sweep.trained,
               "full_eval_s": full_s, "detector_steps": steps}
    (out_dir / "demo_summary.json").write_text(json.dumps(summary, indent=1))
    return summary

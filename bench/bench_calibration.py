"""P2: bi-level calibration streaming from zarr vs in memory — steps/s, RoIs/s, peak memory.

    python bench/bench_calibration.py [--store runs/demo/cache.zarr] [--quick] [--steps 300]
                                      [--head 3fc_ft] [--repeats 3] [--full-schedule | --full-only]

Each trial is a fresh subprocess (so its peak RSS is its own) running
``heads.pipeline.train_from_store`` with ``stream="never"`` (``choose_source`` loads the whole
train level) or ``stream="always"`` (per-image block reads every step), same seed, same steps,
1 torch thread, SimCal's bi-level sampler. Trials alternate never/always with the order rotated.
Per-step time comes from the training log (``run.log_interval = 1``): the loop from step 2 to the
last step, so neither the source set-up nor the final validation pass is in it.
``--full-schedule`` also runs the whole 12,000-step schedule once in memory and reports its wall
time; ``--full-only`` runs only that.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import _common as C  # noqa: E402  (adds the repo root to sys.path)


def _overrides(head: str, steps: int, *, full: bool) -> dict:
    o = {"sampler.name": "bilevel", "head.name": head, "loss.name": "ce", "run.threads": 1, "run.seed": 0,
         "schedule.max_steps": steps, "run.checkpoint_interval": steps, "eval.interval": 0,
         "run.log_interval": 50 if full else 1}
    return o


def child(args: argparse.Namespace) -> None:
    """One trial; prints one JSON line with its measurements."""
    rss0 = C.peak_rss_mib()
    from cache_schema import open_store
    from heads.config import load_config
    from heads.models import level_for_head
    from heads.pipeline import train_from_store

    store = open_store(args.store)
    level = level_for_head(args.head)
    train_bytes = store.split("train").nbytes(level)
    val_bytes = store.split("val").nbytes(level) if "val" in store.splits else 0
    rss_imports = C.peak_rss_mib()
    out = Path(args.run_dir)
    if out.exists():
        shutil.rmtree(out)
    cfg = load_config(None, _overrides(args.head, args.steps, full=args.full))
    t0 = time.perf_counter()
    result = train_from_store(cache=str(args.store), config=cfg, out_dir=out, stream=args.child, progress=False)
    wall = time.perf_counter() - t0
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    steps = [r for r in log if "loss" in r]
    secs = [r["seconds"] for r in steps]
    per_step = [b - a for a, b in zip(secs, secs[1:])]
    span_steps = steps[-1]["step"] - steps[0]["step"]
    print(json.dumps({
        "mode": args.child, "wall_s": wall, "loop_s": result.metrics["seconds"],
        "steps_per_s": span_steps / (secs[-1] - secs[0]),
        "median_step_s": statistics.median(per_step) if per_step and not args.full else None,
        "rois_per_step": sum(r["rois_per_step"] for r in steps) / len(steps),
        "setup_s": wall - result.metrics["seconds"],
        "peak_rss_mib": C.peak_rss_mib(), "rss_after_imports_mib": rss_imports, "rss_start_mib": rss0,
        "train_level_bytes": train_bytes, "val_level_bytes": val_bytes, "final_loss": result.final_loss,
        "steps": result.steps, "head": str(result.head_path)}))


def _trial(store: Path, head: str, steps: int, mode: str, run_dir: Path, *, full: bool = False) -> dict:
    cmd = [sys.executable, __file__, "--child", mode, "--store", str(store), "--head", head, "--steps", str(steps),
           "--run-dir", str(run_dir)] + (["--full"] if full else [])
    env = {**os.environ, "ROICACHE_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"trial {mode} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _weights_diff(a: str, b: str) -> float:
    import torch

    sa = torch.load(a, weights_only=True)["state_dict"]
    sb = torch.load(b, weights_only=True)["state_dict"]
    return max(float((sa[k].float() - sb[k].float()).abs().max()) for k in sa)


def read_amplification(store: Path, head: str, steps: int) -> tuple[float, float, float]:
    """(distinct images, RoIs decoded, RoIs used) per step, mean over the run's first ``steps``
    batches: streaming decodes every RoI of each drawn image (one chunk per image)."""
    import numpy as np

    from cache_schema import open_store
    from heads.build import build_sampler
    from heads.config import load_config
    from heads.sources import RoiIndex

    s = open_store(store)
    index = RoiIndex.from_roiset(s.split("train").load(level=None), num_classes=s.meta.num_classes)
    cfg = load_config(None, _overrides(head, steps, full=False))
    sampler = build_sampler(cfg.sampler, index=index, class_info=s.classes, seed=cfg.run.seed)
    imgs, decoded, used = [], [], []
    for step in range(steps):
        rows = sampler.batch(step).rows
        blocks = np.unique(index.blocks_of_rows(rows))
        imgs.append(len(blocks))
        decoded.append(int((index.image_offsets[blocks + 1] - index.image_offsets[blocks]).sum()))
        used.append(len(rows))
    return float(np.mean(imgs)), float(np.mean(decoded)), float(np.mean(used))


def full_schedule(args: argparse.Namespace, work: Path) -> str:
    """The whole 12,000-step schedule once in memory (SimCal's milestones 8k/11k)."""
    load0 = os.getloadavg()[0]
    f = _trial(args.store, args.head, 12000, "never", work / "full_12k", full=True)
    return (f"- measured: the full 12,000-step schedule in memory (milestones 8k/11k, head {args.head}) took "
            f"{f['wall_s'] / 60:.1f} min wall ({f['loop_s'] / 60:.1f} min loop incl. the final val pass, "
            f"{f['steps_per_s']:.2f} steps/s, set-up {f['setup_s']:.0f} s, peak RSS {f['peak_rss_mib']:,.0f} MiB, "
            f"final loss {f['final_loss']:.4f}); load average (1 min) {load0:.2f} at start, {os.getloadavg()[0]:.2f} at end")


def parent(args: argparse.Namespace) -> None:
    steps, repeats = (30, 2) if args.quick else (args.steps, args.repeats)
    work = C.BENCH_OUT / "calibration"
    if args.full_only:
        C.emit(C.header(f"P2 — full 12k-step calibration in memory ({args.head})", extra={
            "what": "`train_from_store` stream=never, bi-level, loss ce, seed 0, 1 torch thread, fresh subprocess",
            "store": str(args.store)}) + "\n\n" + full_schedule(args, work), args.out)
        return
    trials: dict[str, list[dict]] = {"never": [], "always": []}
    loads = []
    for r in range(repeats):
        loads.append(os.getloadavg()[0])
        order = ["never", "always"] if r % 2 == 0 else ["always", "never"]
        for mode in order:
            trials[mode].append(_trial(args.store, args.head, steps, mode, work / f"{mode}_{r}"))
            print(f"[bench] repeat {r} {mode}: {trials[mode][-1]['steps_per_s']:.2f} steps/s", file=sys.stderr)
    mem, stream = trials["never"], trials["always"]
    ratios = [s["steps_per_s"] / m["steps_per_s"] for m, s in zip(mem, stream)]
    med = lambda rows, key: statistics.median(r[key] for r in rows)  # noqa: E731
    sps_mem, sps_str = med(mem, "steps_per_s"), med(stream, "steps_per_s")
    rois = med(mem, "rois_per_step")
    extra = lambda rows: statistics.median(r["peak_rss_mib"] - r["rss_after_imports_mib"] for r in rows)  # noqa: E731
    same = _weights_diff(mem[0]["head"], stream[0]["head"])
    amp = read_amplification(args.store, args.head, steps)
    tb, vb = mem[0]["train_level_bytes"], mem[0]["val_level_bytes"]
    hdr = C.header(f"P2 — calibration streaming vs in memory ({args.head})", extra={
        "what": f"`train_from_store` bi-level sampler, head {args.head}, loss ce, seed 0, {steps} steps, 1 torch "
                f"thread, one fresh subprocess per trial; per-step time from log.jsonl (steps 2..{steps})",
        "repeats": f"{repeats} pairs, alternating order; load average (1 min) {min(loads):.2f}–{max(loads):.2f}",
        "store": str(args.store)})
    rows = []
    for name, rs in (("in memory (stream=never)", mem), ("streaming (stream=always)", stream)):
        rows.append([name, f"{med(rs, 'steps_per_s'):.2f}", f"{med(rs, 'steps_per_s') * med(rs, 'rois_per_step'):,.0f}",
                     f"{med(rs, 'setup_s'):.1f} s", f"{med(rs, 'wall_s'):.1f} s", f"{med(rs, 'peak_rss_mib'):,.0f}",
                     f"{med(rs, 'rss_after_imports_mib'):,.0f}",
                     f"{statistics.median(r['peak_rss_mib'] - r['rss_after_imports_mib'] for r in rs):,.0f}"])
    body = C.table(["mode", "steps/s", "RoIs/s", "set-up (load, val, index)", f"wall for {steps} steps",
                    "peak RSS MiB", "RSS after imports MiB", "peak − imports MiB"], rows)
    lines = [
        f"- streaming / in-memory steps/s: **{statistics.median(ratios):.3f}** (per pair: "
        + ", ".join(f"{x:.3f}" for x in ratios) + "; target >= 0.8)",
        f"- RoIs per step (bi-level, 16 classes x 1 image, bg:fg 1:1): {rois:.0f}; streaming reads whole images: "
        f"{amp[0]:.1f} distinct images, {amp[1]:,.0f} RoIs decoded per step for {amp[2]:.0f} used "
        f"({amp[1] / amp[2]:.1f}x read amplification)",
        f"- feature level bytes in memory (`split.nbytes`): train {tb / 2**20:,.0f} MiB, val {vb / 2**20:,.0f} MiB "
        f"(train_from_store always loads the val level for the accuracy monitor)",
        f"- memory the run adds (peak RSS − RSS after imports) / bytes of the train level: in memory "
        f"{extra(mem) / (tb / 2**20):.2f}, streaming {extra(stream) / (tb / 2**20):.3f}",
        f"- max |weight difference| between the in-memory and the streaming head (same seed): {same:.3g}",
        f"- extrapolated (not measured) wall time of the 12k-step SimCal schedule in memory at the median "
        f"{sps_mem:.2f} steps/s: {12000 / sps_mem / 60:.1f} min loop + {med(mem, 'setup_s'):.0f} s set-up; "
        f"streaming at {sps_str:.2f} steps/s: {12000 / sps_str / 60:.1f} min",
    ]
    if args.full_schedule:
        lines.append(full_schedule(args, work))
    C.emit(f"{hdr}\n\n{body}\n\n" + "\n".join(lines), args.out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--store", type=Path, default=C.DEMO_STORE)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--head", default="3fc_ft")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--full-schedule", action="store_true", help="also run the 12k-step schedule once in memory")
    ap.add_argument("--full-only", action="store_true", help="only the 12k-step run (no streaming comparison)")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--child", choices=("never", "always"), help=argparse.SUPPRESS)
    ap.add_argument("--run-dir", help=argparse.SUPPRESS)
    ap.add_argument("--full", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        child(a)
    else:
        a.out = a.out or C.BENCH_OUT / f"bench_calibration_{a.head}{'_12k' if a.full_only else ''}.md"
        parent(a)


if __name__ == "__main__":
    main()

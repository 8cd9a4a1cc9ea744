"""FASA's cost over plain calibration: steps/s with and without the feature-augmentation plug-in.

    python bench/bench_fasa.py [--store runs/demo/cache.zarr] [--head 3fc_ft] [--steps 1000]
                               [--repeats 3] [--quick]

FASA (ICCV'21) reports +3% training cost. Here both modes run the same bi-level calibration
(`heads.pipeline.train_from_store`, in memory, 1 torch thread, same seed and steps) on one loaded
store, alternating plain / FASA with the order rotated each repeat. The FASA run includes
everything the plug-in adds: the class statistics and virtual features every step, and the
per-class validation loss and regrouping at every adaptation period (``fasa.period``). Steps/s
comes from each run's own ``metrics.json`` (the loop only, not loading the store).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
from pathlib import Path

import _common as C  # noqa: E402  (adds the repo root to sys.path)


def _config(head: str, steps: int, fasa: bool, period: int):
    from heads.config import load_config

    return load_config(None, {
        "sampler.name": "bilevel", "head.name": head, "loss.name": "ce", "run.seed": 0, "run.threads": 1,
        "schedule.max_steps": steps, "schedule.milestones": f"{int(steps * 2 / 3)},{int(steps * 11 / 12)}",
        "run.checkpoint_interval": steps, "eval.interval": 0, "run.log_interval": max(1, steps // 10),
        "fasa.enabled": fasa, "fasa.period": period})


def _run(store: str, head: str, steps: int, fasa: bool, period: int, out: Path) -> dict:
    from heads.pipeline import train_from_store

    if out.exists():
        shutil.rmtree(out)
    result = train_from_store(cache=store, config=_config(head, steps, fasa, period), out_dir=out,
                              stream="never", progress=False)
    return {"steps_per_s": result.steps_per_second, "loop_s": result.metrics["seconds"],
            "adaptations": (result.metrics.get("fasa") or {}).get("adaptations")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store", type=Path, default=C.DEMO_STORE)
    ap.add_argument("--head", default="3fc_ft")
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--period", type=int, default=250, help="FASA adaptation period (steps)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", type=Path, default=C.BENCH_OUT / "bench_fasa.md")
    args = ap.parse_args()
    steps, repeats, period = (40, 1, 10) if args.quick else (args.steps, args.repeats, args.period)
    import torch

    torch.set_num_threads(1)
    work = C.BENCH_OUT / "fasa"
    runs: dict[str, list[dict]] = {"plain": [], "fasa": []}
    loads = []
    _run(str(args.store), args.head, min(steps, 20), True, max(1, min(period, 10)), work / "warmup")  # imports, page cache
    for r in range(repeats):
        loads.append(os.getloadavg()[0])
        order = ["plain", "fasa"] if r % 2 == 0 else ["fasa", "plain"]
        for mode in order:
            runs[mode].append(_run(str(args.store), args.head, steps, mode == "fasa", period, work / f"{mode}_{r}"))
    ratios = [f["steps_per_s"] / p["steps_per_s"] for p, f in zip(runs["plain"], runs["fasa"])]
    cost = [1 / x - 1 for x in ratios]
    rows = [[m, f"{statistics.median(x['steps_per_s'] for x in runs[m]):.1f}",
             ", ".join(f"{x['steps_per_s']:.1f}" for x in runs[m]), runs[m][0]["adaptations"]] for m in runs]
    text = "\n".join([
        C.header(f"FASA cost over plain calibration ({args.head})", extra={
            "what": f"bi-level, loss ce, {steps} steps, fasa.period {period}, seed 0, 1 torch thread, in memory",
            "store": str(args.store)}),
        "",
        C.table(["mode", "median steps/s", "per repeat", "FASA adaptations"], rows),
        "",
        f"- FASA / plain steps/s: **{statistics.median(ratios):.3f}** (per repeat: "
        f"{', '.join(f'{x:.3f}' for x in ratios)}); extra time per step "
        f"{100 * statistics.median(cost):+.1f}% (paper: +3%)",
        f"- load average (1 min) at each repeat: {', '.join(f'{x:.2f}' for x in loads)}",
        "- raw: " + json.dumps(runs),
    ])
    C.emit(text, args.out)


if __name__ == "__main__":
    main()

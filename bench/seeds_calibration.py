"""Bi-level 3fc_ft calibration over several seeds on a store, scored by cached evaluation.

Prints a markdown table: per row (orig / cal-only / sel) the median and mean ± std over seeds of
mask AP, AP1–AP4, APr/APc/APf and box AP (SimCal supp. M reports repeated runs this way).

    python bench/seeds_calibration.py --store runs/demo/cache.zarr --seeds 0,1,2 --steps 3000
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

from heads.combine import Combination
from heads.config import load_config
from heads.pipeline import evaluate_from_store, train_from_store

KEYS = ("AP", "AP1", "AP2", "AP3", "AP4", "APr", "APc", "APf")


def run_seed(store: str, seed: int, steps: int, out: Path) -> dict:
    milestones = f"{round(steps * 8 / 12)},{round(steps * 11 / 12)}"  # SimCal's 8k/11k of 12k, scaled
    cfg = load_config(None, {"schedule.max_steps": steps, "schedule.milestones": milestones, "run.seed": seed,
                             "sampler.name": "bilevel", "head.name": "3fc_ft", "loss.name": "ce", "run.threads": 1})
    t0 = time.perf_counter()
    train_from_store(cache=store, config=cfg, out_dir=out, progress=False)
    train_s = time.perf_counter() - t0
    outcome = evaluate_from_store(cache=store, head=out, combinations=Combination(T=300.0).per_rule(("orig", "cal-only", "sel")),
                                  out_dir=out / "eval", progress=False)
    rows = {}
    for name, m in outcome.rows.items():
        rows[name] = {k: 100 * m.primary[k] for k in KEYS} | {"box AP": 100 * m.bbox["AP"]}
    return {"seed": seed, "train_s": train_s, "rows": rows}


def table(runs: list[dict]) -> str:
    cols = [*KEYS, "box AP"]
    lines = ["| row | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    for name in runs[0]["rows"]:
        cells = []
        for c in cols:
            vals = [r["rows"][name][c] for r in runs]
            sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
            cells.append(f"{statistics.median(vals):.1f} ({statistics.mean(vals):.1f}±{sd:.1f})")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--store", default="runs/demo/cache.zarr")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--out", default="runs/bench/seeds")
    args = ap.parse_args()
    runs = []
    for seed in (int(s) for s in args.seeds.split(",")):
        runs.append(run_seed(args.store, seed, args.steps, Path(args.out) / f"seed{seed}"))
        print(json.dumps({"seed": seed, "train_s": round(runs[-1]["train_s"], 1),
                          "sel": runs[-1]["rows"]["sel"]}), flush=True)
    print(f"\nbi-level 3fc_ft, {args.steps} steps, seeds {args.seeds}, cached evaluation on val, "
          f"load {os.getloadavg()[0]:.1f}; cells: median (mean ± std) over seeds, mask AP % unless noted\n")
    print(table(runs))


if __name__ == "__main__":
    main()

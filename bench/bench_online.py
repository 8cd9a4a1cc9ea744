"""P1: calibration from the cache vs online through the detector — per-step time and equivalence.

    python bench/bench_online.py [--store runs/demo/cache.zarr] [--quick] [--steps 20]
                                 [--heads 3fc_ft,lastfc] [--repeats 2] [--combines cal-only,sel]

For each head, ``heads.pipeline.train_from_store`` (features read from the store; ``stream="auto"``
as ``heads train`` runs it) and ``serve.online.calibrate_online`` (the frozen detector computes
every step's RoI features from the images) run the same bi-level calibration: same sampler, seed,
steps, 1 torch thread; the two alternate, order rotated. Per-step time is read from each run's
``log.jsonl`` (``run.log_interval = 1``), steps 2..N, so set-up is excluded and reported apart.
Equivalence: the heads of the first pair are compared weight by weight (against how far training
moved them from the detector's weights) and both are scored by cached evaluation
(``heads.pipeline.evaluate_from_store``) on the val split; the AP differences are reported.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

import _common as C  # noqa: E402  (adds the repo root to sys.path)
import torch

from cache_schema import open_store
from cache_schema.head_init import read_head_weights
from heads.combine import Combination
from heads.config import load_config
from heads.pipeline import FROM_DETECTOR, evaluate_from_store, train_from_store
from serve.online import calibrate_online


def _config(head: str, steps: int):
    return load_config(None, {"sampler.name": "bilevel", "head.name": head, "loss.name": "ce", "run.threads": 1,
                              "run.seed": 0, "schedule.max_steps": steps, "run.checkpoint_interval": steps,
                              "eval.interval": 0, "run.log_interval": 1})


def _per_step(run_dir: Path) -> tuple[float, list[float]]:
    """(seconds per step over steps 2..N, the individual step times) from ``log.jsonl``."""
    rows = [json.loads(x) for x in (run_dir / "log.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "loss" in r]
    secs = [r["seconds"] for r in rows]
    return (secs[-1] - secs[0]) / (rows[-1]["step"] - rows[0]["step"]), [b - a for a, b in zip(secs, secs[1:])]


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path / "head.pt", weights_only=True)["state_dict"]


def _compare(cached: Path, online: Path, init: dict | None) -> tuple[float, float | None]:
    """(max |w_cached − w_online|, max |w_cached − w_init|) over the head's parameters."""
    a, b = _weights(cached), _weights(online)
    diff = max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
    if init is None:
        return diff, None
    moved = max(float((a[k].float() - torch.as_tensor(init[k]).float()).abs().max()) for k in a if k in init)
    return diff, moved


def bench_head(*, store: Path, ckpt: Path, head: str, steps: int, repeats: int, combines: tuple[str, ...]) -> str:
    work = C.BENCH_OUT / "online" / head
    cfg = _config(head, steps)
    runs: dict[str, list[dict]] = {"cache": [], "online": []}
    loads = []

    def run(mode: str, r: int) -> None:
        out = work / f"{mode}_{r}"
        if out.exists():
            shutil.rmtree(out)
        t0 = time.perf_counter()
        if mode == "cache":
            res = train_from_store(cache=str(store), config=cfg, out_dir=out, progress=False)
        else:
            res = calibrate_online(ckpt=ckpt, cache=str(store), config=cfg, out_dir=out, progress=False)
        wall = time.perf_counter() - t0
        step_s, steps_list = _per_step(out)
        runs[mode].append({"dir": out, "wall": wall, "step_s": step_s, "median_step": statistics.median(steps_list),
                           "setup": wall - res.metrics["seconds"], "loss": res.final_loss})
        print(f"[bench] {head} {mode} repeat {r}: {1000 * step_s:.1f} ms/step, wall {wall:.1f} s", file=sys.stderr)

    for r in range(repeats):
        loads.append(os.getloadavg()[0])
        for mode in (("cache", "online") if r % 2 == 0 else ("online", "cache")):
            run(mode, r)
    ratios = [o["step_s"] / c["step_s"] for c, o in zip(runs["cache"], runs["online"])]
    med = lambda mode, key: statistics.median(x[key] for x in runs[mode])  # noqa: E731
    rows = [[name, f"{1000 * med(m, 'step_s'):.1f} ms", f"{1000 * med(m, 'median_step'):.1f} ms",
             f"{med(m, 'setup'):.1f} s", f"{med(m, 'wall'):.1f} s", f"{med(m, 'loss'):.4f}"]
            for name, m in (("from the cache (train_from_store)", "cache"), ("online (calibrate_online)", "online"))]
    hdr = C.header(f"P1 — cache vs online calibration, head {head}", extra={
        "what": f"bi-level sampler, loss ce, seed 0, {steps} steps, 1 torch thread; per-step time from log.jsonl "
                f"(steps 2..{steps}); cache side stream=auto (in memory)",
        "repeats": f"{repeats} pairs, alternating order; load average (1 min) {min(loads):.2f}–{max(loads):.2f}"})
    body = C.table(["mode", "per step (mean 2..N)", "median step", "set-up", f"wall for {steps} steps",
                    "final loss"], rows)
    lines = [f"- online / cache time per step: **{statistics.median(ratios):.0f}x** (per pair: "
             + ", ".join(f"{x:.0f}" for x in ratios) + "; target >= 100x)",
             f"- end to end for {steps} steps incl. set-up: online / cache = "
             f"{statistics.median(o['wall'] / c['wall'] for c, o in zip(runs['cache'], runs['online'])):.1f}x"]
    s = open_store(store)
    init = read_head_weights(s) if head in FROM_DETECTOR else None
    diff, moved = _compare(runs["cache"][0]["dir"], runs["online"][0]["dir"], init)
    lines.append(f"- max |weight difference| cache vs online head: {diff:.3g}"
                 + ("" if moved is None else f" (training moved the cache head by up to {moved:.3g} from the detector's weights)"))
    if combines:
        ev = {}
        for mode in ("cache", "online"):
            ev[mode] = evaluate_from_store(cache=str(store), head=runs[mode][0]["dir"],
                                           combinations=Combination(T=300.0).per_rule(combines),
                                           out_dir=work / f"eval_{mode}", progress=False).rows
        erows = []
        for c in combines:
            a, b = ev["cache"][c], ev["online"][c]
            for iou in ("segm", "bbox"):
                pa, pb = getattr(a, iou)["AP"], getattr(b, iou)["AP"]
                erows.append([c, iou, f"{100 * pa:.2f}", f"{100 * pb:.2f}", f"{100 * (pa - pb):+.3f}"])
        lines.append(f"\nCached evaluation (val split, T=300) of both heads after {steps} steps:\n\n"
                     + C.table(["combine", "AP type", "cache head AP", "online head AP", "difference (points)"], erows))
    return f"{hdr}\n\n{body}\n\n" + "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--store", type=Path, default=C.DEMO_STORE)
    ap.add_argument("--ckpt", type=Path, default=None, help="default: the checkpoint the store records")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--heads", default="3fc_ft,lastfc")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--combines", default="cal-only,sel", help="empty: skip the evaluation")
    ap.add_argument("--out", type=Path, default=C.BENCH_OUT / "bench_online.md")
    a = ap.parse_args()
    ckpt = a.ckpt or Path(open_store(a.store).meta.detector.checkpoint_path)
    steps, repeats = (5, 1) if a.quick else (a.steps, a.repeats)
    combines = tuple(x for x in a.combines.split(",") if x)
    blocks = [bench_head(store=a.store, ckpt=ckpt, head=h, steps=steps, repeats=repeats, combines=combines)
              for h in a.heads.split(",")]
    C.emit("\n\n".join(blocks), a.out)


if __name__ == "__main__":
    main()

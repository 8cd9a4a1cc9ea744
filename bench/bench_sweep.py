"""`heads sweep --jobs 2` against the same trials as sequential single runs: wall time and memory.

The main sweep row runs ``--workers processes``; ``--also-threads`` adds the default
``--workers threads``, ``--also-jobs-1`` a one-job sweep.

    python bench/bench_sweep.py [--store runs/demo/cache.zarr] [--head lastfc] [--steps 300] [--quick]

The grid: 16 distinct heads (4 samplers x 2 losses x 2 seeds), each scored with the rows a
sweep trial gets (``orig`` and ``sel``). Two ways to get the same 16 results, run side by side:

- ``sweep``: one ``heads sweep --jobs 2`` process (train RoIs and the val inputs of cached
  evaluation loaded once by the parent, shared by the workers; the ``orig`` row scored once);
- ``single``: for each trial, ``heads train --no-eval`` then ``heads eval --combine orig,sel`` —
  what a user without the sweep command runs, each process opening the store itself.

Memory is the proportional set size (PSS: a page shared by k processes counts 1/k in each) summed
over the command's whole process tree, sampled every 0.2 s; its peak is what the machine had to
hold. For ``single`` the figure is the largest peak of one run (they run one after another), which
is the "one run" the sweep's peak is compared with. Also reported: the PSS of each process of
the sweep at its peak, and of a bare interpreter importing what a worker imports (torch and the
project: what every extra worker costs whatever is shared). Also checked: both ways give the same
AP for every trial.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import statistics
import subprocess
import threading
import time
from pathlib import Path

import _common as C  # noqa: E402  (adds the repo root to sys.path)

SAMPLERS = ("random", "class_balanced", "bilevel", "rfs")
LOSSES = ("ce", "focal")
SEEDS = (0, 1)


def _pss_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def _tree(pid: int) -> list[int]:
    """``pid`` and all its descendants (from /proc/*/stat's parent field)."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            parents.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += parents.get(p, [])
    return out


#: The largest sample of the last :func:`run_measured`: PSS in MiB of the command's own process,
#: then of each descendant (largest first): where the peak sits (parent vs workers).
LAST_PEAK_PARTS: list[float] = []


def run_measured(cmd: list[str]) -> tuple[float, float]:
    """Run ``cmd``; returns (wall seconds, peak PSS of its process tree in MiB)."""
    peak, stop = [0], threading.Event()
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    def sample() -> None:
        while not stop.is_set():
            parts = [_pss_kib(p) for p in _tree(proc.pid)]
            if sum(parts) > peak[0]:
                peak[0] = sum(parts)
                LAST_PEAK_PARTS[:] = [parts[0] / 1024] + sorted((v / 1024 for v in parts[1:]), reverse=True)
            stop.wait(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    _, err = proc.communicate()
    stop.set()
    sampler.join()
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{err[-2000:]}")
    return time.perf_counter() - t0, peak[0] / 1024


def _base(head: str, steps: int) -> str:
    return "\n".join([
        "[head]", f'name = "{head}"', "[schedule]", f"max_steps = {steps}",
        f"milestones = [{int(steps * 2 / 3)}, {int(steps * 11 / 12)}]", "[eval]", "interval = 0",
        "[run]", "threads = 1", f"checkpoint_interval = {steps}", "[combine]", 'rule = "sel"', ""])


def _ap(metrics: dict) -> float:
    """Mask AP of a metrics dict (box AP when the store keeps no masks)."""
    return (metrics.get("segm") or metrics["bbox"])["summary"]["AP"]


def interpreter_pss() -> float:
    """Peak PSS (MiB) of a process that only imports what a sweep worker imports: the part of
    each worker that no sharing removes (its interpreter, torch and the project's modules)."""
    return run_measured([str(C.REPO / ".venv/bin/python"), "-c",
                         "import time, heads.sweep.jobs, heads.pipeline; time.sleep(3)"])[1]


def _parts(parts: list[float]) -> str:
    return f"parent {parts[0]:,.0f}, then {', '.join(f'{v:,.0f}' for v in parts[1:] if v >= 1) or 'none'}"


def write_grid(work: Path, head: str, steps: int) -> Path:
    grid = work / "grid.toml"
    axes = [("sampler.name", SAMPLERS), ("loss.name", LOSSES), ("run.seed", SEEDS)]
    text = _base(head, steps) + "".join(
        f'\n[[axis]]\nfield = "{f}"\nvalues = {json.dumps(list(v))}\n' for f, v in axes)
    grid.write_text(text)
    return grid


def run_single(work: Path, store: Path, head: str, steps: int) -> tuple[float, float, dict]:
    """The 16 trials one after another; returns (wall, largest peak of one command, AP per trial)."""
    heads, evals = work / "single_heads", work / "single_evals"
    for d in (heads, evals):
        shutil.rmtree(d, ignore_errors=True)
    base = work / "single_base.toml"
    base.write_text(_base(head, steps))
    wall, peak, ap = 0.0, 0.0, {}
    for sampler, loss, seed in itertools.product(SAMPLERS, LOSSES, SEEDS):
        name = f"{sampler}-{loss}-{seed}"
        w1, p1 = run_measured([str(C.REPO / ".venv/bin/heads"), "train", "--cache", str(store), "--out",
                               str(heads / name), "--config", str(base), "--sampler", sampler, "--loss", loss,
                               "--seed", str(seed), "--no-eval", "--quiet"])
        w2, p2 = run_measured([str(C.REPO / ".venv/bin/heads"), "eval", "--cache", str(store), "--head",
                               str(heads / name), "--combine", "orig,sel", "--out", str(evals / name), "--quiet"])
        wall, peak = wall + w1 + w2, max(peak, p1, p2)
        summary = json.loads((evals / name / "eval_summary.json").read_text())
        ap[name] = _ap(summary["rows"]["sel"])
    return wall, peak, ap


def run_sweep(work: Path, store: Path, head: str, steps: int, jobs: int,
              workers: str = "processes") -> tuple[float, float, dict]:
    out = work / f"sweep_jobs{jobs}_{workers}"
    shutil.rmtree(out, ignore_errors=True)
    grid = write_grid(work, head, steps)
    wall, peak = run_measured([str(C.REPO / ".venv/bin/heads"), "sweep", "--cache", str(store), "--grid", str(grid),
                               "--out", str(out), "--jobs", str(jobs), "--workers", workers, "--quiet"])
    ap = {}
    for path in (out / "results").glob("*.json"):
        r = json.loads(path.read_text())
        cfg = r["config"]
        ap[f"{cfg['sampler']['name']}-{cfg['loss']['name']}-{cfg['run']['seed']}"] = _ap(r["rows"]["sel"])
    return wall, peak, ap


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store", type=Path, default=C.DEMO_STORE)
    ap.add_argument("--head", default="lastfc")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--also-jobs-1", action="store_true", help="also time the sweep with one worker")
    ap.add_argument("--also-threads", action="store_true", help="also time --jobs N on threads of the sweep's process")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", type=Path, default=C.BENCH_OUT / "bench_sweep.md")
    args = ap.parse_args()
    steps = 20 if args.quick else args.steps
    work = C.BENCH_OUT / "sweep"
    work.mkdir(parents=True, exist_ok=True)
    load0 = os.getloadavg()[0]
    s_wall, s_peak, s_ap = run_sweep(work, args.store, args.head, steps, args.jobs)
    s_parts = list(LAST_PEAK_PARTS)
    load1 = os.getloadavg()[0]
    q_wall, q_peak, q_ap = run_single(work, args.store, args.head, steps)
    load2 = os.getloadavg()[0]
    same = s_ap.keys() == q_ap.keys() and max(abs(s_ap[k] - q_ap[k]) for k in s_ap) < 1e-9
    rows = [[f"heads sweep --jobs {args.jobs} --workers processes", C.fmt_s(s_wall), f"{s_peak:,.0f}"],
            ["16 x (heads train + heads eval), sequential", C.fmt_s(q_wall), f"{q_peak:,.0f} (largest single command)"]]
    base = interpreter_pss()
    lines = [f"- sequential / sweep --jobs {args.jobs} wall time: **{q_wall / s_wall:.2f}x**",
             f"- peak memory, sweep --jobs {args.jobs} / one single run: **{s_peak / q_peak:.2f}**",
             f"- sweep --jobs {args.jobs} at its peak, PSS per process (MiB): {_parts(s_parts)}",
             f"- a bare interpreter that imports what a worker imports (torch, heads): {base:,.0f} MiB PSS alone "
             f"(the sweep's workers are forked from one server process that imported it, so they share those pages)"]
    if args.also_jobs_1:
        one_wall, one_peak, one_ap = run_sweep(work, args.store, args.head, steps, 1)
        rows.insert(1, ["heads sweep --jobs 1", C.fmt_s(one_wall), f"{one_peak:,.0f}"])
        lines += [f"- sequential / sweep --jobs 1 wall time: {q_wall / one_wall:.2f}x; peak memory --jobs 1 / one "
                  f"single run: {one_peak / q_peak:.2f}; --jobs {args.jobs} / --jobs 1: {s_peak / one_peak:.2f}",
                  f"- sweep --jobs 1 at its peak, PSS per process (MiB): {_parts(LAST_PEAK_PARTS)}",
                  f"- same sel AP for all 16 trials with --jobs 1 and --jobs {args.jobs}: {one_ap == s_ap}"]
    if args.also_threads:
        t_wall, t_peak, t_ap = run_sweep(work, args.store, args.head, steps, args.jobs, "threads")
        rows.insert(1, [f"heads sweep --jobs {args.jobs} --workers threads", C.fmt_s(t_wall), f"{t_peak:,.0f}"])
        lines += [f"- --workers threads: sequential / sweep wall time {q_wall / t_wall:.2f}x; peak memory / one single "
                  f"run: **{t_peak / q_peak:.2f}**; threads / processes: wall {t_wall / s_wall:.2f}, "
                  f"peak memory {t_peak / s_peak:.2f}",
                  f"- sweep --workers threads at its peak, PSS per process (MiB): {_parts(LAST_PEAK_PARTS)}",
                  f"- same sel AP for all 16 trials with threads and processes: {t_ap == s_ap}"]
        if args.also_jobs_1:
            lines.append(f"- --workers threads, --jobs {args.jobs} / --jobs 1 peak memory: {t_peak / one_peak:.2f}")
    text = "\n".join([
        C.header("heads sweep vs 16 sequential single runs", extra={
            "what": f"16 heads ({' x '.join(map(str, (len(SAMPLERS), len(LOSSES), len(SEEDS))))}: samplers x losses x seeds), "
                    f"head {args.head}, {steps} steps each, 1 torch thread per process, rows orig + sel",
            "store": str(args.store)}),
        "",
        C.table(["mode", "wall", "peak PSS of the process tree (MiB)"], rows),
        "",
        *lines,
        f"- same sel AP for all 16 trials both ways: {same} "
        f"(median AP {100 * statistics.median(s_ap.values()):.2f})",
        f"- load average (1 min) before each mode: {load0:.2f}, {load1:.2f}, {load2:.2f}",
    ])
    C.emit(text, args.out)


if __name__ == "__main__":
    main()

"""Shared helpers of the benchmark scripts: paths, interleaved timing, machine state, markdown.

Why interleave: the machine's 2 cores are shared with other work, so absolute times drift by 2x
within minutes. Every figure is a ratio of runs taken side by side (A, B, A, B, ... with the order
rotated each repeat) and reported as the median over repeats, next to the absolute medians and
the load average seen while measuring.
"""

from __future__ import annotations

import datetime as _dt
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `python bench/x.py` puts bench/ first; the packages live one up
    sys.path.insert(0, str(REPO))

DEMO_STORE = REPO / "runs" / "demo" / "cache.zarr"
DEMO_CKPT = REPO / "runs" / "demo" / "detector" / "detector.pt"
DEMO_DATA = REPO / "runs" / "demo" / "data"
BENCH_OUT = REPO / "runs" / "bench"


@dataclass
class Timings:
    """Wall seconds per mode and repeat, plus the 1-minute load average before each repeat."""

    seconds: dict[str, list[float]] = field(default_factory=dict)
    load: list[float] = field(default_factory=list)
    cpu: dict[str, list[float]] = field(default_factory=dict)  # process CPU seconds (all threads)

    def median(self, mode: str) -> float:
        return statistics.median(self.seconds[mode])

    def ratios(self, num: str, den: str) -> list[float]:
        """Per-repeat ratio num/den (pairs taken in the same repeat, i.e. side by side)."""
        return [a / b for a, b in zip(self.seconds[num], self.seconds[den])]

    def median_ratio(self, num: str, den: str) -> float:
        return statistics.median(self.ratios(num, den))


def interleave(modes: dict[str, Callable[[], object]], *, repeats: int, warmup: bool = True,
               setup: dict[str, Callable[[], object]] | None = None) -> Timings:
    """Run every mode once per repeat, order rotated each repeat; returns wall seconds.

    ``warmup`` runs each mode once first, untimed (lazy imports, page cache, allocator);
    ``setup[mode]``, when given, runs untimed right before each run of that mode.
    """
    names = list(modes)
    setup = setup or {}

    def run(name: str) -> tuple[float, float]:
        if name in setup:
            setup[name]()
        t0, c0 = time.perf_counter(), time.process_time()
        modes[name]()
        return time.perf_counter() - t0, time.process_time() - c0

    if warmup:
        for name in names:
            run(name)
    out = Timings(seconds={n: [] for n in names}, cpu={n: [] for n in names})
    for r in range(repeats):
        out.load.append(os.getloadavg()[0])
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            wall, cpu = run(name)
            out.seconds[name].append(wall)
            out.cpu[name].append(cpu)
    return out


def peak_rss_mib() -> float:
    """Peak resident set size of this process so far (Linux ru_maxrss is KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def git_state() -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, check=True).stdout.strip()
        return f"{head}{' + uncommitted changes' if dirty else ''}"
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def header(title: str, *, extra: dict[str, object] | None = None) -> str:
    """The provenance block every result starts with (date, command, machine, load)."""
    import torch

    load = os.getloadavg()
    lines = [
        f"### {title}",
        "",
        f"- date: {_dt.datetime.now(_dt.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- command: `python {' '.join([os.path.relpath(sys.argv[0], REPO)] + sys.argv[1:])}`",
        f"- code: git {git_state()}; python {platform.python_version()}, torch {torch.__version__}",
        f"- machine: {os.cpu_count()} logical cores (shared), load average at start "
        f"{load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f} (1/5/15 min)",
    ]
    for k, v in (extra or {}).items():
        lines.append(f"- {k}: {v}")
    return "\n".join(lines)


def table(head: list[str], rows: list[list[object]]) -> str:
    """A markdown table; floats are printed with 4 significant digits."""
    def cell(v: object) -> str:
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v)

    out = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    out += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(out)


def load_line(t: Timings) -> str:
    lo, hi = min(t.load), max(t.load)
    return f"load average (1 min) during the repeats: {lo:.2f}–{hi:.2f}"


def emit(text: str, out: Path | None) -> None:
    """Print a markdown block and, when ``out`` is given, write it there too."""
    print(text)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n")


def fmt_s(x: float) -> str:
    return f"{x:.3g} s" if x >= 0.01 else f"{1000 * x:.3g} ms"

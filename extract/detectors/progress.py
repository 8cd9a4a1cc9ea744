"""A rich progress bar for detector training: step, loss (running mean), it/s, time left."""

from __future__ import annotations

import time
from collections import deque

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn


class TrainProgress:
    """Context manager; ``update(step=..., loss=...)`` after each step. A no-op when disabled."""

    def __init__(self, *, total: int, start: int, enabled: bool, window: int = 20) -> None:
        self._enabled = enabled
        self._recent: deque[float] = deque(maxlen=window)
        self._times: deque[float] = deque(maxlen=window + 1)
        self._progress = (
            Progress(
                TextColumn("detector"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("loss {task.fields[loss]}"),
                TextColumn("{task.fields[rate]} it/s"),
                TimeRemainingColumn(),
            )
            if enabled
            else None
        )
        self._task = None
        self._total, self._start = total, start

    def __enter__(self) -> "TrainProgress":
        if self._progress is not None:
            self._progress.__enter__()
            self._task = self._progress.add_task(
                "train", total=self._total, completed=self._start, loss="-", rate="-"
            )
        self._times.append(time.monotonic())
        return self

    def __exit__(self, *exc) -> None:
        if self._progress is not None:
            self._progress.__exit__(*exc)

    def update(self, *, step: int, loss: float) -> None:
        if not self._enabled:
            return
        self._recent.append(loss)
        self._times.append(time.monotonic())
        # Rate over the recent window, not since start: the first steps include warm-up costs.
        span = self._times[-1] - self._times[0]
        rate = (len(self._times) - 1) / span if span > 0 else 0.0
        mean = sum(self._recent) / len(self._recent)
        self._progress.update(self._task, completed=step, loss=f"{mean:.3f}", rate=f"{rate:.2f}")

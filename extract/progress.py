"""Progress display of an extraction: images/s and RoIs/s per split (rich)."""

from __future__ import annotations

import time

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn


class ExtractProgress:
    """Context manager; a no-op when ``enabled`` is false (tests, non-interactive runs)."""

    def __init__(self, *, enabled: bool) -> None:
        self.enabled = enabled
        self._progress: Progress | None = None
        self._task = None
        self._t0 = time.perf_counter()
        self._images = self._rois = 0

    def __enter__(self) -> "ExtractProgress":
        if self.enabled:
            self._progress = Progress(
                TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                TextColumn("{task.fields[rate]}"), TimeRemainingColumn(),
            )
            self._progress.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self._progress is not None:
            self._progress.__exit__(*exc)

    def start_split(self, name: str, *, images: int) -> None:
        self._t0, self._images, self._rois = time.perf_counter(), 0, 0
        if self._progress is not None:
            self._task = self._progress.add_task(f"extract {name}", total=images, rate="")

    def advance(self, *, images: int, rois: int) -> None:
        self._images += images
        self._rois += rois
        if self._progress is not None and self._task is not None:
            dt = max(time.perf_counter() - self._t0, 1e-9)
            rate = f"{self._images / dt:.1f} img/s  {self._rois / dt:,.0f} RoIs/s"
            self._progress.update(self._task, advance=images, rate=rate)

"""The sweep's one progress display: trials done / total and the latest event (rich, on stderr)."""

from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn


class SweepProgress:
    """``with SweepProgress(total=, done=, enabled=) as bar: bar.update(text, trial_finished)``;
    disabled (``--quiet``) it shows nothing."""

    def __init__(self, *, total: int, done: int, enabled: bool) -> None:
        self._progress = None
        if enabled:
            self._progress = Progress(TextColumn("sweep"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                                      TextColumn("{task.description}"), console=Console(stderr=True))
            self._task = self._progress.add_task("", total=total, completed=done)

    def __enter__(self) -> "SweepProgress":
        if self._progress is not None:
            self._progress.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._progress is not None:
            self._progress.stop()

    def update(self, text: str, trial_finished: bool) -> None:
        if self._progress is not None:
            self._progress.update(self._task, description=text, advance=1 if trial_finished else 0)

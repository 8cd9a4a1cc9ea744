"""``heads sweep``: train and score every configuration of a grid on one store, then tabulate.

``heads sweep --cache STORE --grid sweep.toml --out DIR`` runs (or resumes) a sweep;
``heads sweep report DIR`` rebuilds its tables from the finished trials.
"""

from __future__ import annotations

from pathlib import Path

import typer

from cache_schema.cli_support import friendly_errors
from cache_schema.errors import ConfigError
from cache_schema.inputs import parse_annotations
from heads.sweep.grid import load_grid
from heads.sweep.runner import DEFAULT_WORKERS, run_sweep
from heads.sweep.tables import Report, write_report

app = typer.Typer(add_completion=False, help="Train and score every configuration of a grid on one store, then "
                  "tabulate (docs/sweeps.md); `heads sweep report DIR` rebuilds the tables.")


def _print_report(report: Report) -> None:
    typer.echo(report.markdown)  # plain: a markdown table must not be wrapped at the terminal width
    typer.echo(f"{report.finished} of {report.total} trials finished; tables: {report.csv_path}, {report.md_path}")


@app.callback(invoke_without_command=True)
@friendly_errors
def sweep(
    ctx: typer.Context,
    cache: str = typer.Option(None, help="Store path or URL (from `extract`)."),
    grid: Path = typer.Option(None, help="Grid TOML: a base config and axes over its fields (docs/sweeps.md)."),
    out: Path = typer.Option(None, help="Sweep directory; a killed sweep there is resumed."),
    jobs: int = typer.Option(None, help="Parallel workers (default: the usable cores, capped by free memory)."),
    address: str = typer.Option(None, help="Run trials as Ray tasks: ray://HOST:PORT, HOST:PORT, auto, or local."),
    workers: str = typer.Option(DEFAULT_WORKERS, help="Local jobs on threads of this process or on worker processes: "
                                                      "threads | processes."),
    annotations: list[str] = typer.Option(None, "--annotations", help="SPLIT=PATH: the val json when it is not where the store recorded it."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Point a sweep directory of another grid at this one."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress display."),
) -> None:
    """Train and score every trial of --grid on --cache into --out, then print the table."""
    if ctx.invoked_subcommand is not None:
        return
    if cache is None or grid is None or out is None:
        raise ConfigError("heads sweep needs --cache STORE --grid GRID.toml --out DIR (or: heads sweep report DIR)")
    outcome = run_sweep(cache=cache, grid=load_grid(grid), out_dir=out, jobs=jobs, address=address, workers=workers,
                        progress=not quiet, overwrite=overwrite, annotations=parse_annotations(annotations))
    _print_report(outcome.report)


@app.command("report")
@friendly_errors
def report(out: Path = typer.Argument(..., help="A sweep directory (--out of `heads sweep`).")) -> None:
    """Rebuild table.csv and table.md of a sweep directory from its finished trials."""
    _print_report(write_report(out))

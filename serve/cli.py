"""``serve``: put a calibrated head back into the detector and evaluate it the way the papers do."""

from __future__ import annotations

import math
from pathlib import Path

import typer
from rich.console import Console

from cache_schema.cli_support import fail, friendly_errors
from heads.combine import FIELD_HELP, Combination
from heads.evaluation import BinSpec

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)


RECORDED = " Default: the head run's recorded combine setting."
INJECTED = " Default: the checkpoint's injected combination."


def _describe(c: Combination) -> str:
    """``sel, T=300, le, thr=0.05, scale_ratio=cal/orig`` for the console."""
    return f"{c.rule}, T={c.T:g}, {c.boundary}, thr={c.thr:g}, scale_ratio={c.scale_ratio}"


def _floats(text: str | None) -> tuple[float, ...]:
    if not text:
        return ()
    try:
        return tuple(math.inf if v.strip() in ("inf", "∞") else float(v) for v in text.split(",") if v.strip())
    except ValueError:
        fail(f"--sweep-T {text!r} must be comma-separated numbers, e.g. 10,30,100,300,1000")


@app.command("inject")
@friendly_errors
def inject_command(
    ckpt: Path = typer.Option(..., help="Original detector checkpoint."),
    head: list[Path] = typer.Option(..., help="Run directory (or head.pt) from `heads train`; for a cascade, once per "
                                              "retrained stage (`heads train --stage k`)."),
    out: Path = typer.Option(..., help="New checkpoint to write."),
    combine: str = typer.Option(None, help="sel | cal-only | avg | sel-thr | sel-scale | sel-norm | det | orig | replace "
                                           "(default: the head run's recorded combine.rule, else sel)."),
    T: float = typer.Option(None, "--T", help=FIELD_HELP["T"] + RECORDED),
    boundary: str = typer.Option(None, help=FIELD_HELP["boundary"] + RECORDED),
    thr: float = typer.Option(None, help=FIELD_HELP["thr"] + RECORDED),
    scale_ratio: str = typer.Option(None, "--scale-ratio", help=FIELD_HELP["scale_ratio"] + RECORDED),
    config: str = typer.Option(None, help="mmdetection: the model's config (default: the checkpoint's); "
                                          "dual-head rules also write OUT.py for plain mmdet."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing file at --out."),
) -> None:
    """Write a detector checkpoint carrying the calibrated head and the combination rule."""
    from serve.inject import REPLACE, inject, injection_combination

    combination = injection_combination(head=head[0], combine=combine, T=T, boundary=boundary, thr=thr,
                                        scale_ratio=scale_ratio)
    path = inject(ckpt=ckpt, head=head, out=out, combination=combination, config=config, overwrite=overwrite)
    Console().print(f"wrote {path} ({REPLACE if combination == REPLACE else _describe(combination)})")


@app.command("eval")
@friendly_errors
def eval_command(
    ckpt: Path = typer.Option(..., help="Detector checkpoint, plain or injected."),
    config: str = typer.Option(None, help="mmdetection: config file or bundled config name (default: the checkpoint's)."),
    data: Path = typer.Option(..., help="Dataset directory (val.json + images) or the val json."),
    out: Path = typer.Option(None, help="Where results and metrics go (default: next to the checkpoint)."),
    combine: str = typer.Option(None, help="Comma-separated rules to evaluate (default: the checkpoint's)."),
    T: float = typer.Option(None, "--T", help=FIELD_HELP["T"] + INJECTED),
    boundary: str = typer.Option(None, help=FIELD_HELP["boundary"] + INJECTED),
    thr: float = typer.Option(None, help=FIELD_HELP["thr"] + INJECTED),
    scale_ratio: str = typer.Option(None, "--scale-ratio", help=FIELD_HELP["scale_ratio"] + INJECTED),
    sweep_T: str = typer.Option(None, "--sweep-T", help="Evaluate sel at each T, e.g. 10,30,100,300,1000 (SimCal Fig. 4c)."),
    bins: str = typer.Option("lvis", help="AP-bin preset: lvis | coco-lt."),
    device: str = typer.Option(None, help="auto | cpu | cuda[:i]"),
    batch_size: int = typer.Option(4, help="Images per detector batch."),
    limit: int = typer.Option(None, help="Evaluate only the first N val images (quick check)."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bar."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace the results of a previous evaluation in --out."),
) -> None:
    """Full inference on the val images with dual-head scoring; mask and box AP with the LVIS API."""
    from serve.evaluate import evaluate_detector

    combines = tuple(c.strip() for c in combine.split(",") if c.strip()) if combine else None
    run = evaluate_detector(ckpt=ckpt, data=data, out_dir=out or ckpt.parent / f"eval_{ckpt.stem}",
                            combines=combines, T=T, boundary=boundary, thr=thr, scale_ratio=scale_ratio,
                            sweep_T=_floats(sweep_T), bins=BinSpec.preset(bins),
                            device=device, batch_size=batch_size, progress=not quiet, limit=limit,
                            detector_config=config, overwrite=overwrite)
    console = Console()
    console.print(run.table())
    console.print(f"{run.images} images, inference {run.images / max(run.inference_seconds, 1e-9):.2f} img/s; "
                  f"results in {run.out_dir}")


@app.command("calibrate-online")
@friendly_errors
def calibrate_online_command(
    ckpt: Path = typer.Option(..., help="Detector checkpoint."),
    detector_config: str = typer.Option(None, "--detector-config", help="mmdetection: config file or bundled config name."),
    cache: str = typer.Option(..., help="Store of the same detector (its RoI index drives the sampler)."),
    out: Path = typer.Option(..., help="Run directory."),
    config: Path = typer.Option(None, help="TOML run config (same as `heads train`)."),
    steps: int = typer.Option(None, help="Optimiser steps."),
    seed: int = typer.Option(None, help="Seed."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bar."),
) -> None:
    """SimCal the slow way: every step runs the frozen detector on the sampled images."""
    from heads.config import load_config
    from serve.online import calibrate_online

    overrides = {k: v for k, v in {"schedule.max_steps": steps, "run.seed": seed}.items() if v is not None}
    result = calibrate_online(ckpt=ckpt, cache=cache, config=load_config(config, overrides), out_dir=out,
                              progress=not quiet, detector_config=detector_config)
    Console().print(f"head written to {result.head_path} ({result.steps} steps, "
                    f"{result.steps_per_second or 0:.2f} steps/s)")


def main() -> None:
    app()

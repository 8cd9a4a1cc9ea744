"""``heads``: train and evaluate classification heads from a RoI cache (no images, no detector)."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

from cache_schema.cli_support import friendly_errors
from cache_schema import open_store
from cache_schema.inputs import parse_annotations
from heads.combine import FIELD_HELP, Combination
from heads.config import load_config
from heads.evaluation import BinSpec, format_table
from heads.pipeline import EvalOutcome, evaluate_from_store, head_combination, train_from_store, val_ground_truth

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)


def _overrides(**flags) -> dict:
    """Dotted config keys → values, for the flags the user actually gave."""
    return {key: value for key, value in flags.items() if value is not None}


def _bins(name: str) -> BinSpec:
    return BinSpec.preset(name)


def _recorded(key: str) -> str:
    """Help of a combination flag of ``heads eval``: what it sets and where its default comes from."""
    return f"{FIELD_HELP[key]} Default: the head run's recorded combine.{key}, else {getattr(Combination(), key)}."


def _rules(text: str) -> tuple[str, ...]:
    """``--combine`` of ``heads eval``: comma-separated rule names."""
    return tuple(c.strip() for c in text.split(",") if c.strip())


def _print_outcome(console: Console, outcome: EvalOutcome) -> None:
    """The AP table, then once what holds for every row (e.g. box AP only)."""
    console.print(format_table(outcome.rows))
    for note in outcome.notes:
        console.print(f"note: {note}", markup=False, highlight=False)


@app.command("train")
@friendly_errors
def train(
    cache: str = typer.Option(..., help="Store path or URL (from `extract`)."),
    out: Path = typer.Option(..., help="Run directory; an interrupted run there is resumed."),
    config: Path = typer.Option(None, help="TOML run config; flags below override it."),
    sampler: str = typer.Option(None, help="random | class_balanced | bilevel | rfs"),
    loss: str = typer.Option(None, help="ce | reweight | focal | margin | gumbel | gol"),
    head: str = typer.Option(None, help="3fc_ft | 2fc_rand | 3fc_rand | lastfc | last2fc | ncm"),
    stage: int = typer.Option(None, help="head.stage: the cascade stage (Cascade R-CNN / HTC) whose classifier to retrain; 0 otherwise."),
    steps: int = typer.Option(None, help="Optimiser steps (SimCal: 12000)."),
    lr: float = typer.Option(None, help="Learning rate (SimCal: 0.01)."),
    milestones: str = typer.Option(None, help="Steps where lr ×0.1, comma-separated (SimCal: 8000,11000)."),
    seed: int = typer.Option(None, help="Seed of sampling and initialisation."),
    device: str = typer.Option(None, help="auto (cuda when present) | cpu | cuda[:i]"),
    threads: int = typer.Option(None, help="Torch threads (1 is fastest on a busy 2-core box)."),
    stream: str = typer.Option("auto", help="auto | always | never: stream per-image blocks instead of loading the level."),
    evaluate: bool = typer.Option(True, "--eval/--no-eval", help="Run cached evaluation (orig, cal-only, combine.rule) at the end."),
    combine: str = typer.Option(None, help="combine.rule: the dual-head rule recorded with the head (default sel)."),
    T: float = typer.Option(None, "--T", help="combine.T. " + FIELD_HELP["T"]),
    boundary: str = typer.Option(None, help="combine.boundary: " + FIELD_HELP["boundary"]),
    thr: float = typer.Option(None, help="combine.thr. " + FIELD_HELP["thr"]),
    scale_ratio: str = typer.Option(None, "--scale-ratio", help="combine.scale_ratio: " + FIELD_HELP["scale_ratio"]),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bars."),
    annotations: list[str] = typer.Option(None, "--annotations", help="SPLIT=PATH: the val json when it is not where the store recorded it."),
) -> None:
    """Train or calibrate a classification head from the cache (SimCal: --sampler bilevel --head 3fc_ft)."""
    overrides = _overrides(**{
        "sampler.name": sampler, "loss.name": loss, "head.name": head, "head.stage": stage, "schedule.max_steps": steps,
        "schedule.lr": lr, "schedule.milestones": milestones, "run.seed": seed, "run.device": device,
        "run.threads": threads, "combine.rule": combine, "combine.T": T, "combine.boundary": boundary,
        "combine.thr": thr, "combine.scale_ratio": scale_ratio,
    })
    cfg = load_config(config, overrides)
    files = parse_annotations(annotations)
    if evaluate:  # what the final evaluation needs is checked now, not after training
        val_ground_truth(open_store(cache), files)
    result = train_from_store(cache=cache, config=cfg, out_dir=out, stream=stream, progress=not quiet)
    console = Console()
    rate = f", {result.steps_per_second:.1f} steps/s" if result.steps_per_second else ""
    console.print(f"head written to {result.head_path} ({result.steps} steps{rate})")
    if evaluate:
        combinations = cfg.combine.per_rule(("orig", "cal-only", cfg.combine.rule))
        outcome = evaluate_from_store(cache=cache, head=out, combinations=combinations, out_dir=out / "eval",
                                      progress=not quiet, annotations=files)
        _print_outcome(console, outcome)


@app.command("eval")
@friendly_errors
def evaluate(
    cache: str = typer.Option(..., help="Store path or URL."),
    head: list[Path] = typer.Option(None, help="Run directory (or head.pt) from `heads train`; omit for the original head "
                                              "only. For a cascade, once per retrained stage (others keep the detector's)."),
    combine: str = typer.Option("orig,cal-only,sel", help="Comma-separated: orig, cal-only, avg, sel, sel-thr, sel-scale, sel-norm, det."),
    T: float = typer.Option(None, "--T", help=_recorded("T")),
    boundary: str = typer.Option(None, help=_recorded("boundary")),
    thr: float = typer.Option(None, help=_recorded("thr")),
    scale_ratio: str = typer.Option(None, "--scale-ratio", help=_recorded("scale_ratio")),
    bins: str = typer.Option("lvis", help="AP-bin preset: lvis | coco-lt."),
    out: Path = typer.Option(None, help="Write results and metrics json here."),
    device: str = typer.Option(None, help="auto | cpu | cuda[:i]"),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace the results of a previous evaluation in --out."),
    evaluator: str = typer.Option("auto", help="fast (LVISEval's exact rules on arrays, mask IoUs from the store) | "
                                               "lvis-api (paste masks, official API) | auto (fast when the store allows)."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bars."),
    annotations: list[str] = typer.Option(None, "--annotations", help="SPLIT=PATH: the val json when it is not where the store recorded it."),
) -> None:
    """Cached evaluation: score the store's val RoIs, combine heads, LVIS AP table."""
    heads = tuple(head or ())
    base = head_combination(heads[0] if heads else None).override(T=T, boundary=boundary, thr=thr, scale_ratio=scale_ratio)
    outcome = evaluate_from_store(cache=cache, head=heads or None, combinations=base.per_rule(_rules(combine)), out_dir=out,
                                  bins=_bins(bins), device=device, progress=not quiet, evaluator=evaluator,
                                  annotations=parse_annotations(annotations), overwrite=overwrite)
    _print_outcome(Console(), outcome)


def main() -> None:
    app()

from heads.sweep.cli import app as sweep_app  # noqa: E402 - the sub-app imports this package's modules
app.add_typer(sweep_app, name="sweep")

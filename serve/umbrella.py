"""``roicache``: the umbrella command — datasets, the default detector, store upkeep, the demo.

The three stage commands stay separate (``extract``, ``heads``, ``serve``); this one holds what
comes before and around them.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import typer
from rich.console import Console

from cache_schema import export_hdf5, inspect_store, open_store, validate_store
from cache_schema.cli_support import fail, friendly_errors
from cache_schema.inputs import parse_annotations
from cache_schema.runtime import check_output, configure_threads

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)
data_app = typer.Typer(no_args_is_help=True, help="Build datasets: the synthetic benchmark, COCO-LT.")
detector_app = typer.Typer(no_args_is_help=True, help="Train the small default detector.")
cache_app = typer.Typer(no_args_is_help=True, help="Check, summarise and export a store.")
app.add_typer(data_app, name="data")
app.add_typer(detector_app, name="detector")
app.add_typer(cache_app, name="cache")


@data_app.command("synth")
@friendly_errors
def data_synth(
    out: Path = typer.Option(..., help="Output dataset directory (must not exist or be empty)."),
    num_classes: int = typer.Option(200, help="Number of glyph classes."),
    train_images: int = typer.Option(3200, help="Training images."),
    val_images: int = typer.Option(370, help="Validation images (every class appears)."),
    image_size: int = typer.Option(256, help="Image side in pixels."),
    seed: int = typer.Option(0, help="Seed; the same seed gives byte-identical files."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a non-empty output directory."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bar."),
) -> None:
    """Generate the embedded long-tailed benchmark (LVIS v1 format, openmoji glyphs)."""
    from extract.datasets import SynthConfig, generate

    config = SynthConfig(num_classes=num_classes, train_images=train_images, val_images=val_images,
                         image_size=image_size, seed=seed)
    check_output(out, kind="dir")  # before generating: no temporary folder named in an error
    path = generate(config, out, progress=not quiet, overwrite=overwrite)
    Console().print(f"benchmark written to {path}")


@data_app.command("coco-lt")
@friendly_errors
def data_coco_lt(
    src: Path = typer.Option(..., help="COCO-format training annotation file."),
    out: Path = typer.Option(..., help="Output json (COCO-LT training file, LVIS fields added)."),
    seed: int = typer.Option(0, help="Sampling seed (recorded in the output's info)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing file at --out."),
) -> None:
    """Build COCO-LT from a COCO training file (SimCal supplement C/I)."""
    from extract.datasets import build_coco_lt

    check_output(out, kind="file", overwrite=overwrite)
    summary = build_coco_lt(src, out, seed=seed)
    Console().print(f"COCO-LT written to {out}: {summary.get('images', '?')} images, {summary.get('instances', '?')} instances")


@detector_app.command("train")
@friendly_errors
def detector_train(
    data: Path = typer.Option(..., help="Dataset directory holding train.json and images/."),
    out: Path = typer.Option(..., help="Run directory; resumes from OUT/last.pt when present."),
    preset: str = typer.Option("default", help="Recipe: 'default' (short) or 'embedded' (converged, ~2 h on 2 cores)."),
    max_steps: int = typer.Option(None, help="Optimiser steps (default: the preset's schedule)."),
    time_budget: float = typer.Option(None, help="Stop after this many seconds (default: the preset's budget)."),
    seed: int = typer.Option(0, help="Seed of initialisation and sampling."),
    processes: int = typer.Option(None, help="Training processes (CPU data parallel)."),
    snapshot_every: int = typer.Option(None, help="Steps between val-evaluated snapshots (default: the preset's)."),
    eval_images: int = typer.Option(120, help="Val images evaluated per snapshot (0 = all)."),
    no_eval: bool = typer.Option(False, "--no-eval", help="Write snapshots without evaluating them."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bar."),
) -> None:
    """Train the small default Mask R-CNN from scratch on a dataset (plain random sampling)."""
    from serve.snapshot_eval import train_preset

    overrides = {k: v for k, v in (("max_steps", max_steps), ("time_budget_s", time_budget),
                                   ("processes", processes), ("snapshot_every", snapshot_every)) if v is not None}
    if max_steps is not None:
        overrides["epochs"] = None
    overrides["seed"] = seed
    if eval_images < 0:
        fail(f"--eval-images {eval_images} must be >= 0 (0 = every val image)")
    check_output(out, kind="dir")
    path = train_preset(data=data, out=out, preset=preset, overrides=overrides, eval_images=eval_images or None,
                        evaluate=not no_eval, progress=not quiet)
    Console().print(f"detector checkpoint: {path}")


@detector_app.command("ship")
@friendly_errors
def detector_ship(
    run: Path = typer.Option(..., help="A finished `roicache detector train` run directory."),
    data: Path = typer.Option(..., help="The dataset it was trained on (its val split is evaluated)."),
    preset: str = typer.Option("embedded", help="The preset the run used (recorded in the manifest)."),
    name: str = typer.Option("embedded", help="Name of the shipped checkpoint."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bar."),
) -> None:
    """Maintainers: ship RUN's detector with roicache (float16 weights, sha256 manifest, val AP)."""
    from serve.ship import ship_detector

    val = ship_detector(run=run, data=data, name=name, preset=preset, progress=not quiet)
    Console().print(f"shipped {name}: mask AP {100 * val['segm']['AP']:.1f}, box AP {100 * val['bbox']['AP']:.1f}")


@cache_app.command("validate")
@friendly_errors
def cache_validate(
    store: str = typer.Argument(..., help="Store path or URL."),
    ckpt: Path = typer.Option(None, help="Check the store was built from this detector checkpoint."),
    annotations: list[str] = typer.Option(None, help="SPLIT=FILE: check the split was built from this annotation file."),
    shallow: bool = typer.Option(False, "--shallow", help="Skip decoding every chunk."),
    quick: bool = typer.Option(False, "--quick", help="Decode a seeded sample of 200 images per split."),
    full: bool = typer.Option(False, "--full", help="Decode every image even in large stores (default: "
                                                     "all up to 20,000 images per split, a 2,000-image sample above)."),
) -> None:
    """Check layout, completion, chunk integrity, NaN/Inf in features and logits, and recorded input
    hashes; exit 1 on problems."""
    if quick and full:
        fail("--quick and --full contradict each other; pick one")
    files = {k: str(v) for k, v in parse_annotations(annotations).items()}
    report = validate_store(store, checkpoint=ckpt, annotations=files or None, deep=not shallow,
                            sample=200 if quick else None if full else "auto")
    for problem in report.problems:
        typer.echo(f"problem: {problem}", err=True)
    if not report.ok:
        raise typer.Exit(1)
    sampled = "".join(f", {n} sampled {k} images decoded" for k, n in report.sampled.items())
    Console().print(f"{store}: ok{sampled}")


@cache_app.command("invalidate")
@friendly_errors
def cache_invalidate(
    store: str = typer.Argument(..., help="Store path or URL."),
    split: str = typer.Option(..., help="Split whose images to clear, e.g. val."),
    images: str = typer.Option(..., help="Image positions, e.g. 3,5,10-12 (as `cache validate` lists them)."),
) -> None:
    """Clear images' done marks so that `extract --resume` rewrites them (the repair for what
    `cache validate` reports damaged)."""
    positions = _positions(images)
    s = open_store(store, mode="r+")
    n = s.split(split).num_images
    if positions.max() >= n:
        fail(f"--images {images}: split {split} has images 0-{n - 1}")
    s.invalidate(split=split, images=positions)
    Console().print(f"cleared {len(positions)} images of {split}; run extract with --resume to rewrite them")


def _positions(text: str) -> np.ndarray:
    """``"3,5,10-12"`` → int64 ``[3, 5, 10, 11, 12]``; a bad list exits with one line."""
    out: list[int] = []
    try:
        for part in (p.strip() for p in text.split(",") if p.strip()):
            a, _, b = part.partition("-")
            out += list(range(int(a), int(b or a) + 1))
    except ValueError:
        fail(f"--images {text!r} must list positions like 3,5,10-12")
    if not out or min(out) < 0:
        fail(f"--images {text!r} must list positions >= 0 like 3,5,10-12")
    return np.unique(np.asarray(out, dtype=np.int64))


@cache_app.command("inspect")
@friendly_errors
def cache_inspect(store: str = typer.Argument(..., help="Store path or URL."),
                  as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table.")) -> None:
    """Summarise a store: images, RoIs, foreground ratio, per-bin classes, bytes per RoI."""
    summary = inspect_store(store)
    typer.echo(json.dumps(dataclasses.asdict(summary), indent=2) if as_json else summary.format())


@cache_app.command("export-hdf5")
@friendly_errors
def cache_export(store: str = typer.Argument(..., help="Store path or URL."),
                 out: Path = typer.Option(..., help="HDF5 file to write."),
                 levels: str = typer.Option(None, help="Comma-separated levels (default: all stored)."),
                 overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing file at --out.")) -> None:
    """Export a complete store to one HDF5 file (h5py)."""
    chosen = tuple(v for v in levels.split(",") if v) if levels else None
    check_output(out, kind="file", overwrite=overwrite)
    path = export_hdf5(store, out, levels=chosen)
    Console().print(f"exported to {path}")


@cache_app.command("add-mask-overlaps")
@friendly_errors
def cache_add_overlaps(store: str = typer.Argument(..., help="Store path (opened for writing)."),
                       split: str = typer.Option("val", help="Split whose mask logits to overlap with its ground truth."),
                       quiet: bool = typer.Option(False, "--quiet", help="No progress bar.")) -> None:
    """Add the mask overlaps fast `heads eval` reads to a store extracted before they existed."""
    from extract.overlaps import add_mask_overlaps

    report = add_mask_overlaps(store, split=split, progress=not quiet)
    if report.added:
        Console().print(f"{store}: mask overlaps of {report.images} {split} images added ({report.columns} GT columns)")
    else:
        Console().print(f"{store}: split {split} already has mask overlaps; nothing to do")


@cache_app.command("migrate")
@friendly_errors
def cache_migrate(store: str = typer.Argument(..., help="Store path or URL to convert (left untouched)."),
                  out: str = typer.Option(..., help="Where to write the schema-2 copy (path or URL)."),
                  block_images: int = typer.Option(32, help="Images per commit block of the new store."),
                  resume: bool = typer.Option(False, "--resume", help="Continue an interrupted migration into --out."),
                  quiet: bool = typer.Option(False, "--quiet", help="No progress bar.")) -> None:
    """Copy a store into the current layout (schema 2): the same values, far fewer objects."""
    from cache_schema.migrate import migrate_store

    r = migrate_store(store, out, block_images=block_images, resume=resume, progress=not quiet)
    Console().print(f"{r.out}: schema {r.source_version} -> 2, {r.images_copied} images copied, "
                    f"objects {r.objects_before} -> {r.objects_after}{'' if r.complete else ' (incomplete: rerun with --resume)'}")


@cache_app.command("synth")
@friendly_errors
def cache_synth(out: str = typer.Option(..., help="Store location (path or URL)."),
                images: int = typer.Option(..., help="Train images."),
                classes: int = typer.Option(1203, help="Classes (LVIS v1: 1,203)."),
                rois_per_image: int = typer.Option(300, help="Proposals per image (sets the RoI stride)."),
                levels: str = typer.Option("fc:1024,pooled:256x7x7", help="Feature levels name:shape (fc is required)."),
                gt_per_image: float = typer.Option(12.7, help="Mean objects per image (LVIS v1 train: 12.7)."),
                fg_per_gt: float = typer.Option(4.0, help="Mean foreground proposals per object, besides its GT box."),
                bg_per_image: int = typer.Option(16, help="Background RoIs per image (as extract --train-bg-per-image)."),
                sigma: float = typer.Option(2.5, help="Spread of the log-normal class frequencies."),
                seed: int = typer.Option(0, help="Seed of every draw, recorded in the store."),
                block_images: int = typer.Option(32, help="Images per commit block."),
                overwrite: bool = typer.Option(False, "--overwrite", help="Replace a store at --out."),
                quiet: bool = typer.Option(False, "--quiet", help="No progress bar.")) -> None:
    """Write a store in the real layout filled with seeded synthetic RoIs, for scale tests."""
    from extract.synth_store import SynthStoreConfig, parse_levels, synth_store

    config = SynthStoreConfig(images=images, classes=classes, rois_per_image=rois_per_image, levels=parse_levels(levels),
                              gt_per_image=gt_per_image, fg_per_gt=fg_per_gt, bg_per_image=bg_per_image, sigma=sigma,
                              seed=seed, block_images=block_images)
    r = synth_store(out, config, overwrite=overwrite, progress=not quiet)
    shares = " / ".join(f"{g} {100 * v:.0f}%" for g, v in r.frequency_shares.items())
    Console().print(f"{r.out}: {r.images} images, {r.rois} RoIs, {r.gt} objects, {r.stored_bytes / 2**20:.1f} MiB stored "
                    f"in {r.seconds:.1f} s ({r.stored_bytes / 2**20 / max(r.seconds, 1e-9):.0f} MiB/s); classes {shares}")


@app.command("demo")
@friendly_errors
def demo(out: Path = typer.Option(Path("runs/demo"), help="Run directory; valid artifacts in it are reused."),
         train_detector: bool = typer.Option(False, "--train-detector",
                                             help="Train a short-recipe detector instead of using the shipped one."),
         quiet: bool = typer.Option(False, "--quiet", help="No progress bars.")) -> None:
    """The whole pipeline on the embedded benchmark: data, detector, extract, calibrate, inject, evaluate, sweep."""
    from serve.demo import DemoConfig, run_demo

    configure_threads()
    check_output(out, kind="dir")
    run_demo(out_dir=out, progress=not quiet, config=DemoConfig(train_detector=train_detector))


def main() -> None:
    app()

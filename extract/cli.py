"""``extract``: one command, detector checkpoint + dataset → RoI cache (zarr store)."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

from cache_schema.cli_support import friendly_errors
from extract.sharding import Shard
from extract.writer import ExtractConfig, extract

app = typer.Typer(add_completion=False, help=__doc__)


def _csv(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


@app.command()
@friendly_errors
def main_command(
    ckpt: Path = typer.Option(..., help="Detector checkpoint: roicache.detector, or an mmdetection (mmengine) checkpoint."),
    config: str = typer.Option(None, help="mmdetection: config file or bundled mmdet config name (default: the one saved in the checkpoint)."),
    data: Path = typer.Option(..., help="Dataset directory (train.json, val.json, images/) or one annotation json."),
    out: str = typer.Option(..., help="Store location: a path or an fsspec URL."),
    splits: str = typer.Option("train,val", help="Comma-separated splits to extract."),
    levels: str = typer.Option("pooled,fc", help="Feature levels: pooled (RoIAlign C×7×7) and/or fc (shared-fc output)."),
    rois_per_image: int = typer.Option(None, help="RPN proposals kept per image (default: the detector's test-time count)."),
    fg_iou: float = typer.Option(0.5, help="IoU at or above which a RoI takes its best ground truth's class."),
    device: str = typer.Option("auto", help="auto (cuda when present), cpu, cuda, cuda:1, ..."),
    batch_size: int = typer.Option(4, help="Images per detector batch (fixed groups: results do not depend on sharding)."),
    shard: str = typer.Option(None, help="i/n: fill only shard i of n (default: torchrun's RANK/WORLD_SIZE, else 0/1)."),
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted extraction into the same store."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing store at --out."),
    seed: int = typer.Option(0, help="Seed of every random choice (the background subsample), recorded with the store."),
    train_bg_per_image: int = typer.Option(None, "--train-bg-per-image", help="Keep every foreground RoI of a train image and K of its background RoIs (seeded; default: all). Val keeps every proposal."),
    store_logits: bool = typer.Option(False, "--store-logits", help="Store the detector's class logits (float32 [RoIs, C+1]); by default they are recomputed from the fc level on read."),
    block_images: int = typer.Option(32, help="Images written together (one commit: objects hold whole blocks; memory holds one block; shards own whole blocks)."),
    threads: int = typer.Option(None, help="Torch threads (default: cores available)."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bar."),
) -> None:
    """Run a frozen detector once over a dataset and write its RoIs into a chunked zarr store."""
    config = ExtractConfig(splits=_csv(splits), levels=_csv(levels), rois_per_image=rois_per_image, fg_iou=fg_iou,
                           detector_config=config,
                           batch_size=batch_size, device=device, shard=Shard.parse(shard), resume=resume,
                           overwrite=overwrite, seed=seed, threads=threads, train_bg_per_image=train_bg_per_image,
                           store_logits=store_logits, block_images=block_images)
    report = extract(ckpt=ckpt, data=data, out=out, config=config, progress=not quiet)
    state = "complete" if report.complete else "incomplete (other shards or images pending)"
    Console().print(f"wrote {report.images_written} images, {report.rois_written:,} RoIs in {report.seconds:.1f} s "
                    f"to {report.store}: store {state}")


def main() -> None:
    app()

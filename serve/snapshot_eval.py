"""Val evaluation of detector-training snapshots: the convergence log of ``roicache detector train``.

:class:`SnapshotEval` is the training loop's snapshot hook. For each snapshot it runs the full
detector evaluation (:func:`serve.evaluate.evaluate_detector`, official LVIS API, ``orig`` head)
on the first ``images`` val images and appends one JSON line to ``RUN/val_log.jsonl``::

    {"step": 1200, "epoch": 1.5, "AP": 0.123, "APr": ..., "AP1": ..., "box_AP": ..., "seconds": 61.2}

AP values are fractions in [0, 1]. A step already in the log is not evaluated again, so a resumed
run only adds what is missing. It lives in ``serve`` because evaluation needs ``heads``' LVIS code,
which ``extract`` (where the training loop is) may not import.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from serve.evaluate import evaluate_detector

LOG_NAME = "val_log.jsonl"
KEYS = ("AP", "AP50", "APr", "APc", "APf", "AP1", "AP2", "AP3", "AP4")


@dataclass(frozen=True, kw_only=True)
class SnapshotEval:
    """Picklable hook ``(snapshot path, step) -> None`` (runs in training's rank-0 process).

    Attributes:
        data: dataset directory with ``val.json`` (or the split layout ``resolve_split`` reads).
        run_dir: the training run directory; the log is ``run_dir/val_log.jsonl``.
        images: evaluate the first ``images`` val images (``None`` = all).
        images_per_epoch: training images per epoch, to log the epoch next to the step.
        global_batch: training images per optimiser step.
    """

    data: Path
    run_dir: Path
    images: int | None
    images_per_epoch: int
    global_batch: int

    def __call__(self, snapshot: Path, step: int) -> None:
        log = Path(self.run_dir) / LOG_NAME
        if step in {row["step"] for row in read_val_log(log)}:
            return
        t0 = time.perf_counter()
        work = Path(self.run_dir) / f".eval_step_{step:06d}"
        run = evaluate_detector(ckpt=snapshot, data=self.data, out_dir=work, combines=("orig",),
                                limit=self.images, progress=False)
        metrics = run.rows["orig"]
        row = {"step": step, "epoch": round(step * self.global_batch / self.images_per_epoch, 3),
               "images": run.images}
        row.update({key: metrics.primary.summary[key] for key in KEYS})
        row["box_AP"] = metrics.bbox.summary["AP"] if metrics.bbox is not None else None
        row["seconds"] = round(time.perf_counter() - t0, 1)
        with log.open("a") as f:
            f.write(json.dumps(row) + "\n")
        shutil.rmtree(work, ignore_errors=True)


def read_val_log(path: Path) -> list[dict]:
    """The rows of a ``val_log.jsonl`` in file order; a torn last line (killed mid-write) is dropped."""
    rows = []
    try:
        lines = Path(path).read_text().splitlines()
    except FileNotFoundError:
        return rows
    for line in lines:
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue
    return rows


def train_preset(*, data: Path, out: Path, preset: str, overrides: dict, eval_images: int | None,
                 evaluate: bool, progress: bool) -> Path:
    """``roicache detector train``: train ``preset`` (with ``overrides`` of its schedule fields)
    on ``data``, logging val AP at each snapshot when ``evaluate``; returns the checkpoint path."""
    from dataclasses import replace  # noqa: PLC0415

    from extract.datasets.lvis_json import load_annotations, resolve_split  # noqa: PLC0415
    from extract.detectors.presets import get_preset  # noqa: PLC0415
    from extract.detectors.train import train_detector  # noqa: PLC0415

    recipe = get_preset(preset)
    config = replace(recipe.train, **overrides)
    train_json, _ = resolve_split(Path(data), "train")
    annset = load_annotations(train_json)
    hook = None
    if evaluate and config.snapshot_every is not None:
        resolve_split(Path(data), "val")  # a missing val split fails now, not after the first snapshot
        hook = SnapshotEval(data=Path(data), run_dir=Path(out), images=eval_images,
                            images_per_epoch=len(annset.images), global_batch=config.global_batch)
    arch = recipe.arch(num_classes=len(annset.categories))
    return train_detector(data_dir=data, out_dir=out, config=config, arch=arch, progress=progress,
                          on_snapshot=hook)

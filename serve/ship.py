"""``roicache detector ship``: turn a finished training run into the shipped detector (maintainers).

Writes ``extract/detectors/shipped/NAME.pt`` (float16 weights) and its manifest from
``RUN/detector.pt``, ``RUN/train_log.json`` and ``RUN/val_log.jsonl``, then evaluates the shipped
file itself on every val image and records that evaluation in the manifest: the figure the slow
test reproduces, and the one README/docs quote.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from cache_schema.errors import ConfigError
from extract.detectors.checkpoint import read_torch_file
from extract.detectors.shipped import record_val, shipped_checkpoint, write_shipped
from serve.evaluate import evaluate_detector
from serve.snapshot_eval import read_val_log


def ship_detector(*, run: Path, data: Path, name: str, preset: str, progress: bool = True) -> dict:
    """Ship ``run``'s final detector as ``name``; returns the val evaluation recorded (AP in [0, 1])."""
    run = Path(run)
    final, log = run / "detector.pt", run / "train_log.json"
    if not final.is_file() or not log.is_file():
        raise ConfigError(f"{run} holds no finished training run (detector.pt and train_log.json); finish it first")
    meta = read_torch_file(final, what="detector checkpoint")["meta"]
    training = {**json.loads(log.read_text()), "epochs_done": meta.get("epochs_done"),
                "total_steps": meta.get("total_steps"), "num_train_images": meta.get("num_train_images")}
    recipe = {"preset": preset, "train": meta.get("config")}
    write_shipped(final, name=name, data=Path(data), recipe=recipe, training=training,
                  val_log=read_val_log(run / "val_log.jsonl"))
    work = run / "eval_shipped"
    result = evaluate_detector(ckpt=shipped_checkpoint(name), data=data, out_dir=work, combines=("orig",),
                               progress=progress).rows["orig"]
    val = {"images": result.num_images,
           "segm": dict(result.segm.summary) if result.segm is not None else None,
           "bbox": dict(result.bbox.summary) if result.bbox is not None else None}
    record_val(name, val)
    shutil.rmtree(work, ignore_errors=True)
    return val

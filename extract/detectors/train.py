"""Train the small default detector from scratch (plain random image sampling, SGD, CPU or GPU).

Entry points: :func:`train_detector` reads ``DIR/train.json`` with the dataset package and calls
:func:`run_training`, which takes any map-style dataset whose items are
``(image float32 [3, H, W] in [0, 1], target)`` with ``boxes`` float32 ``[N, 4]`` xyxy pixels,
``labels`` int64 ``0..C-1`` and ``masks`` uint8 ``[N, H, W]``.

Several processes (``config.processes``) train data-parallel with gloo DDP; each reads its own
slice of every global batch. Outputs in ``out_dir``: ``last.pt`` (resume point, every
``checkpoint_every`` steps), ``detector.pt`` (the final checkpoint that ``extract`` loads) and
``train_log.json`` (wall-clock facts, kept out of ``detector.pt`` so its bytes are reproducible).
"""

from __future__ import annotations

import json
import math
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torchvision
from torch import nn

from cache_schema import errors
from cache_schema.errors import ConfigError, DatasetError
from cache_schema.runtime import configure_threads, sha256_file
from extract.detectors.arch import DetectorArch
from extract.detectors.checkpoint import save_detector
from extract.detectors.model import build_detector
from extract.detectors.progress import TrainProgress
from extract.detectors.train_config import DetectorTrainConfig, batch_indices, lr_at, step_seed
from extract.detectors.train_state import (
    TrainState,
    check_resumable,
    load_train_state,
    restore_into,
    save_train_state,
)

FINAL_NAME = "detector.pt"
STATE_NAME = "last.pt"
LOG_NAME = "train_log.json"
SNAPSHOT_DIR = "snapshots"
ERROR_PREFIX = ".train_error."


@dataclass(frozen=True, kw_only=True)
class _Job:
    """Everything a training process needs (pickled to spawned workers)."""

    dataset: object
    categories: list
    arch: DetectorArch
    config: DetectorTrainConfig
    out_dir: Path
    progress: bool
    stop_after_steps: int | None
    source: dict
    on_snapshot: Callable[[Path, int], None] | None = None


def train_detector(
    *,
    data_dir: Path,
    out_dir: Path,
    config: DetectorTrainConfig,
    arch: DetectorArch | None = None,
    progress: bool = True,
    stop_after_steps: int | None = None,
    on_snapshot: Callable[[Path, int], None] | None = None,
) -> Path:
    """Train on ``data_dir/train.json`` and return ``out_dir/detector.pt`` (resumes ``last.pt``).

    ``arch`` defaults to ``DetectorArch(num_classes=C)`` of the dataset. See :func:`run_training`.
    """
    from extract.datasets.lvis_json import load_annotations  # noqa: PLC0415 - sibling package, loaded late
    from extract.datasets.torch_dataset import DetectionDataset  # noqa: PLC0415

    data_dir = Path(data_dir)
    json_path = data_dir / "train.json"
    if not json_path.is_file():
        raise DatasetError(f"{json_path} not found; give a dataset directory holding train.json and images/")
    annset = load_annotations(json_path)
    dataset = DetectionDataset(annset, with_masks=True)
    categories = [{"id": int(c["id"]), "name": str(c["name"])} for c in _categories_of(annset)]
    source = {"train_json": str(json_path.resolve()), "train_json_sha256": sha256_file(json_path)}
    return run_training(
        dataset=dataset,
        categories=categories,
        out_dir=out_dir,
        config=config,
        arch=arch,
        progress=progress,
        stop_after_steps=stop_after_steps,
        source=source,
        on_snapshot=on_snapshot,
    )


def _categories_of(annset) -> list[dict]:
    cats = getattr(annset, "categories", None)
    if cats is None:
        raise DatasetError("annotation set has no categories; the json needs a 'categories' list")
    return sorted(cats, key=lambda c: int(c["id"]))


def run_training(
    *,
    dataset,
    categories: list[dict],
    out_dir: Path,
    config: DetectorTrainConfig,
    arch: DetectorArch | None = None,
    progress: bool = True,
    stop_after_steps: int | None = None,
    source: dict | None = None,
    on_snapshot: Callable[[Path, int], None] | None = None,
) -> Path:
    """Train a detector on ``dataset`` (``len`` + ``[i]``), resuming from ``out_dir/last.pt``.

    Args:
        categories: ``C`` dicts ``{"id", "name"}``, ascending id; class ``k`` is ``categories[k]``.
        stop_after_steps: run at most this many steps in this call, then return ``last.pt``
            (for chunked or preemptible jobs; the next call resumes). ``None`` = to the end.
        source: JSON-safe description of the training data, stored in the checkpoint's meta.
        on_snapshot: called on rank 0 as ``on_snapshot(path, step)`` after each snapshot of
            ``config.snapshot_every`` is written (the other ranks wait at their next collective);
            it must be picklable when ``config.processes > 1`` (a module-level class instance).

    Returns:
        ``out_dir/detector.pt`` when the run reached its last step or its time budget, else
        ``out_dir/last.pt``.
    """
    out_dir = Path(out_dir)
    arch = arch or DetectorArch(num_classes=len(categories))
    if arch.num_classes != len(categories):
        raise ConfigError(
            f"detector arch has num_classes={arch.num_classes} but the dataset has {len(categories)} categories"
        )
    if len(dataset) == 0:
        raise DatasetError("the training set is empty; give a train.json with images")
    if stop_after_steps is not None and stop_after_steps < 1:
        raise ConfigError(f"stop_after_steps={stop_after_steps} must be a positive integer or None")
    out_dir.mkdir(parents=True, exist_ok=True)
    final, state_path = out_dir / FINAL_NAME, out_dir / STATE_NAME
    total = config.total_steps(len(dataset))
    if state_path.exists():
        state = load_train_state(state_path)
        check_resumable(state, path=state_path, config=config, arch=arch, categories=categories)
        if state.step >= total and final.exists():
            return final
    job = _Job(
        dataset=dataset,
        categories=list(categories),
        arch=arch,
        config=config,
        out_dir=out_dir,
        progress=progress,
        stop_after_steps=stop_after_steps,
        source=dict(source or {}),
        on_snapshot=on_snapshot,
    )
    if config.processes == 1:
        threads_before = torch.get_num_threads()
        try:
            _worker(0, job, 0)
        finally:
            torch.set_num_threads(threads_before)  # leave the caller's setting as it was
    else:
        _spawn(job)
    steps_done = load_train_state(state_path).step
    log = json.loads((out_dir / LOG_NAME).read_text()) if (out_dir / LOG_NAME).exists() else {}
    # detector.pt matches last.pt only when the finish log was written at the same step.
    finished = final.exists() and log.get("steps_done") == steps_done
    return final if finished else state_path


def _spawn(job: _Job) -> None:
    """Run ``processes`` workers; a typed error in any of them is re-raised here with its type.

    ``torch.multiprocessing.spawn`` stops the other workers when one fails and raises a generic
    exception holding the traceback text, so workers leave their typed error in a small file.
    """
    for old in job.out_dir.glob(f"{ERROR_PREFIX}*.json"):
        old.unlink()
    try:
        torch.multiprocessing.spawn(_worker, args=(job, _free_port()), nprocs=job.config.processes, join=True)
    except (torch.multiprocessing.ProcessRaisedException, torch.multiprocessing.ProcessExitedException):
        for path in sorted(job.out_dir.glob(f"{ERROR_PREFIX}*.json")):
            record = json.loads(path.read_text())
            path.unlink()
            kind = getattr(errors, record["type"], None)
            if isinstance(kind, type) and issubclass(kind, errors.RoicacheError):
                raise kind(record["message"]) from None
        raise


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _worker(rank: int, job: _Job, port: int) -> None:
    """One training process: set threads, join the process group (if any), train."""
    configure_threads(job.config.threads_per_process)
    world = job.config.processes
    if world > 1:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        _train_loop(rank=rank, world=world, job=job)
    except errors.RoicacheError as exc:
        if world > 1:
            record = {"type": type(exc).__name__, "message": str(exc)}
            (job.out_dir / f"{ERROR_PREFIX}{rank}.json").write_text(json.dumps(record))
        raise
    finally:
        if world > 1:
            dist.destroy_process_group()


def _make_optimizer(model: nn.Module, config: DetectorTrainConfig) -> torch.optim.SGD:
    # No weight decay on norm scales/shifts and biases: decaying them only fights normalisation.
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if param.ndim <= 1 else decay).append(param)
    groups = [
        {"params": decay, "weight_decay": config.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum)


def _to_torchvision_target(target: dict) -> dict:
    """Dataset target (labels 0..C-1) -> torchvision target (labels 1..C), degenerate boxes dropped."""
    boxes = torch.as_tensor(target["boxes"], dtype=torch.float32).reshape(-1, 4)
    labels = torch.as_tensor(target["labels"], dtype=torch.int64).reshape(-1)
    masks = torch.as_tensor(target["masks"], dtype=torch.uint8)
    # torchvision asserts on zero-area boxes; a sliver of an occluded object carries no signal.
    keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    return {"boxes": boxes[keep], "labels": labels[keep] + 1, "masks": masks[keep]}


def _hflip(image: torch.Tensor, target: dict) -> tuple[torch.Tensor, dict]:
    width = image.shape[-1]
    boxes = target["boxes"].clone()
    boxes[:, [0, 2]] = width - target["boxes"][:, [2, 0]]
    return image.flip(-1), {**target, "boxes": boxes, "masks": target["masks"].flip(-1)}


def _load_batch(job: _Job, *, step: int, rank: int, device: torch.device) -> tuple[list, list]:
    config = job.config
    idx = batch_indices(
        seed=config.seed,
        step=step,
        rank=rank,
        batch_size=config.batch_size,
        world=config.processes,
        num_images=len(job.dataset),
    )
    flips = np.random.default_rng([config.seed, step, rank, 1]).random(len(idx)) < config.hflip_prob
    images, targets = [], []
    for i, flip in zip(idx, flips):
        image, target = job.dataset[i]
        image = torch.as_tensor(image, dtype=torch.float32)
        target = _to_torchvision_target(target)
        if flip:
            image, target = _hflip(image, target)
        images.append(image.to(device))
        targets.append({k: v.to(device) for k, v in target.items()})
    return images, targets


def _train_loop(*, rank: int, world: int, job: _Job) -> None:
    config, out_dir = job.config, job.out_dir
    device = torch.device("cpu")
    state_path = out_dir / STATE_NAME
    total = config.total_steps(len(job.dataset))
    torch.manual_seed(config.seed)  # initial weights: identical on every rank
    model = build_detector(job.arch).to(device).train()
    optimizer = _make_optimizer(model, config)
    start, losses, seconds_before = 0, [], 0.0
    if state_path.exists():
        state = load_train_state(state_path)
        restore_into(state, model=model, optimizer=optimizer, path=state_path)
        start, losses, seconds_before = state.step, list(state.losses), state.train_seconds
    net = nn.parallel.DistributedDataParallel(model) if world > 1 else model
    end = total if job.stop_after_steps is None else min(total, start + job.stop_after_steps)
    t0 = time.monotonic()
    bar = TrainProgress(total=total, start=start, enabled=job.progress and rank == 0)
    step, by_budget = start, False
    with bar:
        while step < end:
            torch.manual_seed(step_seed(seed=config.seed, step=step, rank=rank))
            images, targets = _load_batch(job, step=step, rank=rank, device=device)
            for group in optimizer.param_groups:
                group["lr"] = lr_at(config, step=step, total_steps=total)
            loss = sum(net(images, targets).values())
            if not torch.isfinite(loss):
                raise ConfigError(
                    f"detector training diverged at step {step} (loss {loss.item()}); lower lr or keep grad clipping"
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if config.grad_clip_norm is not None:
                nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip_norm)
            optimizer.step()
            # The budget is per call: a resumed run gets a fresh one.
            over = config.time_budget_s is not None and time.monotonic() - t0 > config.time_budget_s
            mean_loss, by_budget = _agree(loss.detach(), over=over and rank == 0, world=world)
            losses.append(mean_loss)
            step += 1
            bar.update(step=step, loss=mean_loss)
            if rank == 0 and (step % config.checkpoint_every == 0 or step == end or by_budget):
                seconds = seconds_before + time.monotonic() - t0
                _save_state(job, model=model, optimizer=optimizer, step=step, losses=losses, seconds=seconds)
            every = config.snapshot_every
            if rank == 0 and every is not None and (step % every == 0 or step == total):
                _snapshot(job, model=model, step=step, total=total)
            if by_budget:
                break
    if rank == 0 and (step >= total or by_budget):
        _finish(job, model=model, step=step, total=total, losses=losses, by_budget=by_budget,
                seconds=seconds_before + time.monotonic() - t0)
    if world > 1:
        dist.barrier()


def _agree(loss: torch.Tensor, *, over: bool, world: int) -> tuple[float, bool]:
    """Mean loss over ranks and whether rank 0 hit the time budget, in one collective."""
    if world == 1:
        return float(loss), over
    packed = torch.stack([loss.float() / world, torch.tensor(float(over))])
    dist.all_reduce(packed)
    return float(packed[0]), bool(packed[1] > 0)


def _save_state(job: _Job, *, model, optimizer, step: int, losses: list, seconds: float) -> None:
    state = TrainState(
        step=step,
        model={k: v.detach().clone() for k, v in model.state_dict().items()},
        optimizer=optimizer.state_dict(),
        config=job.config.to_dict(),
        arch=job.arch.to_dict(),
        categories=job.categories,
        losses=losses,
        train_seconds=seconds,
    )
    save_train_state(job.out_dir / STATE_NAME, state=state, seed=job.config.seed)


def _snapshot(job: _Job, *, model, step: int, total: int) -> None:
    """Write ``snapshots/step_NNNNNN.pt`` (loadable like ``detector.pt``) and run the hook."""
    meta = {"trainer": "extract.detectors.train", "config": job.config.to_dict(), "seed": job.config.seed,
            "steps_done": step, "total_steps": total, "snapshot": True, "data": job.source}
    path = save_detector(job.out_dir / SNAPSHOT_DIR / f"step_{step:06d}.pt", model=model, arch=job.arch,
                         categories=job.categories, meta=meta)
    if job.on_snapshot is not None:
        threads = torch.get_num_threads()
        try:
            job.on_snapshot(path, step)
        finally:
            torch.set_num_threads(threads)  # the hook may set its own; training keeps its layout


def _finish(job: _Job, *, model, step: int, total: int, losses: list, by_budget: bool, seconds: float) -> None:
    config = job.config
    meta = {
        "trainer": "extract.detectors.train",
        "config": config.to_dict(),
        "seed": config.seed,
        "steps_done": step,
        "total_steps": total,
        "stopped_by_time_budget": by_budget,
        "global_batch": config.global_batch,
        "num_train_images": len(job.dataset),
        "epochs_done": step * config.global_batch / len(job.dataset),
        "loss_history": losses,
        "data": job.source,
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
    }
    save_detector(job.out_dir / FINAL_NAME, model=model, arch=job.arch, categories=job.categories, meta=meta)
    log = {
        "train_seconds": seconds,
        "steps_done": step,
        "images_per_second": step * config.global_batch / max(seconds, 1e-9),
        "stopped_by_time_budget": by_budget,
        "final_loss_mean_last_20": float(np.mean(losses[-20:])) if losses else math.nan,
    }
    tmp = job.out_dir / f".{LOG_NAME}.tmp"
    tmp.write_text(json.dumps(log, indent=2))
    tmp.replace(job.out_dir / LOG_NAME)

"""The head-training loop: sampler → features → head → loss → SGD, resumable.

Outputs in ``out_dir``:
  ``log.jsonl``     one record per ``run.log_interval`` steps (loss, lr, RoIs/step; val accuracy
                    per instance-count bin every ``eval.interval`` steps and at the end)
  ``last.pt``       resumable state every ``run.checkpoint_interval`` steps and at the end
  ``config.toml`` / ``config.json``  the resolved settings
  ``head.pt``       the trained head (weights + :class:`~heads.models.HeadSpec` + meta)
  ``snapshots/step_NNNNNN.pt``  the head after each step of ``eval.snapshots`` (head.pt's format;
                    :func:`snapshot_paths`), for calibration dynamics (SimCal Fig. 4a)
  ``metrics.json``  written last: its presence marks a finished run
With ``[fasa] enabled``, :mod:`heads.fasa` adds virtual classifier-input features each step and
adapts their sampling every ``fasa.period`` steps from the per-class val loss (needs ``val``;
without it the sampling probabilities stay at their inverse-frequency start).
Re-running with the same ``out_dir`` resumes from ``last.pt`` and, by construction (counter-
based randomness, saved momentum), ends with the same weights as an uninterrupted run — and the
same snapshots: those past the resume point are written again, earlier ones are kept (a step
added to ``eval.snapshots`` after the run passed it is not made; ``metrics.json`` lists the
snapshot steps the folder holds).
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from cache_schema.errors import ConfigError, SchemaError
from cache_schema.records import ClassInfo, RoiSet
from cache_schema.runtime import check_output, configure_threads, pick_device
from heads.build import build_loss, build_sampler, build_training_head, fit_ncm, make_head_spec
from heads.checkpointing import load_training_state, save_training_state, write_atomic, write_json_atomic
from heads.config import TrainConfig, config_to_dict, dump_toml, training_identity
from heads.models import HeadSpec, save_head
from heads.fasa import FeatureAugmenter
from heads.monitor import ValRois, per_class_val_loss, prepare_val, val_accuracy
from heads.sources import NonFiniteFeatureError, RoiIndex, RoiSource, check_finite, gathered_batches

_LOSS_RNG_STREAM = 7
SNAPSHOT_DIR = "snapshots"


@dataclass(frozen=True, kw_only=True)
class TrainResult:
    """What a finished :func:`train_head` call produced.

    Attributes:
        head_path: ``out_dir/head.pt``.
        steps: optimisation steps in total (0 for ncm).
        resumed_from: step the run resumed at (0 for a fresh run).
        final_loss: mean loss over the last logged window (``None`` for ncm / no step run now).
        steps_per_second: steps run in this call / their wall time (``None`` when none ran).
        metrics: the content of ``metrics.json``.
    """

    out_dir: Path
    head_path: Path
    spec: HeadSpec
    steps: int
    resumed_from: int
    final_loss: float | None
    steps_per_second: float | None
    metrics: dict


def _non_finite(x: torch.Tensor, rows: np.ndarray, index: RoiIndex, step: int) -> NonFiniteFeatureError:
    """The error naming the train images whose cached features in this batch are not finite."""
    bad = (~torch.isfinite(x.reshape(len(x), -1)).all(dim=1)).cpu().numpy()
    images = np.unique(index.images[index.blocks_of_rows(rows[bad])]).tolist()
    return NonFiniteFeatureError(
        f"train step {step}: NaN/Inf in the cached features (train/feat) of {int(bad.sum())} RoIs of train images "
        f"{images[:5]}{' …' if len(images) > 5 else ''}; run `roicache cache validate` to list every damaged image, "
        "clear them with `roicache cache invalidate` and re-extract them (extract --resume)")


def _loss_generator(seed: int, step: int, device: torch.device) -> torch.Generator:
    """Per-step generator for the loss's own draws (GOL's Bernoulli), counter-based like the samplers."""
    s = int(np.random.SeedSequence([seed, _LOSS_RNG_STREAM, step]).generate_state(1, np.uint64)[0] >> 1)
    return torch.Generator(device=device).manual_seed(s)


def _check_inputs(source: RoiSource, class_info: ClassInfo) -> None:
    if source.index.num_classes != class_info.num_classes:
        raise SchemaError(f"the RoI source has C={source.index.num_classes} classes, ClassInfo C={class_info.num_classes}; "
                          f"load both from the same store")
    if source.index.num_rows == 0:
        raise SchemaError("the train split holds no RoIs; extract it before training a head")
    if not bool((source.index.labels < class_info.num_classes).any()):
        raise SchemaError("no train RoI is foreground (empty class set); check the store's IoU threshold")


def _drop_stale_results(out_dir: Path) -> None:
    """Remove a previous attempt's final outputs so they never look like this run's."""
    for name in ("metrics.json", "head.pt"):
        (out_dir / name).unlink(missing_ok=True)


class _Snapshots:
    """Writes the head after the steps of ``eval.snapshots`` to ``out_dir/snapshots/``."""

    def __init__(self, out_dir: Path, steps: tuple[int, ...], *, spec: HeadSpec, meta: dict) -> None:
        self.dir, self.steps, self.spec, self.meta = out_dir / SNAPSHOT_DIR, frozenset(steps), spec, meta

    def drop_after(self, step: int) -> None:
        """Remove snapshots past ``step`` (the resume point; 0 = a fresh run): the steps ahead
        will write them again, and a fresh run must not show another attempt's."""
        for done, path in snapshot_paths(self.dir.parent).items():
            if done > step:
                path.unlink()

    def maybe_save(self, done: int, head: nn.Module) -> None:
        """Save the head after ``done`` completed steps when that step was asked for (atomic)."""
        if done in self.steps:
            save_head(self.dir / f"step_{done:06d}.pt", head=head, spec=self.spec, meta=self.meta)


def snapshot_paths(run_dir: str | Path) -> dict[int, Path]:
    """``{step: path}`` of the head snapshots a run folder holds, by increasing step (empty
    when it has none). Each file is a head file (:func:`heads.models.load_head`)."""
    found = {}
    for path in (Path(run_dir) / SNAPSHOT_DIR).glob("step_*.pt"):
        digits = path.stem.removeprefix("step_")
        if digits.isdigit():
            found[int(digits)] = path
    return dict(sorted(found.items()))


def log_lines(path: Path) -> list[tuple[str, dict]]:
    """``(line, record)`` of each readable record of a run's ``log.jsonl``, in file order; a last
    line cut short by a crash (or any line that is not a JSON object) is skipped. Empty when the
    file does not exist."""
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict):
            out.append((line, record))
    return out


def _truncate_log(path: Path, step: int) -> None:
    """Drop log records written after the checkpoint a run resumes from (they will be redone),
    and a last line cut short by a crash."""
    if not path.exists():
        return
    kept = [line for line, record in log_lines(path) if record.get("step", 0) <= step]
    write_atomic(path, ("\n".join(kept) + ("\n" if kept else "")).encode())


class _Logger:
    def __init__(self, path: Path, progress: bool) -> None:
        self.path, self.progress = path, progress

    def write(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")
        if self.progress:
            bits = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()
                            if not k.startswith("n_"))
            print(f"[heads train] {bits}", file=sys.stderr, flush=True)


def _train_step(head: nn.Module, optimizer: torch.optim.Optimizer, loss_fn, x: torch.Tensor, y: torch.Tensor, *,
                step: int, generator: torch.Generator, grad_clip: float, fasa: FeatureAugmenter | None) -> torch.Tensor:
    if fasa is None:
        loss = loss_fn(head(x), y, generator=generator)
    else:
        loss = fasa.loss(head, loss_fn, x, y, step=step, generator=generator)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip > 0:
        nn.utils.clip_grad_norm_([p for p in head.parameters() if p.requires_grad], grad_clip)
    optimizer.step()
    return loss.detach()


def _run_loop(*, config: TrainConfig, head: nn.Module, spec: HeadSpec, optimizer, loss_fn, sampler,
              source: RoiSource, device: torch.device, start: int, valset: ValRois | None, logger: _Logger,
              state_path: Path, fasa: FeatureAugmenter | None, snapshots: _Snapshots) -> dict:
    """Steps ``start..max_steps-1``; returns timing and the last logged loss / val accuracy."""
    sch, run, ev = config.schedule, config.run, config.eval
    identity, sampler_state = training_identity(config), sampler.state_dict()
    window_loss = torch.zeros((), device=device)
    window_steps = window_rois = 0
    last: dict = {"loss": None, "val": None}
    t0 = time.perf_counter()
    for step, batch, feats, labels in gathered_batches(sampler, source, range(start, sch.max_steps)):
        lr = sch.lr_at(step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        x = feats.to(device, non_blocking=True).float()
        try:
            check_finite(x, what=f"train step {step}")
        except NonFiniteFeatureError:
            raise _non_finite(x, np.asarray(batch.rows), source.index, step) from None
        loss = _train_step(head, optimizer, loss_fn, x, labels.to(device), step=step, fasa=fasa,
                           generator=_loss_generator(run.seed, step, device), grad_clip=sch.grad_clip)
        window_loss += loss
        window_steps, window_rois = window_steps + 1, window_rois + len(batch.rows)
        done, final = step + 1, step + 1 == sch.max_steps
        snapshots.maybe_save(done, head)
        if done % run.log_interval == 0 or final:
            record = {"step": done, "lr": lr, "loss": float(window_loss) / window_steps,
                      "rois_per_step": window_rois / window_steps, "seconds": round(time.perf_counter() - t0, 3)}
            last["loss"] = record["loss"]
            if valset is not None and ((ev.interval and done % ev.interval == 0) or final):
                last["val"] = val_accuracy(head, spec, valset, device=device, batch_rois=ev.batch_rois)
                record.update(last["val"])
            logger.write(record)
            window_loss.zero_()
            window_steps = window_rois = 0
        if fasa is not None and valset is not None and done % fasa.period == 0:
            val_loss = per_class_val_loss(head, spec, valset, num_classes=spec.num_classes, device=device,
                                          batch_rois=ev.batch_rois)
            logger.write({"step": done, "event": "fasa_adapt", **fasa.adapt(val_loss)})
        if done % run.checkpoint_interval == 0 or final:
            save_training_state(state_path, head=head, optimizer=optimizer, step=done, lr=lr,
                                sampler_state=sampler_state, identity=identity,
                                fasa=None if fasa is None else fasa.state_dict())
    elapsed = time.perf_counter() - t0
    ran = sch.max_steps - start
    last["steps_per_second"] = ran / elapsed if ran > 0 and elapsed > 0 else None
    last["seconds"] = elapsed
    return last


def _build_fasa(config: TrainConfig, *, spec: HeadSpec, class_info: ClassInfo,
                device: torch.device) -> FeatureAugmenter | None:
    fc = config.fasa
    if not fc.enabled:
        return None
    if spec.name == "ncm":
        raise ConfigError("fasa augments a trained classifier; it does not apply to head ncm (set fasa.enabled = false)")
    dim = spec.in_features if spec.name == "lastfc" else spec.hidden
    return FeatureAugmenter(num_classes=spec.num_classes, dim=dim, instance_count=class_info.instance_count,
                            seed=config.run.seed, device=device, momentum=fc.momentum, loss_weight=fc.loss_weight,
                            period=fc.period, alpha=fc.alpha, beta=fc.beta, num_groups=fc.num_groups)


def _finish(*, out_dir: Path, config: TrainConfig, head: nn.Module, spec: HeadSpec, meta: dict,
            metrics: dict) -> Path:
    write_atomic(out_dir / "config.toml", dump_toml(config).encode())
    write_json_atomic(out_dir / "config.json", config_to_dict(config))
    head_path = save_head(out_dir / "head.pt", head=head, spec=spec, meta=meta)
    write_json_atomic(out_dir / "metrics.json", metrics)  # last: marks completion
    return head_path


def train_head(*, config: TrainConfig, source: RoiSource, class_info: ClassInfo, init_state: dict | None,
               out_dir: str | Path, val: RoiSet | None = None, device: str | torch.device | None = None,
               progress: bool = True, init_from: str | None = None, meta: dict | None = None) -> TrainResult:
    """Train (or fit, for ncm) the head ``config`` describes on ``source``'s train RoIs.

    Args:
        config: resolved settings (:func:`heads.config.load_config`).
        source: train RoIs (:class:`heads.sources.InMemoryRoiSource` / ``StreamingRoiSource``) at
            the level the head reads (:func:`heads.models.level_for_head`).
        class_info: train-split class statistics (same store).
        init_state: detector box-head weights ``{"fc6.*", "fc7.*", "cls.*"}`` (cls rows
            ``[0..C-1, background]``) or ``None`` for random-init heads.
        out_dir: output folder; an existing ``last.pt`` there is resumed.
        val: val RoIs (same level) for the accuracy monitor, or ``None``.
        device: ``None``/``"auto"`` → ``config.run.device`` (CUDA when present).
        init_from: sha256 of the detector checkpoint, recorded in the spec.
        meta: extra provenance (plain types) stored in ``head.pt``.
    """
    # Device and output location are checked before anything is created.
    dev = pick_device(config.run.device if device in (None, "auto") else str(device))
    out_dir = check_output(out_dir, kind="dir")
    out_dir.mkdir(parents=True, exist_ok=True)
    if config.run.threads:
        configure_threads(config.run.threads)
    _check_inputs(source, class_info)
    seed = config.run.seed
    loss_fn = build_loss(config.loss, class_info=class_info, num_train_images=source.index.num_blocks).to(dev)
    spec = make_head_spec(config, feature_shape=source.feature_shape, num_classes=class_info.num_classes,
                          init_state=init_state, init_from=init_from, loss=loss_fn)
    head = build_training_head(spec, cfg=config.head, init_state=init_state, seed=seed, loss=loss_fn).to(dev)
    valset = None if val is None else prepare_val(val, class_info=class_info, edges=config.eval.bins,
                                                  max_rois=config.eval.max_rois, seed=seed)
    head_meta = {"config": config_to_dict(config), "seed": seed, **(meta or {})}
    fasa = _build_fasa(config, spec=spec, class_info=class_info, device=dev)
    if spec.name == "ncm":  # one pass, no steps: no snapshots either
        _drop_stale_results(out_dir)
        _Snapshots(out_dir, (), spec=spec, meta=head_meta).drop_after(0)
        fit = fit_ncm(head, source=source, device=dev)
        metrics = {"steps": 0, "ncm": fit, "device": str(dev), "spec": spec.to_dict()}
        if valset is not None:
            metrics["val"] = val_accuracy(head, spec, valset, device=dev, batch_rois=config.eval.batch_rois)
        path = _finish(out_dir=out_dir, config=config, head=head, spec=spec, meta=head_meta, metrics=metrics)
        return TrainResult(out_dir=out_dir, head_path=path, spec=spec, steps=0, resumed_from=0, final_loss=None,
                           steps_per_second=None, metrics=metrics)
    sch = config.schedule
    optimizer = torch.optim.SGD([p for p in head.parameters() if p.requires_grad], lr=sch.lr,
                                momentum=sch.momentum, weight_decay=sch.weight_decay)
    sampler = build_sampler(config.sampler, index=source.index, class_info=class_info, seed=seed)
    state_path, start = out_dir / "last.pt", 0
    if state_path.exists():
        state = load_training_state(state_path, identity=training_identity(config), sampler_state=sampler.state_dict())
        head.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if fasa is not None:
            fasa.load_state_dict(state["fasa"])
        start = min(int(state["step"]), sch.max_steps)
    _drop_stale_results(out_dir)  # only once the folder is known to hold this run (or none)
    _truncate_log(out_dir / "log.jsonl", start)
    snapshots = _Snapshots(out_dir, config.eval.snapshots, spec=spec, meta=head_meta)
    snapshots.drop_after(start)
    head.train()
    last = _run_loop(config=config, head=head, spec=spec, optimizer=optimizer, loss_fn=loss_fn, sampler=sampler,
                     source=source, device=dev, start=start, valset=valset,
                     logger=_Logger(out_dir / "log.jsonl", progress), state_path=state_path, fasa=fasa,
                     snapshots=snapshots)
    if last["val"] is None and valset is not None:
        last["val"] = val_accuracy(head, spec, valset, device=dev, batch_rois=config.eval.batch_rois)
    metrics = {"steps": sch.max_steps, "resumed_from": start,
               "fasa": None if fasa is None else {"p_sum": float(fasa.p.sum()), "adaptations": fasa.adaptations}, "final_loss": last["loss"],
               "steps_per_second": last["steps_per_second"], "seconds": last["seconds"], "device": str(dev),
               "sampler": sampler.state_dict(), "spec": spec.to_dict(), "val": last["val"],
               "snapshots": list(snapshot_paths(out_dir))}
    path = _finish(out_dir=out_dir, config=config, head=head.eval(), spec=spec, meta=head_meta, metrics=metrics)
    return TrainResult(out_dir=out_dir, head_path=path, spec=spec, steps=sch.max_steps, resumed_from=start,
                       final_loss=last["loss"], steps_per_second=last["steps_per_second"], metrics=metrics)

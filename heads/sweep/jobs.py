"""What a sweep worker runs: train one head (:func:`train_job`), score the original head once per
sweep (:func:`orig_job`), score one trial (:func:`score_job`).

All are plain functions of frozen records, so the local process pool and Ray run the same
code. Training reuses :func:`heads.train.train_head` on an
:class:`~heads.sources.InMemoryRoiSource` over the :class:`TrainInputs` the caller loaded;
scoring reuses :func:`heads.pipeline.evaluate_with_inputs` on the val
:class:`~heads.evaluation.EvalInputs` the caller loaded. The process pool loads both once in the
parent and shares them with its workers; a Ray task loads its own from the store.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from cache_schema import Store, open_store
from cache_schema.errors import SchemaError
from cache_schema.head_init import read_head_weights
from cache_schema.records import ClassInfo, RoiSet
from cache_schema.runtime import pick_device
from heads.checkpointing import write_json_atomic
from heads.config import config_to_dict
from heads.combine import Combination
from heads.evaluation import BinSpec, EvalInputs
from heads.models import level_for_head
from heads.pipeline import FROM_DETECTOR, evaluate_with_inputs, head_meta, load_eval_inputs
from heads.sources import InMemoryRoiSource
from heads.sweep.diagnostics import CAL_ONLY, snapshot_dynamics, trial_diagnostics
from heads.sweep.grid import Trial
from heads.sweep.identity import check_id
from heads.sweep.results import TrialResult
from heads.train import snapshot_paths, train_head

#: ``train_head`` writes it last: its presence marks a finished head.
HEAD_DONE = "metrics.json"
DIAGNOSTICS = "diagnostics.json"  # per head, shared by its trials (head_diagnostics)


@dataclass(frozen=True, kw_only=True)
class TrainInputs:
    """What training reads besides the config: loaded once per pool (shared) or per Ray task.

    Attributes:
        train: level -> train RoIs with float16 features ``[N, *level_shape]``.
        val: level -> val RoIs with features (the accuracy monitor, FASA's val loss); empty
            when the store has no val split.
        init_state: the detector's box-head weights (float32 tensors ``fc6.*``, ``fc7.*``,
            ``cls.*``), or ``None`` when no head of the sweep starts from them.
        class_info: train-split class statistics.
        head_meta: level -> the provenance ``heads train`` records in ``head.pt``.
        detector_sha256: the detector checkpoint's sha256 (recorded in the head spec).
    """

    train: dict[str, RoiSet]
    val: dict[str, RoiSet]
    init_state: dict[str, torch.Tensor] | None
    class_info: ClassInfo
    head_meta: dict[str, dict]
    detector_sha256: str

    def __post_init__(self) -> None:
        if set(self.head_meta) != set(self.train) or any(r.features is None for r in self.train.values()):
            raise SchemaError("train inputs: every level needs train RoIs with features and a head record; "
                              "build them with load_train_inputs")

    def share_memory(self) -> "TrainInputs":
        """Move every tensor into shared memory (in place) and return ``self``: pickled to a
        worker of a ``torch.multiprocessing`` pool, a tensor then travels as a file descriptor of
        the same pages, so the workers read the parent's arrays instead of holding copies."""
        for roiset in (*self.train.values(), *self.val.values()):
            for value in vars(roiset).values():
                if isinstance(value, torch.Tensor):
                    value.share_memory_()
        for value in (self.init_state or {}).values():
            value.share_memory_()
        return self

    @property
    def nbytes(self) -> int:
        """Bytes of the feature arrays (what sharing saves per extra worker)."""
        sets = (*self.train.values(), *self.val.values())
        return sum(r.features.numel() * r.features.element_size() for r in sets if r.features is not None)


def load_train_inputs(store: Store, levels: tuple[str, ...], *, with_init: bool,
                      val_from: EvalInputs | None = None) -> TrainInputs:
    """Read the train (and val) RoIs of ``levels`` and, with ``with_init``, the detector head.
    ``val_from``: take the val RoIs from these evaluation inputs (their tensors, not a second
    copy; they must hold ``levels``) instead of reading them."""
    init = {k: torch.from_numpy(v).float() for k, v in read_head_weights(store).items()} if with_init else None
    if val_from is not None:
        val = {lv: val_from.monitor_rois(lv) for lv in levels}
    else:
        val = {lv: store.split("val").load(level=lv) for lv in levels} if "val" in store.splits else {}
    return TrainInputs(
        train={lv: store.split("train").load(level=lv) for lv in levels}, val=val,
        init_state=init, class_info=store.classes, head_meta={lv: head_meta(store, lv) for lv in levels},
        detector_sha256=store.meta.detector.checkpoint_sha256)


@dataclass(frozen=True, kw_only=True)
class TrainJob:
    """Train the head of ``trial.config`` into ``head_dir`` (resuming ``last.pt`` there)."""

    train_id: str
    trial: Trial
    head_dir: Path

    def __post_init__(self) -> None:
        check_id("train id", self.train_id)


@dataclass(frozen=True, kw_only=True)
class TrainDone:
    """A finished :class:`TrainJob`: steps in total, wall seconds and steps/s of this attempt
    (``None`` when it ran no step: ncm, or a resumed head whose steps were all done)."""

    train_id: str
    steps: int
    seconds: float | None
    steps_per_second: float | None


def train_job(job: TrainJob, inputs: TrainInputs) -> TrainDone:
    """Train (or resume) ``job``'s head with :func:`heads.train.train_head` on ``inputs``, exactly
    as ``heads train`` would from the store (same source rows, init weights, val and provenance)."""
    config = job.trial.config
    level = level_for_head(config.head.name)
    source = InMemoryRoiSource(roiset=inputs.train[level], num_classes=inputs.class_info.num_classes)
    init = inputs.init_state if config.head.name in FROM_DETECTOR else None
    result = train_head(config=config, source=source, class_info=inputs.class_info, init_state=init,
                        out_dir=job.head_dir, val=inputs.val.get(level), progress=False,
                        init_from=inputs.detector_sha256, meta=inputs.head_meta[level])
    return TrainDone(train_id=job.train_id, steps=result.steps, seconds=result.metrics.get("seconds"),
                     steps_per_second=result.steps_per_second)


def head_finished(head_dir: Path) -> bool:
    """``head_dir`` holds a finished ``heads train`` run (its marker and the head)."""
    return (head_dir / HEAD_DONE).is_file() and (head_dir / "head.pt").is_file()


@dataclass(frozen=True, kw_only=True)
class OrigJob:
    """Score the original head alone (row ``orig``): it depends on the store and the evaluation
    settings only, so a sweep computes it once and hands it to every :class:`ScoreJob`.

    Attributes:
        cache: the store's path or URL (a Ray task opens it).
        bins, evaluator: the grid's evaluation settings.
    """

    cache: str
    bins: str
    evaluator: str


def orig_job(job: OrigJob, inputs: EvalInputs) -> dict:
    """``Metrics.to_dict()`` of the ``orig`` row on ``inputs``."""
    outcome = evaluate_with_inputs(inputs=inputs, head=None, combinations=(Combination(rule="orig"),), out_dir=None,
                                   bins=BinSpec.preset(job.bins), progress=False)
    return outcome.rows["orig"].to_dict()


@dataclass(frozen=True, kw_only=True)
class ScoreJob:
    """Score one trial's head by cached evaluation: row ``orig`` (given) and the trial's rule.

    Attributes:
        cache: the store's path or URL (a Ray task opens it).
        fingerprint: :func:`heads.sweep.identity.store_fingerprint` of it (recorded).
        bins, evaluator: the grid's evaluation settings.
        orig: the ``orig`` row (:func:`orig_job`) of the same store and settings.
    """

    cache: str
    trial: Trial
    trial_id: str
    train_id: str
    head_dir: Path
    fingerprint: dict
    bins: str
    evaluator: str
    orig: dict

    def __post_init__(self) -> None:
        check_id("trial id", self.trial_id)
        check_id("train id", self.train_id)


def head_diagnostics(job: ScoreJob, inputs: EvalInputs, *, device: str) -> dict:
    """What heads.sweep.plots draws besides the AP rows, for the trial's *head* (shared by every
    trial of it, so computed once and kept in ``head_dir/diagnostics.json``): per-class classifier
    norms and mean val scores, and — when the run kept snapshots (``eval.snapshots``) — the AP of
    each snapshot with the calibrated head alone (``cal-only``: SimCal Fig. 4a's calibration
    dynamics; a dual-head rule would hide them behind the original head's rows)."""
    path = job.head_dir / DIAGNOSTICS
    settings = {"bins": job.bins, "evaluator": job.evaluator}
    if path.is_file():
        kept = json.loads(path.read_text())
        if kept.get("settings") == settings:
            return kept["diagnostics"]
    diagnostics = trial_diagnostics(inputs, job.head_dir, device=device)
    if snapshot_paths(job.head_dir):
        diagnostics["dynamics"] = snapshot_dynamics(inputs=inputs, run_dir=job.head_dir, combination=CAL_ONLY,
                                                    bins=BinSpec.preset(job.bins), device=device)
    # Two trials of one head may race here: both compute the same values, the atomic write keeps one.
    write_json_atomic(path, {"settings": settings, "diagnostics": diagnostics})
    return diagnostics


def score_job(job: ScoreJob, inputs: EvalInputs) -> TrialResult:
    """Cached evaluation on ``inputs`` of the finished head in ``job.head_dir`` (the trial's rule
    with its combination settings; ``orig`` is ``job.orig``) plus the diagnostics the plots read."""
    config = job.trial.config
    device = str(pick_device(config.run.device))
    rows = {"orig": job.orig}  # the reference every row is read against (the only row when the rule is orig)
    if config.combine.rule != "orig":
        outcome = evaluate_with_inputs(inputs=inputs, head=job.head_dir, combinations=config.combine.per_rule(
            (config.combine.rule,)), out_dir=None, bins=BinSpec.preset(job.bins), device=device, progress=False)
        rows.update({rule: m.to_dict() for rule, m in outcome.rows.items()})
    trained = json.loads((job.head_dir / HEAD_DONE).read_text())
    diagnostics = head_diagnostics(job, inputs, device=device)
    return TrialResult(trial_id=job.trial_id, train_id=job.train_id, config=config_to_dict(config),
                       values=job.trial.value_dict(), label=job.trial.label, store=job.fingerprint,
                       rule=config.combine.rule, rows=rows, train_seconds=trained.get("seconds"),
                       steps_per_second=trained.get("steps_per_second"), seed=config.run.seed, diagnostics=diagnostics)


# ----------------------------------------------------------------------------- process pool workers
_POOL_INPUTS: TrainInputs | None = None
_POOL_EVAL: EvalInputs | None = None


def init_pool_worker(inputs: TrainInputs | None, evaluation: EvalInputs, threads: int) -> None:
    """Pool initializer: keep the parent's shared train and evaluation inputs (received as file
    descriptors of shared memory, not copies) and use ``threads`` torch threads (cores / jobs:
    no oversubscription)."""
    global _POOL_INPUTS, _POOL_EVAL
    _POOL_INPUTS, _POOL_EVAL = inputs, evaluation
    torch.set_num_threads(max(1, threads))


def train_in_pool(job: TrainJob) -> TrainDone:
    if _POOL_INPUTS is None:  # pragma: no cover - the runner passes inputs whenever it trains
        raise RuntimeError("sweep worker started without train inputs")
    return train_job(job, _POOL_INPUTS)


def orig_in_pool(job: OrigJob) -> dict:
    return orig_job(job, _POOL_EVAL)


def score_in_pool(job: ScoreJob) -> TrialResult:
    return score_job(job, _POOL_EVAL)


# ----------------------------------------------------------------------------- Ray tasks
def train_in_ray(job: TrainJob, cache: str, threads: int) -> TrainDone:
    """A Ray task: opens the store itself (the cluster's nodes do not share the driver's memory)."""
    torch.set_num_threads(max(1, threads))
    store = open_store(cache)
    config = job.trial.config
    level = level_for_head(config.head.name)
    inputs = load_train_inputs(store, (level,), with_init=config.head.name in FROM_DETECTOR)
    return train_job(job, inputs)


def orig_in_ray(job: OrigJob, annotations: dict[str, Path] | None, threads: int) -> dict:
    """``annotations``: the sweep's ``--annotations`` (``{"val": PATH}``), or ``None``."""
    torch.set_num_threads(max(1, threads))
    return orig_job(job, load_eval_inputs(open_store(job.cache), evaluator=job.evaluator, annotations=annotations))


def score_in_ray(job: ScoreJob, annotations: dict[str, Path] | None, threads: int) -> TrialResult:
    torch.set_num_threads(max(1, threads))
    level = level_for_head(job.trial.config.head.name)
    return score_job(job, load_eval_inputs(open_store(job.cache), levels=(level,), evaluator=job.evaluator,
                                           annotations=annotations))


__all__ = ["TrainInputs", "TrainJob", "TrainDone", "OrigJob", "ScoreJob", "load_train_inputs", "train_job",
           "orig_job", "score_job", "head_finished", "HEAD_DONE"]

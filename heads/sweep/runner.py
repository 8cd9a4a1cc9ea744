"""Run a sweep: check everything up front, train each distinct head once, score every trial,
write its result, rebuild the tables.

Order of work: trials whose result file exists are done; of the rest, each distinct train id
whose head directory lacks a finished head (``metrics.json``) is trained (``heads.train``
resumes a killed attempt from its ``last.pt``), and as soon as a head is ready its trials are
scored, each in its own job. Jobs run (:mod:`heads.sweep.backends`) on

- local processes (default): ``jobs`` worker processes forked from a server process that
  imported torch and the project once (multiprocessing's ``forkserver``), so the workers share
  those modules' pages. The parent loads once the train RoIs of the levels the pending heads read
  and everything cached evaluation reads from the val split
  (:class:`~heads.evaluation.EvalInputs`: val features of those levels, logits, boxes, mask
  overlaps, ground truth; the training monitor's val RoIs are the same tensors), moves them into
  shared memory and hands them to each worker through the pool initializer; pickled by torch's
  reductions they travel as file descriptors of the same pages, so neither the feature nor the
  evaluation memory grows with ``jobs`` (only each worker's head, training batches and score
  tables do). Each worker runs ``cores // jobs`` torch threads. With one job (``--jobs 1``, or
  what the machine allows) the jobs run on a thread of the sweep's own process instead: no
  second interpreter, no shared-memory copy.
- a Ray cluster (``address``: ``ray://HOST:PORT``, ``HOST:PORT``, ``auto``, or ``local`` for a
  Ray instance started here): each task opens the store itself from its path or URL, so the
  store and ``DIR`` must be reachable under the same names from every node (a shared file
  system or an object-store URL for the store).

The ``orig`` row (the original head alone) does not depend on the trial, so it is scored once per
run, as the first job, and copied into every trial's result. Either way the rows of a trial are
the same: training is seeded and counter-based, scoring is deterministic.
"""

from __future__ import annotations

import concurrent.futures as cf
import gc
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cache_schema import Store, open_store
from cache_schema.errors import ConfigError, SchemaError
from cache_schema.head_init import read_head_weights
from cache_schema.runtime import available_cores, available_memory_bytes, check_output
from heads.models import level_for_head
from heads.pipeline import FROM_DETECTOR, load_eval_inputs, val_ground_truth
from heads.sweep.backends import Backend, ProcessBackend, RayBackend, ThreadBackend
from heads.sweep.grid import SweepGrid
from heads.sweep.identity import store_fingerprint, train_id, trial_id
from heads.evaluation import EvalInputs
from heads.sweep.jobs import OrigJob, ScoreJob, TrainInputs, TrainJob, head_finished, load_train_inputs
from heads.sweep.progress import SweepProgress
from heads.sweep.results import (PlannedTrial, SweepRecord, head_dir, read_result, read_sweep_record, sweep_path,
                                 write_result, write_sweep_record)
from heads.sweep.tables import Report, write_report

#: Memory one worker needs besides the shared inputs: a head, its gradients and momentum,
#: training batches, and for a worker process an interpreter with torch (measured: 0.75 GB of a
#: worker process's own pages training 2fc_rand on 256x7x7 features; kept as the bound for threads
#: too). An evaluation's score tables come on top (:attr:`~heads.evaluation.EvalInputs.scratch_bytes`).
WORKER_BYTES = 1 << 30
#: Where local jobs run (``--workers``): threads of the sweep's process, or worker processes.
WORKERS = ("threads", "processes")
DEFAULT_WORKERS = "threads"


@dataclass(frozen=True, kw_only=True)
class SweepPlan:
    """The grid's trials with their content addresses on one store (``ids[i]`` is
    ``grid.trials[i]``'s)."""

    grid: SweepGrid
    cache: str
    fingerprint: dict
    ids: tuple[PlannedTrial, ...]

    def __post_init__(self) -> None:
        if len(self.ids) != len(self.grid.trials):
            raise ConfigError("sweep plan: one id record per trial is required")

    def record(self) -> SweepRecord:
        return SweepRecord(grid_source=self.grid.source, grid_text=self.grid.text, cache=self.cache,
                           store=self.fingerprint, fields=self.grid.varied_fields, bins=self.grid.bins,
                           evaluator=self.grid.evaluator, trials=self.ids)


def check_store(store: Store, grid: SweepGrid, annotations: dict[str, Path] | None = None) -> None:
    """Everything a trial will need from the store, checked before any work: a train and a val
    split, the feature level of every trial's head in both, the detector head weights for heads
    that start from them, the val ground truth for evaluation (``annotations``: ``{"val": PATH}``
    when the val json is not where the store recorded it)."""
    for name in ("train", "val"):
        if name not in store.splits:
            raise SchemaError(f"store {store.path} has no {name} split; extract it with --splits train,val")
    for trial in grid.trials:
        if trial.config.head.stage != 0:
            raise ConfigError(f"trial {trial.index} ({trial.label}): head.stage = {trial.config.head.stage}; heads sweep "
                              "trains stage-0 heads only so far — train later cascade stages with `heads train --stage`")
        head = trial.config.head.name
        level = level_for_head(head)
        for name in ("train", "val"):
            levels = store.split(name).levels
            if level not in levels:
                raise SchemaError(f"trial {trial.index} ({trial.label}): head {head} needs the '{level}' level, the "
                                  f"{name} split of store {store.path} holds {', '.join(levels) or 'none'}; "
                                  f"re-extract with --levels {','.join(sorted({*levels, level}))}")
    if any(t.config.head.name in FROM_DETECTOR for t in grid.trials):
        read_head_weights(store)
    val_ground_truth(store, annotations, grid.evaluator)


def plan_sweep(store: Store, grid: SweepGrid) -> SweepPlan:
    fingerprint = store_fingerprint(store)
    ids = []
    for trial in grid.trials:
        head = train_id(trial.config, fingerprint)
        ids.append(PlannedTrial(trial_id=trial_id(trial.config, head, bins=grid.bins, evaluator=grid.evaluator),
                                train_id=head, values=trial.value_dict(), label=trial.label))
    # Absolute: workers (Ray tasks above all) need not share the driver's working directory.
    cache = store.path if "://" in store.path else str(Path(store.path).resolve())
    return SweepPlan(grid=grid, cache=cache, fingerprint=fingerprint, ids=tuple(ids))


def check_out_dir(out_dir: Path, plan: SweepPlan, *, overwrite: bool) -> Path:
    """``out_dir`` must be new, empty, or a sweep of the same trials on the same store (resumed);
    ``overwrite`` points an existing sweep directory at this grid (its content-addressed heads and
    results are reused where the trials are the same, the others are kept but not reported)."""
    out_dir = check_output(out_dir, kind="dir")
    if not out_dir.exists() or overwrite:
        return out_dir
    if sweep_path(out_dir).is_file():
        existing = read_sweep_record(out_dir)
        if existing.trial_ids != plan.record().trial_ids:
            raise ConfigError(f"--out {out_dir} holds a sweep of another grid or store; pass --overwrite to run this "
                              "grid there (finished trials they share are reused), or choose another directory")
    elif any(out_dir.iterdir()):
        raise ConfigError(f"--out {out_dir} is a non-empty directory that holds no sweep; choose a new directory")
    return out_dir


@dataclass(frozen=True, kw_only=True)
class SweepOutcome:
    """What :func:`run_sweep` did: trials in the grid, found finished, scored now; heads trained now."""

    out_dir: Path
    total: int
    reused: int
    scored: int
    trained: int
    report: Report


def default_jobs(*, tasks: int, shared_bytes: int, eval_bytes: int) -> int:
    """Workers: the cores this process may use, at most one per task, and only as many as the
    free memory holds besides the shared inputs (:data:`WORKER_BYTES` plus one evaluation's
    scratch, ``eval_bytes``, each)."""
    by_memory = (available_memory_bytes() - shared_bytes) // (WORKER_BYTES + eval_bytes)
    return max(1, min(available_cores(), tasks, by_memory))


def _pending(out_dir: Path, plan: SweepPlan) -> tuple[list[int], list[str]]:
    """Indices of the trials without a result, and the train ids among them without a finished head."""
    todo = [i for i, ids in enumerate(plan.ids) if read_result(out_dir, ids.trial_id) is None]
    heads = list(dict.fromkeys(plan.ids[i].train_id for i in todo))
    return todo, [h for h in heads if not head_finished(head_dir(out_dir, h))]


def run_sweep(*, cache: str, grid: SweepGrid, out_dir: Path, jobs: int | None = None, address: str | None = None,
              progress: bool = True, overwrite: bool = False,
              annotations: dict[str, Path] | None = None, workers: str = DEFAULT_WORKERS) -> SweepOutcome:
    """Run every trial of ``grid`` on the store ``cache`` into ``out_dir`` (resuming a previous
    run there) and rebuild its tables. ``jobs``: parallel workers (``None``: :func:`default_jobs`;
    with ``address``, the Ray tasks in flight are bounded by the cluster's CPUs instead).
    ``annotations``: ``{"val": PATH}`` when the val json is not where the store recorded it
    (content-checked; it does not enter any trial's identity). ``workers``: where local jobs run,
    ``threads`` of this process or ``processes`` (:data:`WORKERS`).
    """
    if jobs is not None and jobs < 1:
        raise ConfigError(f"--jobs {jobs}: give 1 or more")
    if workers not in WORKERS:
        raise ConfigError(f"--workers {workers!r}: choose {' or '.join(WORKERS)}")
    store = open_store(cache)
    check_store(store, grid, annotations)
    plan = plan_sweep(store, grid)
    out_dir = check_out_dir(Path(out_dir), plan, overwrite=overwrite).resolve()
    # Ray connects (or fails with its one line) before anything is written.
    backend: Backend | None = RayBackend(address=address, cache=plan.cache, annotations=annotations,
                                                       jobs=jobs) if address else None
    try:
        write_sweep_record(out_dir, plan.record())
        todo, to_train = _pending(out_dir, plan)
        with SweepProgress(total=len(plan.ids), done=len(plan.ids) - len(todo), enabled=progress) as bar:
            if todo and backend is not None:
                _schedule(plan, out_dir, backend, todo, to_train, bar.update)
            elif todo:
                _run_local(store, plan, out_dir, todo, to_train, jobs=jobs, annotations=annotations, workers=workers,
                           event=bar.update)
    finally:
        if backend is not None:
            backend.close()
    return SweepOutcome(out_dir=out_dir, total=len(plan.ids), reused=len(plan.ids) - len(todo), scored=len(todo),
                        trained=len(to_train), report=write_report(out_dir))


def _run_local(store: Store, plan: SweepPlan, out_dir: Path, todo: list[int], to_train: list[str], *,
               jobs: int | None, annotations: dict[str, Path] | None, workers: str,
               event: Callable[[str, bool], None]) -> None:
    """The pending trials ``todo`` on this machine, in two phases that each hold only what they
    read: the heads ``to_train`` with the train inputs (and the val level their monitor reads),
    which are then dropped; then every trial's scoring with the evaluation inputs. The sweep's
    peak memory is then that of one ``heads train`` or one ``heads eval``, not of both at once."""
    trials = plan.grid.trials
    if to_train:
        trial_of = {plan.ids[i].train_id: trials[i] for i in todo}
        heads = [trial_of[h].config.head.name for h in to_train]
        inputs = load_train_inputs(store, tuple(sorted({level_for_head(h) for h in heads})),
                                   with_init=any(h in FROM_DETECTOR for h in heads))
        n = min(jobs or default_jobs(tasks=len(to_train), shared_bytes=inputs.nbytes, eval_bytes=0), len(to_train))
        backend = _backend(n, workers, inputs=inputs, evaluation=None)
        del inputs  # the backend holds them until it closes
        try:
            _train_all(plan, out_dir, backend, todo, to_train, event)
        finally:
            backend.close()
        del backend
        gc.collect()  # the train features go before the evaluation inputs are read
    levels = tuple(sorted({level_for_head(trials[i].config.head.name) for i in todo}))
    evaluation = load_eval_inputs(store, levels=levels, evaluator=plan.grid.evaluator, annotations=annotations)
    n = min(jobs or default_jobs(tasks=len(todo), shared_bytes=evaluation.nbytes, eval_bytes=evaluation.scratch_bytes),
            len(todo))
    backend = _backend(n, workers, inputs=None, evaluation=evaluation)
    try:
        _schedule(plan, out_dir, backend, todo, [], event)
    finally:
        backend.close()


def _backend(n: int, workers: str, *, inputs: TrainInputs | None,
             evaluation: EvalInputs | None) -> ThreadBackend | ProcessBackend:
    """``n`` local workers sharing ``inputs`` / ``evaluation``: threads of this process, or processes."""
    if n == 1 or workers == "threads":
        return ThreadBackend(inputs=inputs, evaluation=evaluation, jobs=n)
    # Shared memory only when other processes read the tensors (moving them there copies them).
    return ProcessBackend(jobs=n, inputs=inputs and inputs.share_memory(),
                          evaluation=evaluation and evaluation.share_memory())


def _train_all(plan: SweepPlan, out_dir: Path, backend: Backend, todo: list[int], to_train: list[str],
               event: Callable[[str, bool], None]) -> None:
    """Train the heads ``to_train`` (each from the first pending trial that names it)."""
    first = {}
    for i in todo:
        first.setdefault(plan.ids[i].train_id, i)
    futures = {backend.train(TrainJob(train_id=h, trial=plan.grid.trials[first[h]], head_dir=head_dir(out_dir, h))): h
               for h in to_train}
    try:
        for future in cf.as_completed(futures):
            future.result()  # a job's error ends the sweep with its message
            event(f"trained head {futures[future]} ({plan.grid.trials[first[futures[future]]].label})", False)
    finally:  # on an error: drop what has not started (the caller closes the backend)
        for future in futures:
            future.cancel()


def _schedule(plan: SweepPlan, out_dir: Path, backend: Backend, todo: list[int], to_train: list[str],
              event: Callable[[str, bool], None]) -> None:
    """Submit the training jobs, then each trial's scoring once its head is finished; write each
    result as it arrives (Ray: each task reads what it needs itself; locally ``to_train`` is empty,
    :func:`_run_local`). ``event(text, trial_finished)`` reports progress."""
    trials = plan.grid.trials
    waiting: dict[str, list[int]] = {}
    for i in todo:
        waiting.setdefault(plan.ids[i].train_id, []).append(i)
    futures: dict[cf.Future, tuple[str, str | int]] = {}
    # Submitted first, so it runs before any trial is scored; each score job waits for its row.
    orig = backend.orig(OrigJob(cache=plan.cache, bins=plan.grid.bins, evaluator=plan.grid.evaluator))

    def score(i: int) -> None:
        ids = plan.ids[i]
        job = ScoreJob(cache=plan.cache, trial=trials[i], trial_id=ids.trial_id, train_id=ids.train_id,
                       head_dir=head_dir(out_dir, ids.train_id), fingerprint=plan.fingerprint,
                       bins=plan.grid.bins, evaluator=plan.grid.evaluator, orig=orig.result())
        futures[backend.score(job)] = ("score", i)

    try:
        for head in to_train:
            first = waiting[head][0]
            futures[backend.train(TrainJob(train_id=head, trial=trials[first], head_dir=head_dir(out_dir, head)))] = \
                ("train", head)
        for head, members in waiting.items():
            if head not in to_train:
                for i in members:
                    score(i)
        while futures:
            done, _ = cf.wait(futures, return_when=cf.FIRST_COMPLETED)
            for future in done:
                kind, key = futures.pop(future)
                value = future.result()  # a job's error ends the sweep with its message
                if kind == "train":
                    event(f"trained head {key} ({trials[waiting[key][0]].label})", False)
                    for i in waiting[key]:
                        score(i)
                else:
                    write_result(out_dir, value)
                    event(f"finished trial {key} ({trials[key].label})", True)
    finally:  # on an error: drop what has not started (the caller closes the backend)
        for future in (orig, *futures):
            future.cancel()


__all__ = ["run_sweep", "plan_sweep", "check_store", "check_out_dir", "default_jobs", "SweepPlan", "SweepOutcome"]

"""Where a sweep's jobs run: one job at a time in the sweep's own process
or on a few of its threads (:class:`ThreadBackend`), a local pool of worker processes sharing the
parent's train and evaluation inputs (:class:`ProcessBackend`) or Ray tasks (:class:`RayBackend`). All hand
out ``concurrent.futures.Future`` objects, so :mod:`heads.sweep.runner` schedules them alike."""

from __future__ import annotations

import concurrent.futures as cf
import importlib
import logging
import os
import socket
import warnings
from pathlib import Path
from typing import Protocol
from urllib.parse import urlsplit

import torch.multiprocessing

from cache_schema.errors import ConfigError
from cache_schema.runtime import available_cores, configure_threads
from heads.evaluation import EvalInputs
from heads.sweep.jobs import (OrigJob, ScoreJob, TrainInputs, TrainJob, init_pool_worker, orig_in_pool, orig_in_ray,
                              orig_job, score_in_pool, score_in_ray, score_job, train_in_pool, train_in_ray, train_job)

#: What a pool worker imports, loaded once by the fork server its workers are forked from: the
#: workers then share those pages (about 400 MiB of private heap per interpreter after importing
#: torch, measured) instead of each importing its own copy.
WORKER_PRELOAD = ("heads.sweep.jobs", "lvis", "pycocotools.mask")


class Backend(Protocol):
    """Where jobs run: ``train`` gives a future of :class:`~heads.sweep.jobs.TrainDone`, ``orig``
    one of the ``orig`` row (``Metrics.to_dict()``), ``score`` one of
    :class:`~heads.sweep.results.TrialResult`; ``close`` frees the workers."""

    def train(self, job: TrainJob) -> cf.Future: ...

    def orig(self, job: OrigJob) -> cf.Future: ...

    def score(self, job: ScoreJob) -> cf.Future: ...

    def close(self) -> None: ...


class ThreadBackend:
    """Jobs on ``jobs`` threads of the sweep's own process: no second interpreter and no copy of
    the inputs (the train and evaluation inputs are held side by side). torch runs its kernels
    without the GIL and every trial draws from its own seeded generators, so trials on
    concurrent threads give the same results as one by one; each thread gets ``cores / jobs``
    torch threads (the setting is process-wide). The caller's thread stays free for the progress
    display and Ctrl-C."""

    def __init__(self, *, inputs: TrainInputs | None, evaluation: EvalInputs | None, jobs: int = 1) -> None:
        self.inputs, self.evaluation = inputs, evaluation
        self._threads = torch.get_num_threads()
        # one job: every core this process may use (ROICACHE_THREADS overrides)
        configure_threads(None if jobs == 1 else max(1, available_cores() // jobs))
        self.pool = cf.ThreadPoolExecutor(max_workers=jobs, thread_name_prefix="sweep-job")

    def train(self, job: TrainJob) -> cf.Future:
        if self.inputs is None:
            raise ValueError("ThreadBackend.train: the sweep has nothing to train (no train inputs were loaded)")
        return self.pool.submit(train_job, job, self.inputs)

    def orig(self, job: OrigJob) -> cf.Future:
        return self.pool.submit(orig_job, job, self._evaluation())

    def score(self, job: ScoreJob) -> cf.Future:
        return self.pool.submit(score_job, job, self._evaluation())

    def _evaluation(self) -> EvalInputs:
        if self.evaluation is None:
            raise ValueError("ThreadBackend: this backend was made for training only (no evaluation inputs)")
        return self.evaluation

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)  # as ProcessBackend: running jobs finish
        torch.set_num_threads(self._threads)


class ProcessBackend:
    """Jobs on a local pool of ``jobs`` worker processes that share the parent's
    :class:`TrainInputs` and :class:`~heads.evaluation.EvalInputs` (both in shared memory:
    ``share_memory()``)."""

    def __init__(self, *, jobs: int, inputs: TrainInputs | None, evaluation: EvalInputs | None) -> None:
        threads = max(1, available_cores() // jobs)
        # forkserver: workers are forked from a clean server process that imported WORKER_PRELOAD
        # once, so they share its imported modules; not plain fork, because a forked child of a
        # process that already ran torch's thread pools (this one) can deadlock. torch's context
        # pickles shared tensors as file descriptors; both records go in one pickle, so a tensor
        # they share (the val features) is sent once.
        context = torch.multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(list(WORKER_PRELOAD))
        self.pool = cf.ProcessPoolExecutor(max_workers=jobs, mp_context=context,
                                           initializer=init_pool_worker, initargs=(inputs, evaluation, threads))

    def train(self, job: TrainJob) -> cf.Future:
        return self.pool.submit(train_in_pool, job)

    def orig(self, job: OrigJob) -> cf.Future:
        return self.pool.submit(orig_in_pool, job)

    def score(self, job: ScoreJob) -> cf.Future:
        return self.pool.submit(score_in_pool, job)

    def close(self) -> None:
        # Running jobs finish (a head's last.pt and finished trials are kept); queued ones are dropped.
        self.pool.shutdown(wait=True, cancel_futures=True)


def _reachable(address: str) -> None:
    """Refuse quickly (3 s) an address nothing listens on; ``ray.init`` would retry for a minute."""
    parts = urlsplit(address if "://" in address else f"tcp://{address}")
    try:
        host, port = parts.hostname, parts.port
    except ValueError:
        host = port = None
    if not host or not port:
        raise ConfigError(f"--address {address!r} is not ray://HOST:PORT, HOST:PORT, auto or local")
    try:
        socket.create_connection((host, port), timeout=3).close()
    except OSError as e:
        raise ConfigError(f"--address {address}: no Ray cluster answers there ({e.strerror or e}); start one with "
                          "`ray start --head` and pass its address, or use --address local") from None


def _connect_hint(address: str) -> str:
    """How to fix a failed connection. A client (``ray://``) that reaches the port but is never
    answered is most often a cluster with token authentication (what ``ray start`` turns on by
    default since Ray 2.59) and a client without it: Ray's client sends the token only in token
    mode, and the server then just times the client out."""
    if address.startswith("ray://") and os.environ.get("RAY_AUTH_MODE", "").lower() != "token":
        return ("if the cluster uses token authentication (`ray start`'s default since Ray 2.59), set "
                "RAY_AUTH_MODE=token here, with its token in ~/.ray/auth_token or RAY_AUTH_TOKEN; else start one "
                "with `ray start --head` and pass its address, or use --address local")
    return "start one with `ray start --head` and pass its address, or use --address local"


class RayBackend:
    """Jobs as Ray tasks (one CPU each) on an existing cluster or a local instance."""

    def __init__(self, *, address: str, cache: str, annotations: dict[str, Path] | None, jobs: int | None) -> None:
        try:
            self.ray = importlib.import_module("ray")
        except ImportError:
            raise ConfigError("--address needs Ray: pip install 'roicache[ray]' (or drop --address to run on local "
                              "processes)") from None
        if address == "local":
            self.ray.init(num_cpus=jobs or available_cores(), include_dashboard=False, log_to_driver=False,
                          logging_level=logging.ERROR)  # the sweep's progress is the display, not Ray's log
        else:
            if address != "auto":
                _reachable(address)
            try:
                with warnings.catch_warnings():  # Ray's own connection warning: the one line below says it
                    warnings.simplefilter("ignore", UserWarning)
                    self.ray.init(address=address, log_to_driver=False, logging_level=logging.ERROR)
            except (ConnectionError, RuntimeError, ValueError) as e:
                first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise ConfigError(f"--address {address}: cannot connect to a Ray cluster ({first}); "
                                  f"{_connect_hint(address)}") from None
        self.cache, self.annotations = cache, annotations
        self._train = self.ray.remote(num_cpus=1)(train_in_ray)
        self._orig = self.ray.remote(num_cpus=1)(orig_in_ray)
        self._score = self.ray.remote(num_cpus=1)(score_in_ray)

    def train(self, job: TrainJob) -> cf.Future:
        return self._unwrapped(self._train.remote(job, self.cache, 1).future())

    def orig(self, job: OrigJob) -> cf.Future:
        return self._unwrapped(self._orig.remote(job, self.annotations, 1).future())

    def score(self, job: ScoreJob) -> cf.Future:
        return self._unwrapped(self._score.remote(job, self.annotations, 1).future())

    def _unwrapped(self, future: cf.Future) -> cf.Future:
        """``future`` with a task's error as the task raised it: Ray wraps it in a RayTaskError
        whose message carries the remote traceback, not the one line a user error should give."""
        out: cf.Future = cf.Future()

        def copy(done: cf.Future) -> None:
            if not out.set_running_or_notify_cancel():  # the sweep dropped it (another job failed)
                return
            error = done.exception()
            if error is None:
                out.set_result(done.result())
            else:
                cause = getattr(error, "cause", None) if isinstance(error, self.ray.exceptions.RayTaskError) else None
                out.set_exception(cause if isinstance(cause, BaseException) else error)

        future.add_done_callback(copy)
        return out

    def close(self) -> None:
        self.ray.shutdown()


__all__ = ["Backend", "ProcessBackend", "RayBackend", "ThreadBackend"]

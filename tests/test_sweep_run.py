"""``heads sweep`` on the tiny real store (issue 12): trials equal direct evaluation, one head per
training config, reruns train nothing, a killed sweep resumes, ``--jobs 2`` and Ray give the same
rows, the ``orig`` row is scored once per run, nothing half-written is reported.

Every sweep here is real (``train_head``, cached evaluation; ``--jobs 1`` runs the jobs on a
thread of this process, ``--jobs 2`` on forked worker processes); heads train 20 steps.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from heads.cli import app
from heads.combine import Combination
from heads.pipeline import evaluate_from_store
from heads.sweep.backends import ThreadBackend
from heads.sweep.grid import load_grid
from heads.sweep.results import read_sweep_record, result_path
from heads.sweep.runner import run_sweep
from heads.sweep.tables import write_report

GRID = """
[base.schedule]
max_steps = 20
milestones = [15]

[[axis]]
field = "sampler.name"
values = ["bilevel", "random"]

[[axis]]
field = "combine.T"
values = [10, 300]
"""


def results_of(out: Path) -> dict[str, dict]:
    """trial id -> result json, for the trials ``sweep.json`` lists."""
    return {t: json.loads(result_path(out, t).read_text()) for t in read_sweep_record(out).trial_ids}


def table_without_times(out: Path) -> list[dict]:
    with open(out / "table.csv") as f:
        return [{k: v for k, v in row.items() if k != "train_seconds"} for row in csv.DictReader(f)]


def mtimes(out: Path) -> dict[str, int]:
    return {str(p): p.stat().st_mtime_ns for sub in ("heads", "results") for p in (out / sub).rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def grid_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("sweep_grid") / "grid.toml"
    path.write_text(GRID)
    return path


@pytest.fixture(scope="module")
def swept(tiny_store, grid_file, tmp_path_factory):
    """The 2x2 grid swept with one worker, uninterrupted."""
    out = tmp_path_factory.mktemp("sweep") / "out"
    return run_sweep(cache=str(tiny_store), grid=load_grid(grid_file), out_dir=out, jobs=1, progress=False)


def test_2x2_grid_rows_equal_direct_evaluation_of_the_same_heads(swept, tiny_store):
    out = swept.out_dir
    results = results_of(out)
    assert (swept.total, swept.scored, swept.reused) == (4, 4, 0) and len(results) == 4
    for r in results.values():
        head = out / "heads" / r["train_id"]
        combine = r["config"]["combine"]
        direct = evaluate_from_store(cache=str(tiny_store), head=head, out_dir=None, progress=False,
                                     combinations=Combination.from_dict(combine).per_rule(("orig", r["rule"])))
        assert r["rows"] == {rule: m.to_dict() for rule, m in direct.rows.items()}
    table = table_without_times(out)
    assert [(row["sampler.name"], row["combine.T"], row["rule"]) for row in table] == [
        ("", "", "orig"), ("bilevel", "10", "sel"), ("bilevel", "300", "sel"), ("random", "10", "sel"),
        ("random", "300", "sel")]
    for row, trial in zip(table[1:], read_sweep_record(out).trials):
        ap = results[trial.trial_id]["rows"]["sel"]["segm"]["summary"]["AP"]
        assert row["trials"] == trial.trial_id and row["n_seeds"] == "1"
        assert float(row["AP median"]) == pytest.approx(100 * ap, abs=5e-4)
    assert "| sampler.name | combine.T | rule | n | AP |" in (out / "table.md").read_text()


def test_post_training_axis_trains_one_head_per_training_config(swept):
    results = results_of(swept.out_dir)
    heads = sorted(p.name for p in (swept.out_dir / "heads").iterdir())
    assert swept.trained == 2 and heads == sorted({r["train_id"] for r in results.values()})
    by_sampler = {}
    for r in results.values():
        by_sampler.setdefault(r["values"]["sampler.name"], set()).add(r["train_id"])
    assert all(len(ids) == 1 for ids in by_sampler.values()) and len(by_sampler) == 2


def test_rerun_of_a_finished_sweep_trains_and_scores_nothing(swept, tiny_store, grid_file):
    before = mtimes(swept.out_dir)
    again = run_sweep(cache=str(tiny_store), grid=load_grid(grid_file), out_dir=swept.out_dir, jobs=1, progress=False)
    assert (again.trained, again.scored, again.reused) == (0, 0, 4)
    assert mtimes(swept.out_dir) == before


def test_another_grid_in_the_same_directory_needs_overwrite(swept, tiny_store, tmp_path):
    other = tmp_path / "other.toml"
    other.write_text(GRID.replace("[10, 300]", "[10]"))
    result = CliRunner().invoke(app, ["sweep", "--cache", str(tiny_store), "--grid", str(other), "--out",
                                      str(swept.out_dir), "--quiet"])
    assert result.exit_code == 2 and "another grid" in result.stderr and "--overwrite" in result.stderr


@pytest.mark.parametrize("workers", ["processes", "threads"])
def test_jobs_2_gives_the_same_rows_as_jobs_1(workers, swept, tiny_store, grid_file, tmp_path):
    """Two jobs at once — in worker processes or on two threads of the sweep's process — give
    exactly the rows of one job at a time (every trial draws from its own generators)."""
    two = run_sweep(cache=str(tiny_store), grid=load_grid(grid_file), out_dir=tmp_path / "two", jobs=2, progress=False,
                    workers=workers)
    one, other = results_of(swept.out_dir), results_of(two.out_dir)
    assert one.keys() == other.keys()
    assert all(one[t]["rows"] == other[t]["rows"] for t in one)
    assert table_without_times(two.out_dir) == table_without_times(swept.out_dir)


class CountingBackend(ThreadBackend):
    """The sweep's own ``--jobs 1`` backend, counting the jobs by kind."""

    def __init__(self, *, inputs, evaluation, jobs=1) -> None:
        super().__init__(inputs=inputs, evaluation=evaluation, jobs=jobs)
        self.calls = {"train": 0, "orig": 0, "score": 0}

    def train(self, job):
        self.calls["train"] += 1
        return super().train(job)

    def orig(self, job):
        self.calls["orig"] += 1
        return super().orig(job)

    def score(self, job):
        self.calls["score"] += 1
        return super().score(job)


def test_orig_is_scored_once_per_run_and_every_trial_gets_the_same_rows(swept, tiny_store, grid_file, tmp_path,
                                                                          monkeypatch):
    import heads.sweep.runner as runner

    made = []
    monkeypatch.setattr(runner, "ThreadBackend", lambda **kw: made.append(CountingBackend(**kw)) or made[-1])
    inline = run_sweep(cache=str(tiny_store), grid=load_grid(grid_file), out_dir=tmp_path / "inline", jobs=1,
                       progress=False)
    # two phases: the heads trained by one backend, then every trial scored by another
    assert [b.calls for b in made] == [{"train": 2, "orig": 0, "score": 0}, {"train": 0, "orig": 1, "score": 4}]
    one, other = results_of(swept.out_dir), results_of(inline.out_dir)
    assert one.keys() == other.keys() and all(one[t]["rows"] == other[t]["rows"] for t in one)
    assert len({json.dumps(r["rows"]["orig"], sort_keys=True) for r in other.values()}) == 1


def test_killed_sweep_resumes_and_ends_with_the_same_table(swept, tiny_store, grid_file, tmp_path):
    out = tmp_path / "killed"
    cmd = [sys.executable, "-c", "from heads.cli import main; main()", "sweep", "--cache", str(tiny_store),
           "--grid", str(grid_file), "--out", str(out), "--jobs", "1", "--quiet"]
    proc = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 240
        while not list((out / "results").glob("*.json")) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert proc.poll() is None, proc.stderr.read().decode()
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the sweep and its workers: a hard kill mid-way
        proc.wait()
    assert 1 <= len(list((out / "results").glob("*.json"))) < 4
    resumed = run_sweep(cache=str(tiny_store), grid=load_grid(grid_file), out_dir=out, jobs=1, progress=False)
    assert resumed.reused >= 1 and resumed.scored == 4 - resumed.reused
    assert table_without_times(out) == table_without_times(swept.out_dir)


def test_half_written_results_are_never_reported_and_are_redone(swept, tiny_store, grid_file, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(swept.out_dir, out)
    first, second = read_sweep_record(out).trial_ids[:2]
    path = result_path(out, first)
    path.with_name(path.name + ".tmp").write_text(path.read_text()[:100])  # a write cut short
    result_path(out, second).write_text(result_path(out, second).read_text()[:100])  # a damaged file
    report = write_report(out)
    assert (report.finished, report.total) == (3, 4)
    assert second not in (out / "table.csv").read_text() and first in (out / "table.csv").read_text()
    again = run_sweep(cache=str(tiny_store), grid=load_grid(grid_file), out_dir=out, jobs=1, progress=False)
    assert (again.trained, again.scored) == (0, 1)
    assert table_without_times(out) == table_without_times(swept.out_dir)


def test_report_command_rebuilds_the_tables(swept, tmp_path):
    (swept.out_dir / "table.csv").unlink()
    result = CliRunner().invoke(app, ["sweep", "report", str(swept.out_dir)])
    assert result.exit_code == 0, result.output
    assert (swept.out_dir / "table.csv").is_file() and "4 of 4 trials finished" in result.stdout
    bad = CliRunner().invoke(app, ["sweep", "report", str(tmp_path)])
    assert bad.exit_code == 2 and "not a sweep directory" in bad.stderr


def test_sweep_writes_one_tensorboard_run_per_trial_with_its_curves_and_ap(swept):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    runs = sorted(p for p in (swept.out_dir / "tensorboard").iterdir() if p.is_dir())
    results = results_of(swept.out_dir)
    assert len(runs) == len(results) == 4
    for run in runs:
        trial = next(r for t, r in results.items() if run.name.endswith(t[:8]))
        acc = EventAccumulator(str(run))
        acc.Reload()
        log = [json.loads(line) for line in (swept.out_dir / "heads" / trial["train_id"] / "log.jsonl").read_text().splitlines()]
        losses = [(r["step"], r["loss"]) for r in log if "loss" in r]
        assert [(e.step, pytest.approx(e.value, rel=1e-6)) for e in acc.Scalars("train/loss")] == losses
        metrics = trial["rows"][trial["rule"]]
        ap = (metrics.get("segm") or metrics["bbox"])["summary"]["AP"]
        assert acc.Scalars("eval/AP")[-1].value == pytest.approx(100 * ap, rel=1e-6)


@pytest.mark.slow
def test_ray_local_gives_the_same_rows(swept, tiny_store, grid_file, tmp_path):
    pytest.importorskip("ray")
    ray_run = run_sweep(cache=str(tiny_store), grid=load_grid(grid_file), out_dir=tmp_path / "ray", jobs=2,
                        address="local", progress=False)
    one, other = results_of(swept.out_dir), results_of(ray_run.out_dir)
    assert one.keys() == other.keys() and all(one[t]["rows"] == other[t]["rows"] for t in one)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_ray_client_address_gives_the_same_rows(swept, tiny_store, grid_file, tmp_path):
    """A real Ray cluster started apart (``ray start --head``, token authentication on as Ray
    2.59+ does by default) and reached in client mode (``heads sweep --address ray://HOST:PORT``):
    without RAY_AUTH_MODE=token the client is refused in one line saying so; with it, the same
    rows as the local pool."""
    pytest.importorskip("ray")
    ray_cli = Path(sys.executable).with_name("ray")
    gcs, client = _free_port(), _free_port()
    token = "roicache-test-token-0123456789abcdef"
    # A user's shell: none of the RAY_* variables an in-process ray.init (an earlier test) exports.
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("RAY_")}, "RAY_USAGE_STATS_ENABLED": "0",
           "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token}
    # Short: Ray's unix sockets live under it, and a socket path is limited to 107 bytes.
    ray_tmp = tempfile.mkdtemp(prefix="ray", dir="/tmp")
    started = subprocess.run([str(ray_cli), "start", "--head", f"--port={gcs}", f"--ray-client-server-port={client}",
                              "--num-cpus=2", "--include-dashboard=false", f"--temp-dir={ray_tmp}"],
                             env=env, capture_output=True, text=True, timeout=180)
    sweep = [sys.executable, "-c", "from heads.cli import main; main()", "sweep", "--cache", str(tiny_store),
             "--grid", str(grid_file), "--address", f"ray://127.0.0.1:{client}", "--quiet"]
    try:
        assert started.returncode == 0, started.stderr[-2000:]
        plain = {k: v for k, v in env.items() if k not in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN")}
        refused = subprocess.run([*sweep, "--out", str(tmp_path / "refused")], env=plain, capture_output=True,
                                 text=True, timeout=300)
        ran = subprocess.run([*sweep, "--out", str(tmp_path / "client")], env=env, capture_output=True, text=True,
                             timeout=600)
    finally:
        subprocess.run([str(ray_cli), "stop", "--force"], env=env, capture_output=True, timeout=120)
        shutil.rmtree(ray_tmp, ignore_errors=True)
    lines = refused.stderr.strip().splitlines()
    assert refused.returncode == 2 and len(lines) == 1 and "RAY_AUTH_MODE=token" in lines[0], refused.stderr[-2000:]
    assert not (tmp_path / "refused").exists()
    assert ran.returncode == 0, ran.stderr[-2000:]
    one, other = results_of(swept.out_dir), results_of(tmp_path / "client")
    assert one.keys() == other.keys() and all(one[t]["rows"] == other[t]["rows"] for t in one)


def test_dynamics_are_the_calibrated_heads_once_per_head(tiny_store, tmp_path):
    """Snapshots (eval.snapshots) give calibration dynamics with cal-only (SimCal Fig. 4a), computed
    once per head and shared by its trials; the last point equals the finished head's cal-only row."""
    grid = tmp_path / "grid.toml"
    grid.write_text("[base.schedule]\nmax_steps = 20\nmilestones = [15]\n[base.eval]\nsnapshots = [10, 20]\n\n"
                    "[[axis]]\nfield = \"combine.T\"\nvalues = [0, 300]\n")
    out = run_sweep(cache=str(tiny_store), grid=load_grid(grid), out_dir=tmp_path / "out", jobs=1, progress=False).out_dir
    results = list(results_of(out).values())
    assert len({r["train_id"] for r in results}) == 1
    dynamics = [r["diagnostics"]["dynamics"] for r in results]
    assert dynamics[0] == dynamics[1] and [p["step"] for p in dynamics[0]] == [10, 20]
    assert all(list(p["rows"]) == ["cal-only"] for p in dynamics[0])
    direct = evaluate_from_store(cache=str(tiny_store), head=out / "heads" / results[0]["train_id"],
                                 combinations=(Combination(rule="cal-only"),), out_dir=None, progress=False)
    assert dynamics[0][-1]["rows"]["cal-only"] == json.loads(json.dumps(direct.rows["cal-only"].to_dict()))
    assert (out / "heads" / results[0]["train_id"] / "diagnostics.json").is_file()

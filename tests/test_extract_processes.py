"""Real ``extract`` processes: two concurrent shards, and a SIGKILLed run resumed, equal one clean run.

The reference is the session's ``tiny_store`` (one in-process extraction, batch size 4, 1 thread);
the processes here run the installed ``extract`` console script with the same settings.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import zarr
from typer.testing import CliRunner

from cache_schema import meta_differences, open_store, validate_store
from cache_schema.errors import SchemaError
from extract.cli import app as extract_app
from extract.sharding import Shard, batch_groups
from tests.pipeline_fixtures import TINY_DATA, TINY_EXTRACT

EXTRACT = str(Path(sys.executable).with_name("extract"))
# The settings of tests.pipeline_fixtures.TINY_EXTRACT, spelled as the command line takes them.
SAME_SETTINGS = ["--levels", "pooled,fc", "--rois-per-image", str(TINY_EXTRACT.rois_per_image),
                 "--batch-size", str(TINY_EXTRACT.batch_size), "--block-images", str(TINY_EXTRACT.block_images),
                 "--device", "cpu", "--threads", "1", "--quiet"]
BLOCK = TINY_EXTRACT.block_images
PROCESS_TIMEOUT_S = 120
SPLIT_SIZES = (TINY_DATA.train_images, TINY_DATA.val_images)
N_IMAGES = sum(SPLIT_SIZES)


def _command(ckpt: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return [EXTRACT, "--ckpt", str(ckpt), "--data", str(data), "--out", str(out), *SAME_SETTINGS, *extra]


def _env() -> dict[str, str]:
    # One thread per child: the box has 2 shared cores, and --threads 1 is what the reference used.
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def _all_arrays(path: Path) -> dict[str, np.ndarray]:
    """Every array of the store (tables, marks, RoIs, features, classes, detector head) by path."""
    root = zarr.open_group(str(path), mode="r")
    return {name: np.asarray(node[...]) for name, node in root.members(max_depth=None) if isinstance(node, zarr.Array)}


def _assert_same_store(path: Path, reference: Path) -> None:
    got, want = _all_arrays(path), _all_arrays(reference)
    assert sorted(got) == sorted(want)
    assert len(want) > 40  # 2 splits x (~20 arrays) + classes + detector head
    for key in want:
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)
        assert got[key].dtype == want[key].dtype, key
    a, b = open_store(path), open_store(reference)
    assert a.is_complete and b.is_complete
    assert meta_differences(a.meta, b.meta) == []
    for name in b.splits:
        assert dict(a.split(name).group.attrs) == dict(b.split(name).group.attrs)


@pytest.mark.slow  # two fresh interpreters on 2 shared cores: 10 s idle, 25 s measured under load
def test_two_concurrent_shard_processes_equal_one_process(tiny_ckpt, tiny_data, tiny_store, tmp_path):
    out = tmp_path / "sharded.zarr"
    # Shard 1 starts first: it must wait for shard 0 to create the store, not fail or create one.
    procs = [subprocess.Popen(_command(tiny_ckpt, tiny_data, out, "--shard", f"{i}/2"), env=_env(),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in (1, 0)]
    logs = [p.communicate(timeout=PROCESS_TIMEOUT_S)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], logs
    # Each shard wrote exactly its own commit blocks (block b -> shard b % 2).
    for log, index in zip(logs, (1, 0)):
        mine = sum(len(g) for n in SPLIT_SIZES
                   for g in batch_groups(n, TINY_EXTRACT.batch_size, Shard(index=index, count=2), block=BLOCK))
        assert 0 < mine < N_IMAGES
        assert re.search(rf"wrote {mine} images", log), log
    # Whichever shard finished last saw every image done and marked the store complete.
    assert sum("store complete" in " ".join(log.split()) for log in logs) >= 1
    _assert_same_store(out, tiny_store)
    assert validate_store(out).ok


def _wait_for_done(out: Path, proc: subprocess.Popen, images: int) -> None:
    """Poll the store until the running extraction has finished ``images`` train images."""
    deadline = time.monotonic() + PROCESS_TIMEOUT_S
    while time.monotonic() < deadline:
        assert proc.poll() is None, "extraction ended before it could be killed"
        try:
            if open_store(out).split("train").done().sum() >= images:
                return
        except (SchemaError, ValueError, OSError):
            pass  # not created, not initialized, or its metadata is being written right now
        time.sleep(0.01)
    raise AssertionError("no image finished in time")


def test_sigkill_midway_then_resume_equals_an_uninterrupted_run(tiny_ckpt, tiny_data, tiny_store, tmp_path):
    out = tmp_path / "killed.zarr"
    proc = subprocess.Popen(_command(tiny_ckpt, tiny_data, out), env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        # Past the first commit block: the resumed run must keep finished blocks and redo the rest.
        _wait_for_done(out, proc, BLOCK)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=PROCESS_TIMEOUT_S)
    assert proc.returncode == -signal.SIGKILL

    killed = open_store(out)
    assert not killed.is_complete
    done = {name: killed.split(name).done() for name in killed.splits}
    finished = sum(int(d.sum()) for d in done.values())
    assert 0 < finished < N_IMAGES
    report = validate_store(out)
    assert not report.ok and sum(report.incomplete.values()) == N_IMAGES - finished
    # --resume re-runs every commit block that still holds an unfinished image, whole.
    rerun = sum(len(g) for d in done.values() for g in batch_groups(len(d), TINY_EXTRACT.batch_size, Shard(), block=BLOCK)
                if not d[g[0] // BLOCK * BLOCK:(g[0] // BLOCK + 1) * BLOCK].all())
    assert N_IMAGES - finished <= rerun < N_IMAGES

    result = CliRunner().invoke(extract_app, ["--ckpt", str(tiny_ckpt), "--data", str(tiny_data), "--out", str(out),
                                              "--resume", *SAME_SETTINGS])
    assert result.exit_code == 0, result.output
    assert re.search(rf"wrote {rerun} images", result.output), result.output
    _assert_same_store(out, tiny_store)
    assert validate_store(out).ok


@pytest.mark.slow  # several fresh interpreters, each killed: ~30-60 s on 2 shared cores
def test_sigkill_at_random_points_then_resume_equals_an_uninterrupted_run(tiny_ckpt, tiny_data, tiny_store, tmp_path):
    """Kill -9 at seeded random moments (creation, mid-block, between blocks), resume each time,
    until a run completes: the store equals the uninterrupted one."""
    out = tmp_path / "killed.zarr"
    rng = np.random.default_rng(13)
    kills = 0
    for attempt in range(12):
        resume = ["--resume"] if (out / "zarr.json").exists() and _initialized(out) else ["--overwrite"] * out.exists()
        proc = subprocess.Popen(_command(tiny_ckpt, tiny_data, out, *resume), env=_env(),
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            # Start-up alone is ~3 s and a whole run ~5-20 s on a busy machine; later attempts wait
            # longer, so the loop
            # ends, and kills land at creation, mid-block and between blocks.
            proc.wait(timeout=float(rng.uniform(1.0, 5.0)) + 3 * attempt)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=PROCESS_TIMEOUT_S)
            kills += 1
            continue
        assert proc.returncode == 0, proc.stderr.read()
        break
    else:
        raise AssertionError("extraction never completed between kills")
    assert kills >= 1, "no kill landed: lengthen the run or shorten the waits"
    _assert_same_store(out, tiny_store)
    assert validate_store(out).ok


def _initialized(out: Path) -> bool:
    try:
        open_store(out)
        return True
    except (SchemaError, ValueError, OSError):
        return False

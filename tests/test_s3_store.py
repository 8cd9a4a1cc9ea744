"""Stores on object storage (issue 13 item 4): every command against a real S3 server.

The server is moto in server mode (``tests/s3_fixtures.py``); every store here lives at
``s3://<bucket>/store.zarr`` and is read and written over HTTP by s3fs through zarr, in this
process (typer's ``CliRunner``) or in real subprocesses. References are the session's local
``tiny_store`` (``tests/conftest.py``). Comparisons are of data (every array, every loaded level,
trained weights, metrics), never of chunk or object layout, which may change.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from typer.testing import CliRunner

from cache_schema import meta_differences, open_store, validate_store
from cache_schema.errors import RoicacheError
from extract.cli import app as extract_app
from heads.cli import app as heads_app
from heads.models import load_head
from serve.umbrella import app as roicache_app
from tests.pipeline_fixtures import TINY_EXTRACT
from cache_schema.object_store import object_store_error
from tests.s3_fixtures import S3, free_port, moto_endpoint, s3, s3_module  # noqa: F401 - fixtures

EXTRACT = str(Path(sys.executable).with_name("extract"))
ROICACHE = str(Path(sys.executable).with_name("roicache"))
# tests.pipeline_fixtures.TINY_EXTRACT as extract's command line spells it.
SETTINGS = ["--levels", ",".join(TINY_EXTRACT.levels), "--rois-per-image", str(TINY_EXTRACT.rois_per_image),
            "--batch-size", str(TINY_EXTRACT.batch_size), "--block-images", str(TINY_EXTRACT.block_images),
            "--device", "cpu", "--threads", "1", "--quiet"]
TRAIN = ["--steps", "12", "--milestones", "8", "--seed", "4", "--threads", "1", "--quiet"]
PROCESS_TIMEOUT_S = 180


def invoke(app, *args):
    return CliRunner().invoke(app, [str(a) for a in args])


def extract_args(ckpt: Path, data: Path, out: str) -> list[str]:
    return ["--ckpt", str(ckpt), "--data", str(data), "--out", out, *SETTINGS]


def all_arrays(location: str | Path) -> dict[str, np.ndarray]:
    """Every array of a store by path (tables, marks, RoIs, features, classes, detector head)."""
    root = zarr.open_group(str(location), mode="r")
    return {name: np.asarray(node[...]) for name, node in root.members(max_depth=None) if isinstance(node, zarr.Array)}


def drop_layout(attrs) -> dict:
    """A split's attributes without those that only say how rows are grouped into objects
    (extraction may pick another grouping, e.g. per shard count, for the same data)."""
    return {k: v for k, v in dict(attrs).items() if k != "image_block"}


def assert_same_store(location: str, reference: Path) -> None:
    """Same arrays (values and dtypes), same split attributes, same metadata (paths and creation
    time aside), both complete, and the readers load equal RoIs for every split and level."""
    got, want = all_arrays(location), all_arrays(reference)
    assert sorted(got) == sorted(want) and len(want) > 40
    for key in want:
        assert got[key].dtype == want[key].dtype, key
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)
    a, b = open_store(location), open_store(reference)
    assert a.is_complete and b.is_complete
    assert meta_differences(a.meta, b.meta) == []
    for name in b.splits:
        sa, sb = a.split(name), b.split(name)
        assert drop_layout(sa.group.attrs) == drop_layout(sb.group.attrs)
        for level in sb.levels:
            ra, rb = sa.load(level=level), sb.load(level=level)
            for f in dataclasses.fields(rb):
                x, y = getattr(ra, f.name), getattr(rb, f.name)
                if isinstance(y, torch.Tensor):
                    assert torch.equal(x, y), (name, level, f.name)


def error_line(result, code: int = 2, prefix: str = "error: ") -> str:
    """The one line a failed command printed on stderr (no traceback), after checking its exit."""
    assert result.exit_code == code, (result.exit_code, result.output, result.exception)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(prefix), result.stderr
    return lines[0]


def weights(run: Path) -> dict[str, torch.Tensor]:
    head, _, _ = load_head(run / "head.pt")
    return head.state_dict()


def log_without_times(run: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k != "seconds"}
            for line in (run / "log.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def s3_copy(s3_module: S3, tiny_store) -> str:
    """``tiny_store`` uploaded byte for byte: the same store behind a URL (same metadata, so sweeps
    give it the same trial ids)."""
    url = f"s3://{s3_module.bucket('copy')}/store.zarr"
    s3_module.fs().put(str(tiny_store), url.removeprefix("s3://"), recursive=True)
    local = sorted(p.relative_to(tiny_store).as_posix() for p in tiny_store.rglob("*") if p.is_file())
    assert s3_module.keys(url) == local
    return url


# ----------------------------------------------------------------------------- extract


def test_extract_into_s3_equals_a_local_extraction(s3: S3, tiny_ckpt, tiny_data, tiny_store):
    url = f"s3://{s3.bucket()}/store.zarr"
    result = invoke(extract_app, *extract_args(tiny_ckpt, tiny_data, url))
    assert result.exit_code == 0, result.output
    assert "store complete" in " ".join(result.stdout.split())
    keys = s3.keys(url)
    assert "zarr.json" in keys and any(k.startswith("train/feat/fc/c/") for k in keys)  # really on the server
    assert_same_store(url, tiny_store)


@pytest.mark.slow  # two fresh interpreters extracting over HTTP on 2 shared cores
def test_two_shard_processes_write_one_s3_store(s3: S3, tiny_ckpt, tiny_data, tiny_store):
    url = f"s3://{s3.bucket()}/store.zarr"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}  # the moto endpoint and keys included
    # Shard 1 starts first: it must wait for shard 0 to create the store on S3.
    procs = [subprocess.Popen([EXTRACT, *extract_args(tiny_ckpt, tiny_data, url), "--shard", f"{i}/2"], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in (1, 0)]
    logs = [p.communicate(timeout=PROCESS_TIMEOUT_S)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], logs
    assert sum("store complete" in " ".join(log.split()) for log in logs) >= 1, logs
    assert_same_store(url, tiny_store)


@pytest.mark.slow  # several fresh interpreters, each killed, extracting over HTTP: ~60 s
def test_sigkill_at_random_points_into_s3_then_resume_equals_an_uninterrupted_run(s3: S3, tiny_ckpt, tiny_data,
                                                                                 tiny_store):
    """Kill -9 at seeded random moments while extracting into S3, resume each time: the store
    equals the uninterrupted one (an S3 PUT is atomic, the done marks of a block go last)."""
    url = f"s3://{s3.bucket()}/store.zarr"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    rng = np.random.default_rng(17)
    kills = 0
    for attempt in range(12):
        try:
            open_store(url)
            again = ["--resume"]
        except RoicacheError:
            again = ["--overwrite"] if s3.keys(url) else []  # killed while creating it
        proc = subprocess.Popen([EXTRACT, *extract_args(tiny_ckpt, tiny_data, url), *again], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            proc.wait(timeout=float(rng.uniform(2.0, 6.0)) + 2 * attempt)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=PROCESS_TIMEOUT_S)
            kills += 1
            continue
        assert proc.returncode == 0, proc.stderr.read()
        break
    else:
        raise AssertionError("extraction into S3 never completed between kills")
    assert kills >= 1, "no kill landed: lengthen the run or shorten the waits"
    assert_same_store(url, tiny_store)
    assert validate_store(url).ok


def test_extract_refuses_a_prefix_holding_other_objects(s3: S3, tiny_ckpt, tiny_data):
    """zarr would clear the prefix when creating the store; someone's objects there are kept."""
    bucket = s3.bucket()
    s3.fs().pipe(f"{bucket}/store.zarr/notes.txt", b"keep me")
    line = error_line(invoke(extract_app, *extract_args(tiny_ckpt, tiny_data, f"s3://{bucket}/store.zarr")))
    assert "exists and is not a roicache store" in line
    assert s3.keys(f"s3://{bucket}/store.zarr") == ["notes.txt"]


# ----------------------------------------------------------------------------- heads


@pytest.fixture(scope="module")
def heads_runs(s3_copy, tiny_store, tmp_path_factory) -> dict[str, Path]:
    """The same head trained streaming from the S3 copy and from the local store."""
    root = tmp_path_factory.mktemp("s3_heads")
    runs = {}
    for name, cache in (("s3", s3_copy), ("local", tiny_store)):
        runs[name] = root / name
        result = invoke(heads_app, "train", "--cache", cache, "--out", runs[name], "--stream", "always", "--no-eval", *TRAIN)
        assert result.exit_code == 0, result.output
    return runs


def test_heads_train_streaming_from_s3_equals_local(heads_runs):
    a, b = weights(heads_runs["s3"]), weights(heads_runs["local"])
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert log_without_times(heads_runs["s3"]) == log_without_times(heads_runs["local"])
    assert json.loads((heads_runs["s3"] / "metrics.json").read_text())["steps"] == 12


def test_heads_eval_on_s3_equals_local(heads_runs, s3_copy, tiny_store, tmp_path):
    outs = {name: tmp_path / name for name in ("s3", "local")}
    for name, cache in (("s3", s3_copy), ("local", tiny_store)):
        result = invoke(heads_app, "eval", "--cache", cache, "--head", heads_runs["local"], "--combine", "orig,cal-only,sel",
                        "--out", outs[name], "--quiet")
        assert result.exit_code == 0, result.output
    rows = {name: json.loads((out / "eval_summary.json").read_text())["rows"] for name, out in outs.items()}
    assert list(rows["s3"]) == ["orig", "cal-only", "sel"] and rows["s3"] == rows["local"]
    assert rows["s3"]["orig"]["segm"]["num_detections"] > 0
    for rule in rows["s3"]:
        assert (outs["s3"] / f"results_{rule}.json").read_text() == (outs["local"] / f"results_{rule}.json").read_text()


GRID = """[base.schedule]
max_steps = 10
milestones = [8]

[[axis]]
field = "combine.T"
values = [10, 300]
"""


def sweep_results(out: Path) -> dict[str, dict]:
    """trial id -> the result json without its timings."""
    drop = ("train_seconds", "steps_per_second")
    return {p.stem: {k: v for k, v in json.loads(p.read_text()).items() if k not in drop}
            for p in (out / "results").glob("*.json")}


def test_heads_sweep_on_s3_equals_local(s3_copy, tiny_store, tmp_path):
    grid = tmp_path / "grid.toml"
    grid.write_text(GRID)
    outs = {"s3": tmp_path / "s3", "local": tmp_path / "local"}
    for name, cache in (("s3", s3_copy), ("local", tiny_store)):
        result = invoke(heads_app, "sweep", "--cache", cache, "--grid", grid, "--out", outs[name], "--jobs", "1", "--quiet")
        assert result.exit_code == 0, result.output
    got, want = sweep_results(outs["s3"]), sweep_results(outs["local"])
    assert len(want) == 2 and got == want  # same trial ids (same store), same rows
    assert all(r["rows"]["sel"]["segm"]["num_detections"] > 0 for r in got.values())


# ----------------------------------------------------------------------------- validate


def test_validate_finds_a_deleted_and_a_truncated_object_on_s3(s3: S3, s3_copy):
    bucket = s3.bucket()
    url = f"s3://{bucket}/store.zarr"
    fs = s3.fs()
    fs.copy(s3_copy.removeprefix("s3://"), f"{bucket}/store.zarr", recursive=True)
    assert s3.keys(url) == s3.keys(s3_copy)
    ok = invoke(roicache_app, "cache", "validate", url)
    assert ok.exit_code == 0 and ": ok" in ok.stdout, ok.output

    # One object of finished images' fc features gone: zarr would read zeros; validate lists the keys.
    victim = next(k for k in s3.keys(url) if k.startswith("train/feat/fc/c/"))
    kept = fs.cat(f"{bucket}/store.zarr/{victim}")
    fs.rm(f"{bucket}/store.zarr/{victim}")
    line = error_line(invoke(roicache_app, "cache", "validate", url), code=1, prefix="problem: ")
    assert line.startswith("problem: train/feat/fc: ") and "missing" in line and "--resume" in line

    # Put back, validate is clean again (nothing cached the deletion; listing alone shows it) ...
    fs.pipe(f"{bucket}/store.zarr/{victim}", kept)
    assert invoke(roicache_app, "cache", "validate", url, "--shallow").exit_code == 0
    # ... then a truncated object of the proposal boxes, this time through the console script.
    victim = next(k for k in s3.keys(url) if k.startswith("train/rois/boxes/c/"))
    fs.pipe(f"{bucket}/store.zarr/{victim}", fs.cat(f"{bucket}/store.zarr/{victim}")[:-7])
    proc = subprocess.run([ROICACHE, "cache", "validate", url], capture_output=True, text=True, timeout=PROCESS_TIMEOUT_S)
    assert proc.returncode == 1, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("problem: train/rois/boxes: ") and "corrupt or truncated" in lines[0]


# ----------------------------------------------------------------------------- bad input

CASES = {
    "no-credentials": ("no usable credentials", "AWS_ACCESS_KEY_ID"),
    "unknown-profile": ("no-such-profile", "AWS_PROFILE"),
    "missing-bucket": ("create bucket no-such-bucket-13 first", "aws s3 mb s3://no-such-bucket-13"),
    "unreachable-endpoint": ("cannot reach the object store", "AWS_ENDPOINT_URL_S3"),
}


def _arrange(case: str, monkeypatch) -> None:
    """The environment of a user who got ``case`` wrong (the test's own fixtures keep working)."""
    import s3fs

    if case in ("no-credentials", "unknown-profile"):
        monkeypatch.delenv("AWS_ACCESS_KEY_ID")
        monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    if case == "unknown-profile":
        monkeypatch.setenv("AWS_PROFILE", "no-such-profile")
    if case == "unreachable-endpoint":
        monkeypatch.setenv("AWS_ENDPOINT_URL_S3", f"http://127.0.0.1:{free_port()}")  # nothing listens
        monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")  # botocore's retries would take ~8 s
    s3fs.S3FileSystem.clear_instance_cache()  # a new process would not have the credentialed instances


@pytest.mark.parametrize("case", CASES)
def test_bad_s3_input_to_extract_is_one_line_and_writes_nothing(case, s3: S3, monkeypatch, tiny_ckpt, tiny_data):
    bucket = "no-such-bucket-13" if case == "missing-bucket" else s3.bucket()
    _arrange(case, monkeypatch)
    line = error_line(invoke(extract_app, *extract_args(tiny_ckpt, tiny_data, f"s3://{bucket}/store.zarr")))
    assert all(bit in line for bit in CASES[case]), line
    monkeypatch.delenv("AWS_PROFILE", raising=False)  # the test's own client looks: with the fake keys
    if case == "missing-bucket":
        assert not s3.fs().exists(bucket)
    else:
        assert s3.fs().find(bucket) == []


@pytest.mark.parametrize("case", CASES)
def test_bad_s3_input_to_heads_train_and_validate_is_one_line(case, s3: S3, s3_copy, monkeypatch, tmp_path):
    url = "s3://no-such-bucket-13/store.zarr" if case == "missing-bucket" else s3_copy
    _arrange(case, monkeypatch)
    line = error_line(invoke(heads_app, "train", "--cache", url, "--out", tmp_path / "run", *TRAIN))
    assert all(bit in line for bit in CASES[case]), line
    assert not (tmp_path / "run").exists()
    line = error_line(invoke(roicache_app, "cache", "validate", url), code=1, prefix="problem: ")
    assert all(bit in line for bit in CASES[case]), line


def test_denied_access_as_s3fs_raises_it_is_one_line_with_the_fix():
    """moto's server accepts any key, so a refusal is built the way s3fs builds it from S3's reply."""
    from botocore.exceptions import ClientError
    from s3fs.errors import translate_boto_error

    reply = {"Error": {"Code": "AccessDenied", "Message": "Access Denied"}, "ResponseMetadata": {"HTTPStatusCode": 403}}
    denied = translate_boto_error(ClientError(reply, "GetObject"))
    assert isinstance(denied, PermissionError)  # what friendly_errors would otherwise print without a path
    problem = object_store_error("s3://bucket/store.zarr", denied)
    assert str(problem).startswith("access to s3://bucket/store.zarr was denied (") and "AccessDenied" in str(problem)
    assert "check the credentials (set AWS_ACCESS_KEY_ID" in str(problem)
    assert object_store_error(None, FileNotFoundError("store.zarr")) is None  # plain file errors stay theirs

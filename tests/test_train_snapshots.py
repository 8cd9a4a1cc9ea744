"""Head snapshots at ``eval.snapshots`` steps: written where asked, final one equals head.pt, and a
resumed run ends with the same snapshot files as an uninterrupted one."""

from __future__ import annotations

import shutil
from dataclasses import replace

import numpy as np
import pytest
import torch

from cache_schema.errors import ConfigError
from heads.config import config_from_dict, training_identity
from heads.models import load_head
from heads.sources import InMemoryRoiSource, StreamingRoiSource
from heads.train import snapshot_paths, train_head
from tests.test_train_heads_support import detector_state, make_world

SNAPS = (5, 12, 22, 30)


def _cfg(snapshots=SNAPS, **schedule):
    return config_from_dict({
        "schedule": {"max_steps": 30, "milestones": [20, 25], "lr": 0.05, **schedule},
        "run": {"seed": 3, "log_interval": 5, "checkpoint_interval": 10, "device": "cpu", "threads": 1},
        "eval": {"interval": 10, "snapshots": list(snapshots)}})


@pytest.fixture(scope="module")
def world():
    roiset, info, _ = make_world(seed=0, num_images=40, num_classes=6, feature_shape=(4, 2, 2))
    return roiset, info, detector_state(in_features=16, hidden=8, num_classes=6)


def _crashing_source(roiset, info, *, fail_after: int) -> StreamingRoiSource:
    """Streaming source whose fetch raises once it has served ``fail_after`` batches (a crash
    mid-run: the real loop, interrupted)."""
    calls = {"n": 0}

    def fetch(positions):
        calls["n"] += 1
        if calls["n"] > fail_after:
            raise KeyboardInterrupt("simulated crash")
        return roiset.select_images(np.asarray(positions))  # positions == blocks in this world

    return StreamingRoiSource(index_roiset=replace(roiset, features=None), fetch_images=fetch,
                              num_classes=info.num_classes)


def _weights(path) -> dict[str, torch.Tensor]:
    head, _, _ = load_head(path)
    return {k: v.clone() for k, v in head.state_dict().items()}


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _train(world, out, *, config=None, source=None):
    roiset, info, state = world
    return train_head(config=config or _cfg(), source=source or InMemoryRoiSource(roiset=roiset, num_classes=6),
                      class_info=info, init_state=state, out_dir=out, progress=False)


def test_snapshots_at_the_asked_steps_and_the_last_is_head_pt(world, tmp_path):
    res = _train(world, tmp_path)
    paths = snapshot_paths(tmp_path)
    assert list(paths) == list(SNAPS) and res.metrics["snapshots"] == list(SNAPS)
    assert paths[5].name == "step_000005.pt" and not list((tmp_path / "snapshots").glob("*.tmp"))
    assert _same(_weights(paths[30]), _weights(res.head_path))
    assert not _same(_weights(paths[5]), _weights(paths[30]))  # the head moved between them
    _, spec, meta = load_head(paths[12])
    _, head_spec, head_meta = load_head(res.head_path)
    assert spec == head_spec and meta == head_meta


def test_resumed_run_ends_with_the_same_snapshots(world, tmp_path):
    full = _train(world, tmp_path / "full")
    out = tmp_path / "broken"
    roiset, info, _ = world
    with pytest.raises(KeyboardInterrupt):  # the 25th batch fails: last.pt holds step 20, snapshot 22 exists
        _train(world, out, source=_crashing_source(roiset, info, fail_after=24))
    assert list(snapshot_paths(out)) == [5, 12, 22]
    kept_before = snapshot_paths(out)[5].stat().st_mtime_ns
    # Make the snapshot past the resume point stale on purpose: the resumed run must rewrite it.
    shutil.copyfile(snapshot_paths(out)[5], snapshot_paths(out)[22])
    resumed = _train(world, out)
    assert resumed.resumed_from == 20
    want, got = snapshot_paths(tmp_path / "full"), snapshot_paths(out)
    assert list(got) == list(want) == list(SNAPS)
    assert all(_same(_weights(want[s]), _weights(got[s])) for s in SNAPS)
    assert got[5].stat().st_mtime_ns == kept_before  # before the resume point: kept, not rewritten
    assert _same(_weights(full.head_path), _weights(resumed.head_path))


def test_a_fresh_run_drops_another_attempts_snapshots(world, tmp_path):
    _train(world, tmp_path, config=_cfg(snapshots=(3, 7)))
    (tmp_path / "last.pt").unlink()  # no state to resume: this folder now starts over
    _train(world, tmp_path, config=_cfg(snapshots=(4,)))
    assert list(snapshot_paths(tmp_path)) == [4]


def test_snapshot_settings_are_checked_and_not_part_of_the_identity():
    assert training_identity(_cfg(snapshots=())) == training_identity(_cfg(snapshots=(1, 30)))
    assert _cfg(snapshots=()).eval.snapshots == ()
    for bad, match in [((5, 5), "strictly increasing"), ((7, 3), "strictly increasing"), ((0, 4), "positive"),
                       ((10, 31), "max_steps")]:
        with pytest.raises(ConfigError, match=match) as e:
            _cfg(snapshots=bad)
        assert "\n" not in str(e.value)
    cli_style = config_from_dict({}, {"eval.snapshots": "100,200", "schedule.max_steps": "200"})
    assert cli_style.eval.snapshots == (100, 200)


def test_snapshot_paths_of_a_folder_without_snapshots(tmp_path):
    assert snapshot_paths(tmp_path) == {}

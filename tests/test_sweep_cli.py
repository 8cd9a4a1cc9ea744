"""Bad input to ``heads sweep`` (issue 12): one ``error:`` line, exit 2, nothing created, nothing trained."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from heads.cli import app
from tests.pipeline_fixtures import build_store

BASE = "[base.schedule]\nmax_steps = 20\nmilestones = [15]\n"


def error_line(result) -> str:
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


def sweep(store: Path, grid_text: str, tmp_path: Path, *extra: str) -> tuple[str, Path]:
    grid = tmp_path / "grid.toml"
    grid.write_text(grid_text)
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["sweep", "--cache", str(store), "--grid", str(grid), "--out", str(out),
                                      "--quiet", *extra])
    line = error_line(result)
    assert not out.exists(), "an output was created before the error"
    return line, out


@pytest.fixture(scope="module")
def pooled_only_store(tiny_ckpt, tiny_data, tmp_path_factory) -> Path:
    """The session detector's store without the fc level."""
    return build_store(tiny_ckpt, tiny_data, tmp_path_factory.mktemp("pooled_only") / "store.zarr", levels=("pooled",))


@pytest.mark.parametrize("grid_text, expected", [
    (BASE + '[[axis]]\nfield = "sampler.nme"\nvalues = ["rfs"]\n',
     ["axis 1", "'sampler.nme' is not a config field", "valid fields: sampler.name, sampler.batch_rois"]),
    (BASE + '[[axis]]\nfield = "loss.name"\nvalues = ["ce", "focal", "hinge"]\n',
     ["axis 1 (loss.name)", "'hinge' is unknown", "valid: ce, reweight, focal, margin, gumbel, gol"]),
    (BASE + '[[axis]]\nfield = "sampler.name"\nvalues = []\n', ["axis 1", "sampler.name has no values"]),
    (BASE + '[[axis]]\nzip = { "schedule.max_steps" = [10, 20], "schedule.milestones" = [[5]] }\n',
     ["zip lists have unequal lengths (schedule.max_steps: 2, schedule.milestones: 1)"]),
])
def test_bad_grid_is_one_line(tiny_store, tmp_path, grid_text, expected):
    line, _ = sweep(tiny_store, grid_text, tmp_path)
    for bit in expected:
        assert bit in line


def test_missing_grid_file(tiny_store, tmp_path):
    result = CliRunner().invoke(app, ["sweep", "--cache", str(tiny_store), "--grid", str(tmp_path / "nope.toml"),
                                      "--out", str(tmp_path / "out")])
    assert "nope.toml does not exist" in error_line(result)


def test_missing_options(tiny_store):
    assert "needs --cache STORE --grid GRID.toml --out DIR" in error_line(CliRunner().invoke(app, ["sweep"]))


def test_store_without_a_trials_level_fails_before_any_training(pooled_only_store, tmp_path):
    grid = BASE + '[[axis]]\nfield = "head.name"\nvalues = ["3fc_ft", "lastfc"]\n'
    line, _ = sweep(pooled_only_store, grid, tmp_path)
    assert "trial 1 (head.name=lastfc)" in line and "needs the 'fc' level" in line and "--levels fc,pooled" in line


def test_unreachable_ray_address_names_it(tiny_store, tmp_path):
    line, _ = sweep(tiny_store, BASE, tmp_path, "--address", "ray://127.0.0.1:9")
    assert "--address" in line
    pytest.importorskip("ray")
    assert "ray://127.0.0.1:9" in line and "ray start --head" in line


def test_bad_jobs(tiny_store, tmp_path):
    line, _ = sweep(tiny_store, BASE, tmp_path, "--jobs", "0")
    assert "--jobs 0" in line


def test_a_moved_val_json_is_named_with_annotations(tiny_ckpt, tiny_data, tmp_path):
    """The LVIS API needs the val json the store was extracted from: moved, the sweep refuses in
    one line naming --annotations; given with it, the sweep runs and scores with it."""
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    store = build_store(tiny_ckpt, data, tmp_path / "store.zarr")
    moved = tmp_path / "val_elsewhere.json"
    shutil.move(data / "val.json", moved)
    grid = BASE + '[sweep]\nevaluator = "lvis-api"\n'
    line, out = sweep(store, grid, tmp_path)
    assert "--annotations val=PATH" in line
    result = CliRunner().invoke(app, ["sweep", "--cache", str(store), "--grid", str(tmp_path / "grid.toml"), "--out",
                                      str(out), "--jobs", "1", "--quiet", "--annotations", f"val={moved}"])
    assert result.exit_code == 0, result.output
    (trial,) = (out / "results").glob("*.json")
    rows = json.loads(trial.read_text())["rows"]
    for row in (rows["orig"], rows["sel"]):
        assert "evaluator: lvis-api (asked for)" in row["notes"]
        assert 0 <= row["segm"]["summary"]["AP"] <= 1 and row["segm"]["per_category"]

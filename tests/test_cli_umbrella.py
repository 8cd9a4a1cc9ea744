"""The `roicache` umbrella command: dataset generation and bad input, through typer's CliRunner."""

from __future__ import annotations

import json
import os

import pytest
from typer.testing import CliRunner

from serve.umbrella import app

runner = CliRunner()


def _one_error_line(result) -> str:
    lines = [line for line in (result.stderr or result.output).splitlines() if line.strip()]
    assert len(lines) == 1, lines
    assert lines[0].startswith("error: ")
    return lines[0]


def test_synth_writes_an_lvis_dataset(tmp_path):
    out = tmp_path / "data"
    result = runner.invoke(app, ["data", "synth", "--out", str(out), "--num-classes", "5", "--train-images", "12",
                                 "--val-images", "10", "--image-size", "128", "--quiet"])
    assert result.exit_code == 0, result.output
    train = json.loads((out / "train.json").read_text())
    val = json.loads((out / "val.json").read_text())
    assert len(train["categories"]) == 5
    assert {c["id"] for c in train["categories"]} == {a["category_id"] for a in val["annotations"]}
    assert all((out / im["file_name"]).is_file() for im in train["images"] + val["images"])


def test_synth_rejects_an_impossible_class_count(tmp_path):
    result = runner.invoke(app, ["data", "synth", "--out", str(tmp_path / "d"), "--num-classes", "100000", "--quiet"])
    assert result.exit_code == 2
    assert "class" in _one_error_line(result)
    assert not (tmp_path / "d").exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere; permission bits do not apply")
def test_synth_rejects_an_unwritable_directory(tmp_path):  # pragma: no cover - CI runs as root
    parent = tmp_path / "ro"
    parent.mkdir(mode=0o500)
    result = runner.invoke(app, ["data", "synth", "--out", str(parent / "d"), "--num-classes", "5", "--quiet"])
    assert result.exit_code == 2


def test_synth_rejects_an_output_path_that_is_a_file(tmp_path):
    target = tmp_path / "taken"
    target.write_text("not a dataset")
    result = runner.invoke(app, ["data", "synth", "--out", str(target), "--num-classes", "5", "--train-images", "12",
                                 "--val-images", "10", "--image-size", "128", "--quiet"])
    assert result.exit_code == 2
    _one_error_line(result)
    assert target.read_text() == "not a dataset"


@pytest.mark.parametrize("content", ["", "{not json", '{"images": []}'])
def test_detector_train_rejects_a_bad_annotation_file(tmp_path, content):
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.json").write_text(content)
    result = runner.invoke(app, ["detector", "train", "--data", str(data), "--out", str(tmp_path / "run"), "--quiet"])
    assert result.exit_code == 2
    assert "train.json" in _one_error_line(result)


def test_detector_train_rejects_a_missing_annotation_file(tmp_path):
    result = runner.invoke(app, ["detector", "train", "--data", str(tmp_path), "--out", str(tmp_path / "run"), "--quiet"])
    assert result.exit_code == 2
    assert "train.json" in _one_error_line(result)


def test_validate_rejects_a_path_that_is_no_store(tmp_path):
    result = runner.invoke(app, ["cache", "validate", str(tmp_path)])
    assert result.exit_code != 0
    assert "store" in (result.stderr or result.output)

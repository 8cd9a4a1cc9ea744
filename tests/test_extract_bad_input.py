"""Bad input to the ``extract`` command: exit 2, one ``error:`` line, and no store that looks complete.

Every case runs the real command (typer's CliRunner on ``extract.cli.app``) on real files: a
corrupt checkpoint, a torch file that is no detector, a detector for another class count, a
dataset with a missing image, output paths holding foreign data, and a resume with another
detector.
"""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from cache_schema import open_store, validate_store
from cache_schema.errors import SchemaError
from cache_schema.runtime import sha256_file
from extract.cli import app
from extract.detectors.arch import DetectorArch
from extract.detectors.checkpoint import save_detector
from extract.detectors.model import build_detector
from tests.pipeline_fixtures import TINY_DATA


def _run(ckpt: Path, data: Path, out: Path, *extra: str):
    args = ["--ckpt", str(ckpt), "--data", str(data), "--out", str(out), "--device", "cpu", "--threads", "1",
            "--quiet", *extra]
    return CliRunner().invoke(app, args)


def _one_error_line(result) -> str:
    """The command failed with exit 2 and printed exactly one line, ``error: ...``, on stderr."""
    assert result.exit_code == 2, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert result.stderr.strip() == lines[0]
    return lines[0]


def _no_store_at(out: Path) -> None:
    """Input errors are found before anything is written: the location stays empty."""
    assert not out.exists()
    with pytest.raises(SchemaError, match="no roicache store"):
        open_store(out)


@pytest.fixture(scope="module")
def checkpoints(tiny_ckpt, tmp_path_factory) -> dict[str, Path]:
    """Broken and foreign checkpoints next to the good one."""
    root = tmp_path_factory.mktemp("bad_ckpts")
    paths = {"random": root / "random.pt", "not_detector": root / "weights.pt",
             "five_classes": root / "five.pt", "retrained": root / "retrained.pt"}
    paths["random"].write_bytes(np.random.default_rng(0).bytes(4096))
    torch.save({"state_dict": {"w": torch.zeros(3)}}, paths["not_detector"])
    payload = torch.load(tiny_ckpt, map_location="cpu", weights_only=True)
    # A well-formed detector for 5 classes (the dataset has 6): first five categories, fresh weights.
    arch = replace(DetectorArch.from_dict(payload["arch"]), num_classes=TINY_DATA.num_classes - 1)
    torch.manual_seed(0)
    save_detector(paths["five_classes"], model=build_detector(arch), arch=arch,
                  categories=payload["categories"][:-1], meta={})
    # The same detector with one weight nudged: valid and for this dataset, but another file.
    first = next(iter(payload["state_dict"]))
    payload["state_dict"][first] = payload["state_dict"][first] + 0.01
    torch.save(payload, paths["retrained"])
    return paths


@pytest.mark.parametrize("kind,message", [
    ("random", "is not a readable torch checkpoint"),
    ("not_detector", "is neither a roicache detector checkpoint nor an mmdetection (mmengine) checkpoint"),
    ("five_classes", f"has {TINY_DATA.num_classes} categories but the detector was trained for {TINY_DATA.num_classes - 1}"),
])
def test_bad_checkpoint_is_one_line_and_writes_nothing(checkpoints, tiny_data, tmp_path, kind, message):
    out = tmp_path / "store.zarr"
    line = _one_error_line(_run(checkpoints[kind], tiny_data, out))
    assert message in line
    _no_store_at(out)


def test_missing_image_on_disk_is_found_before_writing(tiny_ckpt, tiny_data, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    # A val image: the train split loads fine first, and still nothing may be written.
    victim = sorted((data / "images" / "val").iterdir())[3]
    victim.unlink()
    out = tmp_path / "store.zarr"
    line = _one_error_line(_run(tiny_ckpt, data, out))
    assert f"1 of {TINY_DATA.val_images} images are missing, first {victim}" in line
    _no_store_at(out)


def test_output_path_holding_a_file_is_refused_and_untouched(tiny_ckpt, tiny_data, tmp_path):
    out = tmp_path / "notes.txt"
    out.write_bytes(b"someone else's data\n")
    line = _one_error_line(_run(tiny_ckpt, tiny_data, out))
    assert f"{out} exists and is not a roicache store" in line
    assert out.read_bytes() == b"someone else's data\n"
    # Not even --overwrite replaces foreign data.
    line = _one_error_line(_run(tiny_ckpt, tiny_data, out, "--overwrite"))
    assert "is not a roicache store" in line and out.read_bytes() == b"someone else's data\n"


def test_output_dir_holding_other_files_is_refused_and_untouched(tiny_ckpt, tiny_data, tmp_path):
    out = tmp_path / "results"
    (out / "sub").mkdir(parents=True)
    (out / "a.csv").write_text("x,y\n1,2\n")
    (out / "sub" / "b.bin").write_bytes(b"\x00\x01")
    before = sorted(str(p.relative_to(out)) for p in out.rglob("*"))
    line = _one_error_line(_run(tiny_ckpt, tiny_data, out))
    assert f"{out} exists and is not a roicache store" in line
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*")) == before
    assert (out / "a.csv").read_text() == "x,y\n1,2\n" and (out / "sub" / "b.bin").read_bytes() == b"\x00\x01"
    with pytest.raises(SchemaError):
        open_store(out)


def test_existing_store_is_not_replaced_without_overwrite(tiny_ckpt, tiny_data, tiny_store, tmp_path):
    out = tmp_path / "store.zarr"
    shutil.copytree(tiny_store, out)
    before = sha256_file(out / "zarr.json")
    line = _one_error_line(_run(tiny_ckpt, tiny_data, out))
    assert f"a store already exists at {out}" in line and "--overwrite" in line and "--resume" in line
    assert sha256_file(out / "zarr.json") == before and open_store(out).is_complete


def test_resume_with_another_checkpoint_is_a_mismatch(checkpoints, tiny_data, tiny_store, tmp_path):
    out = tmp_path / "store.zarr"
    shutil.copytree(tiny_store, out)
    line = _one_error_line(_run(checkpoints["retrained"], tiny_data, out, "--resume"))
    assert f"store {out} was built with different inputs: detector.checkpoint_sha256:" in line
    assert "extract into a new store or overwrite it (--overwrite)" in line
    # The store is left exactly as it was: complete and intact.
    assert open_store(out).is_complete and validate_store(out).ok


def test_resume_of_an_incomplete_store_with_another_checkpoint_writes_nothing(checkpoints, tiny_data, tiny_store, tmp_path):
    out = tmp_path / "store.zarr"
    shutil.copytree(tiny_store, out)
    open_store(out, mode="r+").invalidate(split="val", images=[2, 7])
    line = _one_error_line(_run(checkpoints["retrained"], tiny_data, out, "--resume"))
    assert "was built with different inputs" in line
    store = open_store(out)
    assert not store.is_complete
    np.testing.assert_array_equal(np.flatnonzero(~store.split("val").done()), [2, 7])


def test_unreadable_image_midway_leaves_an_incomplete_store(tiny_ckpt, tiny_data, tmp_path):
    """An image that exists but cannot be decoded is found while running: what was written stays,
    marked incomplete, never complete."""
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    victim = sorted((data / "images" / "val").iterdir())[5]
    victim.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 64)
    out = tmp_path / "store.zarr"
    line = _one_error_line(_run(tiny_ckpt, data, out, "--splits", "val", "--block-images", "4"))
    assert line.startswith(f"error: cannot read image {victim} (") and "replace the file or regenerate the dataset" in line
    store = open_store(out)
    assert not store.is_complete
    done = store.split("val").done()
    # Commit blocks of 4: images 0-3 were written, the block holding image 5 never completed.
    np.testing.assert_array_equal(done, np.arange(TINY_DATA.val_images) < 4)
    assert validate_store(out).incomplete == {"val": TINY_DATA.val_images - 4}


def test_resume_recreates_a_store_whose_creation_was_interrupted(tiny_ckpt, tiny_data, tmp_path):
    """`extract --resume` (what `roicache demo` reruns) on a store left uninitialized by a crash
    during creation: no image can have been written, so shard 0 creates it again and finishes."""
    out = tmp_path / "s.zarr"
    assert _run(tiny_ckpt, tiny_data, out, "--splits", "val").exit_code == 0
    open_store(out, mode="r+").group.attrs["initialized"] = False  # what a crash inside create_store leaves
    with pytest.raises(SchemaError, match="is not initialized"):
        open_store(out)
    result = _run(tiny_ckpt, tiny_data, out, "--splits", "val", "--resume")
    assert result.exit_code == 0, result.output
    store = open_store(out)
    assert store.is_complete and store.split("val").done().all()

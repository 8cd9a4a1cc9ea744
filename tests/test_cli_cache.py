"""``roicache cache validate|inspect|export-hdf5`` on a store built by ``extract`` from a real detector.

Damage is done to copies of the session's ``tiny_store``; each finding must be one clear line on
stderr and a non-zero exit, and a good store must pass with exit 0.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import h5py
import numpy as np
from dataclasses import replace

import pytest
import torch
from typer.testing import CliRunner

from cache_schema import open_store
from serve.umbrella import app
from tests.pipeline_fixtures import TINY_DATA, TINY_EXTRACT
from tests.store_objects import describe, object_of

REPAIR = "clear them with `roicache cache invalidate STORE --split SPLIT --images ...` and rerun extract with --resume"


def _invoke(*args: str):
    return CliRunner().invoke(app, list(args))


def _one_problem(result) -> str:
    """Exit 1 with exactly one ``problem: ...`` line on stderr; returns the text after the prefix."""
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("problem: "), result.stderr
    assert result.stdout.strip() == ""
    return lines[0][len("problem: "):]


@pytest.fixture()
def copy(tiny_store, tmp_path) -> Path:
    out = tmp_path / "store.zarr"
    shutil.copytree(tiny_store, out)
    return out


def test_good_store_passes_with_its_inputs(tiny_store, tiny_ckpt, tiny_data):
    result = _invoke("cache", "validate", str(tiny_store), "--ckpt", str(tiny_ckpt),
                     "--annotations", f"train={tiny_data / 'train.json'}", "--annotations", f"val={tiny_data / 'val.json'}")
    assert result.exit_code == 0, result.output
    assert result.stderr == "" and f"{tiny_store}: ok" in " ".join(result.stdout.split())


def test_deleted_chunk(copy):
    stride = open_store(copy).split("train").stride
    obj, holders = object_of(copy, "train", "feat/fc", 3)
    obj.unlink()
    problem = _one_problem(_invoke("cache", "validate", str(copy)))
    assert problem == f"train/feat/fc: object(s) missing for {describe(holders, stride)}; {REPAIR}"


def test_the_repair_it_names_works(copy, tiny_ckpt, tiny_data):
    """validate → `roicache cache invalidate` → `extract --resume` → validate ok."""
    from extract.writer import extract

    obj, holders = object_of(copy, "train", "feat/fc", 3)
    obj.unlink()
    assert _invoke("cache", "validate", str(copy)).exit_code == 1
    # The images the report names (every image of the lost object) are the ones to clear.
    r = _invoke("cache", "invalidate", str(copy), "--split", "train", "--images", f"{holders[0]}-{holders[-1]}")
    assert r.exit_code == 0, r.output
    problem = _one_problem(_invoke("cache", "validate", str(copy)))
    assert f"{len(holders)} of" in problem and "--resume" in problem
    extract(ckpt=tiny_ckpt, data=tiny_data, out=str(copy), config=replace(TINY_EXTRACT, resume=True), progress=False)
    assert _invoke("cache", "validate", str(copy)).exit_code == 0
    assert "must list positions" in _invoke("cache", "invalidate", str(copy), "--split", "train",
                                            "--images", "x").stderr


def test_truncated_chunk(copy):
    chunk, holders = object_of(copy, "val", "rois/mask_logits", 2)
    chunk.write_bytes(chunk.read_bytes()[:-5])
    k = open_store(copy).split("val").stride
    problem = _one_problem(_invoke("cache", "validate", str(copy)))
    assert problem == f"val/rois/mask_logits: object(s) corrupt or truncated for {describe(holders, k)}; {REPAIR}"
    # --shallow lists files without decoding them, so it cannot see a truncation.
    assert _invoke("cache", "validate", str(copy), "--shallow").exit_code == 0


def test_wrong_schema_version(copy):
    meta = copy / "zarr.json"
    doc = json.loads(meta.read_text())
    doc["attributes"]["roicache"]["schema_version"] = 7
    meta.write_text(json.dumps(doc))
    problem = _one_problem(_invoke("cache", "validate", str(copy)))
    assert problem == "store schema version 7 is not supported by this roicache (reads 1, 2); re-extract it or upgrade roicache"


def test_other_checkpoint_than_recorded(tiny_store, tiny_ckpt, tmp_path):
    payload = torch.load(tiny_ckpt, map_location="cpu", weights_only=True)
    key = next(iter(payload["state_dict"]))
    payload["state_dict"][key] = payload["state_dict"][key] * 1.5
    other = tmp_path / "other.pt"
    torch.save(payload, other)
    problem = _one_problem(_invoke("cache", "validate", str(tiny_store), "--ckpt", str(other)))
    assert problem.startswith(f"checkpoint {other} (sha256 ")
    assert "is not the detector the store was built from" in problem


def test_other_annotation_file_than_recorded(tiny_store, tiny_data):
    val_json = tiny_data / "val.json"
    problem = _one_problem(_invoke("cache", "validate", str(tiny_store), "--annotations", f"train={val_json}"))
    assert problem.startswith(f"annotation file {val_json} (sha256 ")
    assert "differs from the one split train was built from" in problem


def test_malformed_annotations_option_and_missing_store(tmp_path, tiny_store):
    result = _invoke("cache", "validate", str(tiny_store), "--annotations", "train.json")
    assert result.exit_code == 2
    assert result.stderr.strip().splitlines() == ["error: --annotations 'train.json' must be SPLIT=PATH, e.g. val=lvis_v1_val.json"]
    problem = _one_problem(_invoke("cache", "validate", str(tmp_path / "nowhere.zarr")))
    assert problem.startswith(f"no zarr store at {tmp_path / 'nowhere.zarr'}")


def test_inspect_json_counts_equal_the_store(tiny_store):
    result = _invoke("cache", "inspect", str(tiny_store), "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    store = open_store(tiny_store)
    assert summary["complete"] is True and summary["num_classes"] == TINY_DATA.num_classes
    assert sum(summary["classes_per_bin"]) == TINY_DATA.num_classes
    for s in summary["splits"]:
        split = store.split(s["name"])
        labels = split.load().labels.numpy()
        assert s["num_images"] == s["done_images"] == split.num_images
        assert s["num_rois"] == len(labels) == int(split.num_rois().sum())
        assert s["foreground_ratio"] == pytest.approx(float((labels < TINY_DATA.num_classes).mean()))
        assert sum(s["fg_rois_per_bin"]) == int((labels < TINY_DATA.num_classes).sum())
        assert {lv["name"]: tuple(lv["shape"]) for lv in s["levels"]} == {lv: split.level_shape(lv) for lv in split.levels}
    assert [s["num_images"] for s in summary["splits"]] == [TINY_DATA.train_images, TINY_DATA.val_images]


def test_export_hdf5_holds_the_compacted_rows(tiny_store, tmp_path):
    out = tmp_path / "store.h5"
    result = _invoke("cache", "export-hdf5", str(tiny_store), "--out", str(out), "--levels", "fc")
    assert result.exit_code == 0, result.output
    store = open_store(tiny_store)
    with h5py.File(out, "r") as h5:
        for name in store.splits:
            split = store.split(name)
            rows = split.load(level="fc", columns=("boxes", "gt_index"))
            np.testing.assert_array_equal(h5[f"{name}/feat/fc"][...], rows.features.numpy())
            np.testing.assert_array_equal(h5[f"{name}/rois/boxes"][...], rows.boxes.numpy())
            np.testing.assert_array_equal(h5[f"{name}/rois/labels"][...], rows.labels.numpy())
            np.testing.assert_array_equal(h5[f"{name}/images/roi_offsets"][...], rows.image_offsets.numpy())
            assert f"{name}/feat/pooled" not in h5
    assert not list(tmp_path.glob("*.partial-*"))


def test_add_mask_overlaps_recomputes_what_extraction_stored(copy, tiny_store):
    import zarr

    val = zarr.open_group(str(copy / "val"), mode="r+")
    stored = {p: np.asarray(val[p][:]) for p in ("rois/mask_area", "rois/mask_inter")}
    assert stored["rois/mask_inter"].max() > 0  # extraction wrote real overlaps
    # Make the copy look like a store extracted before overlaps existed.
    del val.attrs["mask_overlaps"]
    for p in stored:
        del val[p]
    assert open_store(copy).split("val").mask_overlaps == 0
    result = _invoke("cache", "validate", str(copy))
    assert result.exit_code == 0, result.output  # an old store is valid without them
    result = _invoke("cache", "add-mask-overlaps", str(copy), "--quiet")
    assert result.exit_code == 0, result.output
    assert "mask overlaps of 10 val images added" in " ".join(result.stdout.split())
    again = open_store(copy).split("val")
    assert again.mask_overlaps == stored["rois/mask_inter"].shape[1]
    for p, values in stored.items():
        assert np.array_equal(np.asarray(again.array(p)[:]), values), p
    assert _invoke("cache", "validate", str(copy)).exit_code == 0
    assert "nothing to do" in " ".join(_invoke("cache", "add-mask-overlaps", str(copy), "--quiet").stdout.split())
    bad = _invoke("cache", "add-mask-overlaps", str(copy), "--split", "train", "--quiet")
    assert bad.exit_code != 0 and "stores no mask logits" in bad.output and "Traceback" not in bad.output


def test_quick_validation_decodes_a_seeded_sample(copy):
    from cache_schema import validate_store

    full = validate_store(copy)
    quick = validate_store(copy, sample=3)
    again = validate_store(copy, sample=3)
    assert full.ok and quick.ok and full.sampled == {}
    assert quick.sampled == {"train": 3, "val": 3} and quick.chunks_checked == again.chunks_checked
    assert quick.chunks_checked < full.chunks_checked
    # A chunk missing anywhere is still found: presence is checked for every image.
    object_of(copy, "train", "feat/fc", 3)[0].unlink()
    assert not validate_store(copy, sample=3).ok
    r = _invoke("cache", "validate", str(copy), "--quick", "--full")
    assert r.exit_code == 2 and "contradict" in r.stderr

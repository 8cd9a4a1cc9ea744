"""Malformed inputs, one row each: the console command, the expected message fragment, and what must
not be left behind. Every case exits 2 with exactly one stderr line starting ``error:``.

(Part of issue 14's corpus: the cases that used to give tracebacks or silent acceptance.)
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from extract.cli import app as extract_app
from extract.detectors.shipped import shipped_checkpoint
from heads.combine import Combination
from heads.cli import app as heads_app
from serve.cli import app as serve_app
from serve.umbrella import app as roicache_app

RUNNER = CliRunner()
APPS = {"extract": extract_app, "heads": heads_app, "serve": serve_app, "roicache": roicache_app}


def _one_error_line(result) -> str:
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


@pytest.fixture(scope="module")
def head_run(tiny_store, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("corpus_head") / "run"
    r = RUNNER.invoke(heads_app, ["train", "--cache", str(tiny_store), "--out", str(out), "--head", "lastfc",
                                  "--steps", "3", "--milestones", "2", "--no-eval", "--quiet"])
    assert r.exit_code == 0, r.output
    return out


@pytest.fixture()
def ctx(tiny_data, tiny_ckpt, tiny_store, head_run, tmp_path) -> dict:
    a_file = tmp_path / "a_file.txt"
    a_file.write_text("keep me")
    return {"data": tiny_data, "ckpt": tiny_ckpt, "store": tiny_store, "head": head_run, "tmp": tmp_path,
            "file": a_file}


def _grid(ctx: dict, axis: str) -> Path:
    """A sweep grid file in the case's folder: a 2-step base and one ``[[axis]]`` table."""
    path = ctx["tmp"] / "grid.toml"
    path.write_text(f"[schedule]\nmax_steps = 2\nmilestones = [1]\n\n[[axis]]\n{axis}\n")
    return path


def _bad_data(ctx: dict, change) -> Path:
    """A copy of the tiny dataset whose train.json's first annotation is changed by ``change``."""
    root = ctx["tmp"] / "bad_data"
    shutil.copytree(ctx["data"], root)
    train = json.loads((root / "train.json").read_text())
    change(train["annotations"][0])
    (root / "train.json").write_text(json.dumps(train))
    return root


def _set_bbox(value):
    def change(ann: dict) -> None:
        ann["bbox"] = value
    return change


# (id, app, argv builder, message fragment, paths that must not exist afterwards)
CASES = [
    ("bbox_with_a_string", "extract",
     lambda c: ["--ckpt", c["ckpt"], "--data", _bad_data(c, _set_bbox([1, 2, "3", 4])), "--out", c["tmp"] / "s.zarr"],
     "must hold four finite numbers", ["s.zarr"]),
    ("bbox_with_nan", "extract",
     lambda c: ["--ckpt", c["ckpt"], "--data", _bad_data(c, _set_bbox([1, 2, float("nan"), 4])), "--out", c["tmp"] / "s.zarr"],
     "must hold four finite numbers", ["s.zarr"]),
    ("area_as_a_string", "extract",
     lambda c: ["--ckpt", c["ckpt"], "--data", _bad_data(c, lambda a: a.update(area="12")), "--out", c["tmp"] / "s.zarr"],
     "area '12' must be a finite number", ["s.zarr"]),
    ("segmentation_malformed", "extract",
     lambda c: ["--ckpt", c["ckpt"], "--data", _bad_data(c, lambda a: a.update(segmentation=[[1, 2, "x"]])),
                "--out", c["tmp"] / "s.zarr"],
     "segmentation must be polygons", ["s.zarr"]),
    ("bbox_negative_width", "extract",
     lambda c: ["--ckpt", c["ckpt"], "--data", _bad_data(c, _set_bbox([1, 2, -3, 4])), "--out", c["tmp"] / "s.zarr"],
     "negative width or height", ["s.zarr"]),
    # Already refused before this corpus existed: kept here so every console command has rows.
    ("extract_missing_checkpoint", "extract",
     lambda c: ["--ckpt", c["tmp"] / "none.pt", "--data", c["data"], "--out", c["tmp"] / "s.zarr"],
     "does not exist", ["s.zarr"]),
    ("extract_out_is_a_file", "extract",
     lambda c: ["--ckpt", c["ckpt"], "--data", c["data"], "--out", c["file"]],
     "exists and is not a roicache store", []),
    ("extract_out_under_a_file", "extract",
     lambda c: ["--ckpt", c["ckpt"], "--data", c["data"], "--out", c["file"] / "s.zarr"],
     "is a file, not a directory", []),
    ("extract_unknown_level", "extract",
     lambda c: ["--ckpt", c["ckpt"], "--data", c["data"], "--out", c["tmp"] / "s.zarr", "--levels", "conv5"],
     "--levels conv5 not produced", ["s.zarr"]),
    ("heads_train_missing_store", "heads",
     lambda c: ["train", "--cache", c["tmp"] / "none.zarr", "--out", c["tmp"] / "run", "--quiet"],
     "none.zarr", ["run"]),
    ("heads_train_unknown_sampler", "heads",
     lambda c: ["train", "--cache", c["store"], "--out", c["tmp"] / "run", "--sampler", "magic", "--quiet"],
     "magic", ["run"]),
    ("heads_eval_unknown_rule", "heads",
     lambda c: ["eval", "--cache", c["store"], "--head", c["head"], "--combine", "best", "--quiet"],
     "best", []),
    ("serve_calibrate_online_wrong_store", "serve",
     lambda c: ["calibrate-online", "--ckpt", c["file"], "--cache", c["store"], "--out", c["tmp"] / "run"],
     "another checkpoint", ["run"]),
    ("data_synth_out_under_a_file", "roicache",
     lambda c: ["data", "synth", "--out", c["file"] / "bench", "--quiet"],
     "is a file, not a directory", []),
    ("detector_train_out_is_a_file", "roicache",
     lambda c: ["detector", "train", "--data", c["data"], "--out", c["file"], "--quiet"],
     "is an existing file", []),
    ("demo_out_is_a_file", "roicache",
     lambda c: ["demo", "--out", c["file"], "--quiet"], "is an existing file", []),
    ("cache_add_mask_overlaps_not_a_store", "roicache",
     lambda c: ["cache", "add-mask-overlaps", c["tmp"] / "none.zarr"], "no roicache store", []),
    ("cache_invalidate_unknown_split", "roicache",
     lambda c: ["cache", "invalidate", c["tmp"] / "none.zarr", "--split", "val", "--images", "1"], "none.zarr", []),
    ("cache_inspect_not_a_store", "roicache",
     lambda c: ["cache", "inspect", c["tmp"] / "none.zarr"], "none.zarr", []),
    ("heads_train_out_is_a_file", "heads",
     lambda c: ["train", "--cache", c["store"], "--out", c["file"], "--steps", "2", "--quiet"],
     "is an existing file", []),
    ("heads_train_device_tpu", "heads",
     lambda c: ["train", "--cache", c["store"], "--out", c["tmp"] / "run", "--device", "tpu", "--quiet"],
     "use auto, cpu, cuda", ["run"]),
    ("heads_train_T_negative", "heads",
     lambda c: ["train", "--cache", c["store"], "--out", c["tmp"] / "run", "--T", "-1", "--quiet"],
     "T=-1.0 must be a count", ["run"]),
    ("heads_eval_out_is_a_file", "heads",
     lambda c: ["eval", "--cache", c["store"], "--head", c["head"], "--out", c["file"], "--quiet"],
     "is an existing file", []),
    ("serve_eval_out_is_a_file", "serve",
     lambda c: ["eval", "--ckpt", c["ckpt"], "--data", c["data"], "--out", c["file"], "--quiet"],
     "is an existing file", []),
    ("serve_eval_batch_size_0", "serve",
     lambda c: ["eval", "--ckpt", c["ckpt"], "--data", c["data"], "--out", c["tmp"] / "ev", "--batch-size", "0"],
     "--batch-size 0 must be >= 1", ["ev"]),
    ("serve_eval_limit_0", "serve",
     lambda c: ["eval", "--ckpt", c["ckpt"], "--data", c["data"], "--out", c["tmp"] / "ev", "--limit", "0"],
     "--limit 0 must be >= 1", ["ev"]),
    ("serve_inject_out_under_a_file", "serve",
     lambda c: ["inject", "--ckpt", c["ckpt"], "--head", c["head"], "--out", c["file"] / "x.pt"],
     "is a file, not a directory", []),
    ("serve_inject_T_negative", "serve",
     lambda c: ["inject", "--ckpt", c["ckpt"], "--head", c["head"], "--T", "-1", "--out", c["tmp"] / "x.pt"],
     "T=-1.0 must be a count", ["x.pt"]),
    ("serve_inject_T_nan", "serve",
     lambda c: ["inject", "--ckpt", c["ckpt"], "--head", c["head"], "--T", "nan", "--out", c["tmp"] / "x.pt"],
     "T=nan must be a count", ["x.pt"]),
    ("serve_inject_out_exists", "serve",
     lambda c: ["inject", "--ckpt", c["ckpt"], "--head", c["head"], "--out", c["file"]],
     "exists; pass --overwrite", []),
    ("sweep_unknown_field", "heads",
     lambda c: ["sweep", "--cache", c["store"], "--grid", _grid(c, 'field = "sampler.nmae"\nvalues = ["rfs"]'),
                "--out", c["tmp"] / "sw", "--quiet"], "sampler.name", ["sw"]),
    ("sweep_unknown_value", "heads",
     lambda c: ["sweep", "--cache", c["store"], "--grid", _grid(c, 'field = "loss.name"\nvalues = ["ce", "hinge"]'),
                "--out", c["tmp"] / "sw", "--quiet"], "focal", ["sw"]),
    ("sweep_empty_axis", "heads",
     lambda c: ["sweep", "--cache", c["store"], "--grid", _grid(c, 'field = "schedule.lr"\nvalues = []'),
                "--out", c["tmp"] / "sw", "--quiet"], "has no values", ["sw"]),
    ("sweep_unreachable_ray", "heads",
     lambda c: ["sweep", "--cache", c["store"], "--grid", _grid(c, 'field = "schedule.lr"\nvalues = [0.01]'),
                "--out", c["tmp"] / "sw", "--address", "127.0.0.1:1", "--quiet"], "127.0.0.1:1", ["sw"]),
    ("coco_lt_out_exists", "roicache",
     lambda c: ["data", "coco-lt", "--src", c["data"] / "train.json", "--out", c["file"]],
     "exists; pass --overwrite", []),
    ("export_hdf5_out_exists", "roicache",
     lambda c: ["cache", "export-hdf5", c["store"], "--out", c["file"]],
     "exists; pass --overwrite", []),
    # Issue 15: the shipped detector and detector recipes.
    ("extract_shipped_detector_on_another_benchmark", "extract",
     lambda c: ["--ckpt", shipped_checkpoint(), "--data", c["data"], "--out", c["tmp"] / "s.zarr"],
     "another benchmark config", ["s.zarr"]),
    ("extract_truncated_checkpoint", "extract",
     lambda c: ["--ckpt", _truncated(c), "--data", c["data"], "--out", c["tmp"] / "s.zarr"],
     "truncated or corrupt", ["s.zarr"]),
    ("detector_train_unknown_preset", "roicache",
     lambda c: ["detector", "train", "--data", c["data"], "--out", c["tmp"] / "run", "--preset", "nope"],
     "unknown detector preset 'nope'", ["run"]),
]


def _truncated(ctx: dict) -> Path:
    """The first 100 kB of the shipped detector: what an interrupted copy leaves."""
    path = ctx["tmp"] / "truncated.pt"
    path.write_bytes(shipped_checkpoint().read_bytes()[:100_000])
    return path


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_and_leaves_nothing(case, ctx):
    _, app, argv, fragment, absent = case
    result = RUNNER.invoke(APPS[app], [str(a) for a in argv(ctx)])
    line = _one_error_line(result)
    assert fragment in line, line
    assert "Traceback" not in result.output
    for name in absent:
        assert not (ctx["tmp"] / name).exists(), name
    assert ctx["file"].read_text() == "keep me"  # nothing overwritten


def test_cuda_asked_for_on_a_machine_without_it(ctx):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    r = RUNNER.invoke(heads_app, ["train", "--cache", str(ctx["store"]), "--out", str(ctx["tmp"] / "run"),
                                  "--device", "cuda", "--quiet"])
    assert "no CUDA GPU" in _one_error_line(r)
    assert not (ctx["tmp"] / "run").exists()


def test_overwrite_flag_replaces_an_injected_checkpoint(ctx):
    out = ctx["tmp"] / "inj.pt"
    args = ["inject", "--ckpt", str(ctx["ckpt"]), "--head", str(ctx["head"]), "--out", str(out)]
    assert RUNNER.invoke(serve_app, args).exit_code == 0
    assert "exists" in _one_error_line(RUNNER.invoke(serve_app, args))
    r = RUNNER.invoke(serve_app, [*args, "--overwrite"])
    assert r.exit_code == 0, r.output


@pytest.mark.parametrize("array", ["feat/fc"])
def test_nan_in_val_features_or_logits_is_found_by_validate_and_refused_by_heads_eval(array, ctx):
    """NaN written through zarr's own API into one stored val RoI (schema 2 stores no logits: they
    are recomputed from feat/fc, so a NaN there is the damage they would carry)."""
    import numpy as np
    import zarr

    store = ctx["tmp"] / "nan_store.zarr"
    shutil.copytree(ctx["store"], store)
    group = zarr.open_group(str(store), mode="r+")
    arr = group[f"val/{array}"]
    stride = int(group["val"].attrs["roi_stride"])
    row = 2 * stride + 1  # image 2, its second RoI
    value = np.asarray(arr[row])
    value.reshape(-1)[0] = np.nan
    arr[row] = value
    r = RUNNER.invoke(roicache_app, ["cache", "validate", str(store)])
    assert r.exit_code != 0
    assert f"val/{array}: NaN/Inf values for image 2" in r.output + r.stderr
    line = _one_error_line(RUNNER.invoke(heads_app, ["eval", "--cache", str(store), "--head", str(ctx["head"]),
                                                    "--out", str(ctx["tmp"] / "ev"), "--quiet"]))
    assert "NaN/Inf" in line and f"val/{array}" in line and "[2]" in line
    assert not (ctx["tmp"] / "ev").exists()


def test_a_store_is_read_from_another_directory_and_after_moving(ctx, monkeypatch):
    """Extracted with relative paths in one directory; evaluated from another, then moved with its
    dataset, then with the json elsewhere (named with --annotations), then with a wrong json."""
    from tests.pipeline_fixtures import TINY_EXTRACT

    from extract.writer import extract

    work = ctx["tmp"] / "work"
    shutil.copytree(ctx["data"], work / "data")
    monkeypatch.chdir(work)
    extract(ckpt=ctx["ckpt"], data=Path("data"), out="store.zarr", config=TINY_EXTRACT, progress=False)
    monkeypatch.chdir(ctx["tmp"])

    def heads_eval(store: Path, *extra: str):
        return RUNNER.invoke(heads_app, ["eval", "--cache", str(store), "--combine", "orig", "--quiet", *extra])

    assert heads_eval(work / "store.zarr").exit_code == 0  # another working directory
    moved = ctx["tmp"] / "elsewhere"
    shutil.move(str(work), str(moved))
    r = heads_eval(moved / "store.zarr")  # store and dataset moved together
    assert r.exit_code == 0, r.output
    # Trained on after the move, with its final cached evaluation finding the json again.
    r = RUNNER.invoke(heads_app, ["train", "--cache", str(moved / "store.zarr"), "--out", str(ctx["tmp"] / "moved_run"),
                                  "--head", "lastfc", "--steps", "2", "--milestones", "1", "--quiet"])
    assert r.exit_code == 0, r.output
    assert (ctx["tmp"] / "moved_run" / "eval" / "metrics_sel.json").is_file()
    json_alone = ctx["tmp"] / "val_copy.json"
    shutil.move(str(moved / "data" / "val.json"), str(json_alone))
    # Without the json, array evaluation runs from the ground truth the store keeps; the LVIS API
    # itself needs the file and says how to give it.
    assert heads_eval(moved / "store.zarr").exit_code == 0
    r = RUNNER.invoke(heads_app, ["train", "--cache", str(moved / "store.zarr"), "--out", str(ctx["tmp"] / "run2"),
                                  "--head", "lastfc", "--steps", "2", "--milestones", "1", "--quiet"])
    assert r.exit_code == 0, r.output  # trained and evaluated without the json
    line = _one_error_line(heads_eval(moved / "store.zarr", "--evaluator", "lvis-api"))
    assert "--annotations val=PATH" in line
    assert heads_eval(moved / "store.zarr", "--annotations", f"val={json_alone}").exit_code == 0
    line = _one_error_line(heads_eval(moved / "store.zarr", "--annotations", f"val={moved / 'data' / 'train.json'}"))
    assert "is not the file store" in line


class _Arbitrary:
    """A pickled Python object that is not part of any checkpoint format."""


def test_a_checkpoint_with_arbitrary_pickled_objects_is_refused_not_executed(ctx):
    import torch

    bad = ctx["tmp"] / "pickled.pt"
    torch.save({"state_dict": {"backbone.w": torch.zeros(1)}, "meta": {"obj": _Arbitrary()}}, bad)
    r = RUNNER.invoke(extract_app, ["--ckpt", str(bad), "--data", str(ctx["data"]), "--out", str(ctx["tmp"] / "s.zarr")])
    assert "pickled Python objects other than tensors" in _one_error_line(r)
    assert "Warning" not in r.output and not (ctx["tmp"] / "s.zarr").exists()


def test_cached_evaluation_without_the_json_equals_evaluation_with_it(ctx):
    """The store keeps what LVIS evaluation reads of the val json (cache_schema.eval_gt): with the
    json gone, heads eval gives exactly the same metrics, and says where the ground truth came from."""
    import numpy as np
    from lvis import LVIS

    from cache_schema import open_store
    from cache_schema.eval_gt import read_eval_gt
    from heads.evaluation.fast_inputs import gt_arrays, gt_arrays_from_store, store_slots
    from heads.pipeline import evaluate_from_store

    store = open_store(ctx["store"])
    split = store.split("val")
    record = read_eval_gt(split.group)
    assert record is not None
    # The store's copy gives the very arrays the json gives.
    json_path = Path(store.meta.dataset.splits["val"].annotation_path)
    ids = [int(i) for i in split.image_ids]
    slots = store_slots(split.gt().image, split.gt().ann_id)
    a = gt_arrays(LVIS(str(json_path)), ids, slots=slots)
    b = gt_arrays_from_store(record, position_ids=split.image_ids, category_ids=store.classes.category_ids,
                             image_ids=ids, slots=slots)
    for name in ("image_ids", "cat_ids", "image", "cat", "area", "ignore", "bbox", "neg", "not_exhaustive",
                 "instance_count", "mask_area", "slot"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)
    assert a.frequency == b.frequency

    copy = ctx["tmp"] / "store_copy.zarr"
    shutil.copytree(ctx["store"], copy)
    with_json = evaluate_from_store(cache=str(copy), head=ctx["head"], combinations=Combination(T=300.0).per_rule(("orig", "sel")),
                                    out_dir=None, progress=False)
    data_copy = ctx["tmp"] / "data_gone"
    shutil.copytree(ctx["data"], data_copy)
    # The same store, its json no longer anywhere it recorded: point the record at a missing file.
    import zarr

    group = zarr.open_group(str(copy), mode="r+")
    attrs = dict(group.attrs["roicache"])
    attrs["dataset"]["splits"]["val"]["annotation_path"] = str(ctx["tmp"] / "nowhere" / "val.json")
    attrs["dataset"]["splits"]["val"].pop("annotation_relpath", None)
    group.attrs["roicache"] = attrs
    without = evaluate_from_store(cache=str(copy), head=ctx["head"], combinations=Combination(T=300.0).per_rule(("orig", "sel")),
                                  out_dir=None, progress=False)
    for name in ("orig", "sel"):
        assert with_json.rows[name].segm == without.rows[name].segm
        assert with_json.rows[name].bbox == without.rows[name].bbox
    assert any("ground truth from the store" in n for n in without.rows["orig"].notes)
    # The LVIS API itself needs the json: asked for explicitly, it says how to give it.
    with pytest.raises(Exception, match="--annotations val=PATH"):
        evaluate_from_store(cache=str(copy), head=None, combinations=(Combination(rule="orig"),), out_dir=None, progress=False,
                            evaluator="lvis-api")


@pytest.mark.parametrize("app,argv", [
    ("heads", lambda c, out: ["eval", "--cache", c["store"], "--head", c["head"], "--combine", "orig", "--out", out,
                              "--quiet"]),
    ("serve", lambda c, out: ["eval", "--ckpt", c["ckpt"], "--data", c["data"], "--out", out, "--limit", "2",
                              "--quiet"]),
])
def test_a_previous_evaluation_is_replaced_only_with_overwrite(app, argv, ctx):
    out = ctx["tmp"] / "ev"
    args = [str(a) for a in argv(ctx, out)]
    assert RUNNER.invoke(APPS[app], args).exit_code == 0
    before = (out / "eval_summary.json").read_text()
    assert "already holds results" in _one_error_line(RUNNER.invoke(APPS[app], args))
    assert (out / "eval_summary.json").read_text() == before
    r = RUNNER.invoke(APPS[app], [*args, "--overwrite"])
    assert r.exit_code == 0, r.output


def test_nan_in_train_features_stops_training_with_the_images_named(ctx):
    import numpy as np
    import zarr

    store = ctx["tmp"] / "nan_train.zarr"
    shutil.copytree(ctx["store"], store)
    arr = zarr.open_group(str(store), mode="r+")["train/feat/fc"]
    values = np.asarray(arr[...])
    values[:] = np.nan
    arr[...] = values
    line = _one_error_line(RUNNER.invoke(heads_app, ["train", "--cache", str(store), "--out", str(ctx["tmp"] / "run"),
                                                     "--head", "lastfc", "--steps", "3", "--quiet"]))
    assert "NaN/Inf in the cached features (train/feat)" in line and "train images [" in line
    assert "roicache cache invalidate" in line

"""Schema 1 stores stay readable and migrate to schema 2 identically; the synthetic scale store is
a real store (validates, trains) with the properties it promises."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from cache_schema import create_store, finalize, open_store, validate_store
from cache_schema.head_init import read_head_weights, write_head_weights
from cache_schema.migrate import migrate_store
from cache_schema.tiny import tiny_inputs, write_images
from extract.synth_store import SynthStoreConfig, synth_store
from serve.umbrella import app

COLUMNS = {"train": ("boxes", "objectness", "is_gt", "gt_index", "logits", "reg_boxes"),
           "val": ("boxes", "gt_index", "logits", "reg_boxes", "mask_logits", "mask_area", "mask_inter")}


@pytest.fixture()
def v1_store(tmp_path):
    inputs = tiny_inputs(seed=5, split_images=(("train", 11), ("val", 6)), schema_version=1)
    path = tmp_path / "v1.zarr"
    store = create_store(path, meta=inputs.meta, classes=inputs.classes, splits=list(inputs.specs))
    rng = np.random.default_rng(0)
    write_head_weights(store, {k: rng.standard_normal(s).astype(np.float32) for k, s in
                               {"fc6.weight": (8, 16), "fc6.bias": (8,), "fc7.weight": (16, 8), "fc7.bias": (16,),
                                "cls.weight": (5, 16), "cls.bias": (5,)}.items()})
    for spec in inputs.specs:
        write_images(store, inputs, split=spec.name)
    assert finalize(store)
    return path, inputs


def _same_contents(a, b) -> None:
    assert a.meta.to_dict() | {"schema_version": 0} == b.meta.to_dict() | {"schema_version": 0}
    assert a.classes.names == b.classes.names
    np.testing.assert_array_equal(a.classes.csr_images, b.classes.csr_images)
    for key, value in read_head_weights(a).items():
        np.testing.assert_array_equal(read_head_weights(b)[key], value)
    for name in a.splits:
        x, y = a.split(name), b.split(name)
        np.testing.assert_array_equal(x.image_ids, y.image_ids)
        np.testing.assert_array_equal(x.num_rois(), y.num_rois())
        for field in ("boxes", "labels", "ann_id"):
            np.testing.assert_array_equal(getattr(x.gt(), field), getattr(y.gt(), field))
        for level in x.levels:
            cols = tuple(c for c in COLUMNS[name] if not c.startswith("mask_") or x.with_masks)
            cols = tuple(c for c in cols if not c.startswith("mask_") or c == "mask_logits" or x.mask_overlaps)
            rx, ry = x.load(level=level, columns=cols), y.load(level=level, columns=cols)
            for field in ("labels", "ious", "features", *cols):
                np.testing.assert_array_equal(getattr(rx, field).numpy(), getattr(ry, field).numpy(), err_msg=f"{name} {field}")


def test_a_version_1_store_is_read_and_migrates_identically(v1_store, tmp_path):
    path, inputs = v1_store
    old = open_store(path)
    assert old.meta.schema_version == 1 and old.split("train").array("feat/fc").shards is None
    # Read as written (schema 1 rows are in proposal order, logits stored).
    rows = old.split("train").load(level="fc", columns=("logits",))
    np.testing.assert_array_equal(rows.logits.numpy()[: len(inputs.rows["train"][0]["rois/logits"])],
                                  inputs.rows["train"][0]["rois/logits"])
    report = migrate_store(str(path), str(tmp_path / "v2.zarr"), block_images=4, progress=False)
    new = open_store(tmp_path / "v2.zarr")
    assert new.meta.schema_version == 2 and new.is_complete and report.complete
    assert new.split("train").array("feat/pooled").shards is not None
    _same_contents(old, new)
    assert validate_store(tmp_path / "v2.zarr").ok
    assert report.objects_after < report.objects_before  # 17 images: blocks of 4 instead of one object per image


def test_an_interrupted_migration_resumes_to_the_same_store(v1_store, tmp_path):
    path, _ = v1_store
    out = tmp_path / "v2.zarr"
    migrate_store(str(path), str(out), block_images=4, progress=False)
    writable = open_store(out, mode="r+")
    writable.invalidate(split="train", images=[4, 5, 6, 7])  # as if killed before block 1's marks
    report = migrate_store(str(path), str(out), block_images=4, resume=True, progress=False)
    assert report.images_copied == 4 and report.complete
    _same_contents(open_store(path), open_store(out))


def test_resuming_a_version_1_store_names_the_way_out(v1_store):
    from dataclasses import replace

    from cache_schema import open_for_resume
    from cache_schema.errors import StoreMismatchError

    path, inputs = v1_store
    with pytest.raises(StoreMismatchError, match="schema version 1 and this roicache writes 2.*roicache cache migrate"):
        open_for_resume(path, replace(inputs.meta, schema_version=2))


def test_migrate_cli_and_its_bad_input(v1_store, tmp_path):
    path, _ = v1_store
    runner = CliRunner()
    ok = runner.invoke(app, ["cache", "migrate", str(path), "--out", str(tmp_path / "m.zarr"), "--quiet"])
    assert ok.exit_code == 0, ok.output
    assert "schema 1 -> 2, 17 images copied" in " ".join(ok.stdout.split())
    again = runner.invoke(app, ["cache", "migrate", str(path), "--out", str(tmp_path / "m.zarr"), "--quiet"])
    assert again.exit_code != 0 and "already exists" in again.stderr and "Traceback" not in again.output
    assert len(again.stderr.strip().splitlines()) == 1


SMALL = SynthStoreConfig(images=24, classes=12, rois_per_image=20, levels=(("fc", (16,)), ("pooled", (4, 2, 2))),
                         gt_per_image=3.0, fg_per_gt=2.0, bg_per_image=5, block_images=8, seed=3)


def test_synthetic_store_is_a_valid_store_with_the_promised_rows(tmp_path):
    report = synth_store(str(tmp_path / "s.zarr"), SMALL, progress=False)
    store = open_store(tmp_path / "s.zarr")
    assert store.is_complete and validate_store(tmp_path / "s.zarr").ok
    split = store.split("train")
    rows = split.load(level="fc", columns=("gt_index", "is_gt", "logits"))
    gt = split.gt()
    assert report.rois == len(rows) and report.gt == len(gt)
    c = SMALL.classes
    for j in range(split.num_images):
        r = rows.rows_of(j)
        labels, gti, is_gt = rows.labels[r].numpy(), rows.gt_index[r].numpy(), rows.is_gt[r].numpy()
        assert (np.diff(labels) >= 0).all()                         # label order, background last
        assert int((labels == c).sum()) == SMALL.bg_per_image        # exactly K background RoIs
        fg = labels < c
        np.testing.assert_array_equal(labels[fg], gt.labels[gti[fg]])  # foreground labelled by its GT
        own = np.flatnonzero(gt.image == j)
        assert sorted(gti[is_gt].tolist()) == own.tolist()           # every GT box appended once
    # Class statistics agree with the GT table; logits are recomputed from fc and the stored head.
    np.testing.assert_array_equal(store.classes.instance_count, np.bincount(gt.labels, minlength=c))
    head = read_head_weights(store)
    want = rows.features.float().numpy() @ head["cls.weight"].T + head["cls.bias"]
    np.testing.assert_allclose(rows.logits.numpy(), want, rtol=1e-5, atol=1e-5)
    # Seeded: a second run writes the same values.
    synth_store(str(tmp_path / "t.zarr"), SMALL, progress=False)
    again = open_store(tmp_path / "t.zarr").split("train").load(level="pooled")
    assert torch.equal(again.features, split.load(level="pooled").features)


def test_training_streams_from_a_synthetic_store_as_from_memory(tmp_path):
    from heads.config import load_config
    from heads.pipeline import train_from_store

    synth_store(str(tmp_path / "s.zarr"), SMALL, progress=False)
    cfg = load_config(None, {"schedule.max_steps": 6, "schedule.milestones": "4", "sampler.classes_per_batch": 3,
                             "run.device": "cpu", "head.name": "lastfc", "eval.interval": 0, "run.log_interval": 2})
    heads = {}
    for mode in ("never", "always"):
        run = train_from_store(cache=str(tmp_path / "s.zarr"), config=cfg, out_dir=tmp_path / mode, stream=mode, progress=False)
        heads[mode] = torch.load(run.out_dir / "head.pt", map_location="cpu", weights_only=False)
    for key, value in heads["never"]["state_dict"].items():
        assert torch.equal(value, heads["always"]["state_dict"][key]), key


def test_synth_cli_bad_levels_is_one_line(tmp_path):
    r = CliRunner().invoke(app, ["cache", "synth", "--out", str(tmp_path / "x.zarr"), "--images", "4", "--levels", "fc:abc"])
    assert r.exit_code != 0 and "Traceback" not in r.output
    assert r.stderr.strip().splitlines() == ["error: --levels item 'fc:abc' is not name:shape, e.g. fc:1024 or pooled:256x7x7"]
    assert not (tmp_path / "x.zarr").exists()

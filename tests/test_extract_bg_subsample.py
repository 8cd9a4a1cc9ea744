"""Background subsampling at extraction (`extract --train-bg-per-image K`): every foreground RoI
of a train image is kept and exactly K of its background RoIs (all, when it has fewer), drawn by a
seed recorded with the store; val keeps every proposal."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from cache_schema import open_store
from cache_schema.errors import StoreMismatchError
from extract.cli import app as extract_app
from extract.matching import keep_rows
from tests.pipeline_fixtures import build_store

K = 3


@pytest.fixture(scope="module")
def sub_store(tiny_ckpt, tiny_data, tmp_path_factory):
    return build_store(tiny_ckpt, tiny_data, tmp_path_factory.mktemp("sub") / "store.zarr", train_bg_per_image=K)


def _by_image(split, **kw):
    roiset = split.load(columns=("boxes",), **kw)
    return {int(roiset.images[j]): roiset.rows_of(j) for j in range(len(roiset.images))}, roiset


def test_keep_rows_by_hand():
    labels = np.array([5, 0, 5, 5, 2, 5, 5])  # C = 5: rows 1 and 4 are foreground
    rows = keep_rows(labels, num_classes=5, background=2, seed=7, image=3)
    drawn = np.random.default_rng((7, 3)).choice(np.array([0, 2, 3, 5, 6]), size=2, replace=False)
    assert rows.tolist() == sorted([1, 4, *drawn.tolist()])
    assert keep_rows(labels, num_classes=5, background=9, seed=7, image=3).tolist() == list(range(7))
    assert keep_rows(labels, num_classes=5, background=None, seed=7, image=3).tolist() == list(range(7))
    assert keep_rows(labels, num_classes=5, background=0, seed=7, image=3).tolist() == [1, 4]


def test_every_foreground_and_exactly_k_background_per_train_image(sub_store, tiny_store):
    full, sub = open_store(str(tiny_store)), open_store(str(sub_store))
    assert sub.meta.extraction.train_bg_per_image == K and full.meta.extraction.train_bg_per_image is None
    c = sub.meta.num_classes
    rows_f, f = _by_image(full.split("train"), level="fc")
    rows_s, s = _by_image(sub.split("train"), level="fc")
    assert rows_f.keys() == rows_s.keys()
    for image, rf in rows_f.items():
        rs = rows_s[image]
        fg_f, fg_s = f.labels[rf] < c, s.labels[rs] < c
        # the same foreground RoIs, in the same order, with the same features
        assert torch.equal(f.boxes[rf][fg_f], s.boxes[rs][fg_s])
        assert torch.equal(f.features[rf][fg_f], s.features[rs][fg_s])
        assert int((~fg_s).sum()) == min(K, int((~fg_f).sum()))
        # the background kept is some of the image's own background RoIs
        bg_f = {tuple(b) for b in f.boxes[rf][~fg_f].tolist()}
        assert {tuple(b) for b in s.boxes[rs][~fg_s].tolist()} <= bg_f
    # val keeps every proposal
    vf, vs = full.split("val").load(level="fc"), sub.split("val").load(level="fc")
    assert torch.equal(vf.features, vs.features) and torch.equal(vf.labels, vs.labels)


def test_the_draw_depends_on_the_seed_only(sub_store, tiny_ckpt, tiny_data, tmp_path):
    again = build_store(tiny_ckpt, tiny_data, tmp_path / "again.zarr", train_bg_per_image=K, batch_size=3)
    a, b = (open_store(str(p)).split("train").load(columns=("boxes",)) for p in (sub_store, again))
    assert torch.equal(a.boxes, b.boxes)
    other = build_store(tiny_ckpt, tiny_data, tmp_path / "other.zarr", train_bg_per_image=K, seed=1)
    assert not torch.equal(a.boxes, open_store(str(other)).split("train").load(columns=("boxes",)).boxes)


def test_resume_with_another_k_is_refused(sub_store, tiny_ckpt, tiny_data):
    with pytest.raises(StoreMismatchError, match="train_bg_per_image"):
        build_store(tiny_ckpt, tiny_data, sub_store, train_bg_per_image=K + 1, resume=True)


def test_negative_k_is_one_line(tiny_ckpt, tiny_data, tmp_path):
    r = CliRunner().invoke(extract_app, ["--ckpt", str(tiny_ckpt), "--data", str(tiny_data), "--out",
                                         str(tmp_path / "s.zarr"), "--train-bg-per-image", "-1", "--quiet"])
    lines = r.stderr.strip().splitlines()
    assert r.exit_code == 2 and len(lines) == 1 and "--train-bg-per-image must be >= 0" in lines[0]
    assert not (tmp_path / "s.zarr").exists()


def test_calibration_trains_on_a_subsampled_store(sub_store, tmp_path):
    import json

    from heads.config import load_config
    from heads.pipeline import train_from_store

    cfg = load_config(None, {"schedule.max_steps": 8, "schedule.milestones": "6", "sampler.classes_per_batch": 3,
                             "run.device": "cpu", "head.name": "lastfc", "eval.interval": 0, "run.log_interval": 2})
    run = train_from_store(cache=str(sub_store), config=cfg, out_dir=tmp_path / "run", progress=False)
    log = [json.loads(line) for line in (run.out_dir / "log.jsonl").read_text().splitlines()]
    assert run.steps == 8 and all(np.isfinite(r["loss"]) and r["rois_per_step"] > 0 for r in log if "loss" in r)

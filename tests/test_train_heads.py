"""The training loop on a tiny real world: sources agree, resume is exact, outputs are complete."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from cache_schema.errors import ConfigError, RoicacheError, SchemaError
from heads.config import config_from_dict, load_config
from heads.models import load_head
from heads.sources import InMemoryRoiSource, NonFiniteFeatureError, StreamingRoiSource, check_finite
from heads.train import train_head
from tests.test_train_heads_support import detector_state, make_class_info, make_world

SHAPE = (4, 2, 2)


def _cfg(**sections):
    base = {"schedule": {"max_steps": 30, "milestones": [20, 25], "lr": 0.05},
            "run": {"seed": 3, "log_interval": 5, "checkpoint_interval": 10, "device": "cpu", "threads": 1},
            "eval": {"interval": 10}}
    for sec, values in sections.items():
        base.setdefault(sec, {}).update(values)
    return config_from_dict(base)


@pytest.fixture(scope="module")
def world():
    roiset, info, _ = make_world(seed=0, num_images=40, num_classes=6, feature_shape=SHAPE)
    val, _, _ = make_world(seed=0, num_images=40, num_classes=6, feature_shape=SHAPE)  # same prototypes
    state = detector_state(in_features=16, hidden=8, num_classes=6)
    return roiset, info, val, state


def _streaming(roiset, info, *, fail_after=None):
    calls = {"n": 0}

    def fetch(positions):
        calls["n"] += 1
        if fail_after is not None and calls["n"] > fail_after:
            raise KeyboardInterrupt("simulated crash")
        return roiset.select_images(np.asarray(positions))  # positions == blocks in this world

    label_only = replace(roiset, features=None)
    return StreamingRoiSource(index_roiset=label_only, fetch_images=fetch, num_classes=info.num_classes)


def _weights(path):
    head, _, _ = load_head(path)
    return {k: v.clone() for k, v in head.state_dict().items()}


def test_streaming_and_in_memory_sources_gather_the_same_rows(world):
    roiset, info, _, _ = world
    mem, stream = InMemoryRoiSource(roiset=roiset, num_classes=6), _streaming(roiset, info)
    rows = np.array([5, 0, 77, 6, 6, len(roiset) - 1])
    fm, lm = mem.gather(rows)
    fs, ls = stream.gather(rows)
    assert torch.equal(fm, fs) and torch.equal(lm, ls) and torch.equal(lm, roiset.labels[rows])
    assert stream.feature_shape == mem.feature_shape == SHAPE


def test_same_seed_same_weights_from_both_sources(world, tmp_path):
    roiset, info, _, state = world
    cfg = _cfg()
    a = train_head(config=cfg, source=InMemoryRoiSource(roiset=roiset, num_classes=6), class_info=info,
                   init_state=state, out_dir=tmp_path / "mem", progress=False)
    b = train_head(config=cfg, source=_streaming(roiset, info), class_info=info, init_state=state,
                   out_dir=tmp_path / "stream", progress=False)
    wa, wb = _weights(a.head_path), _weights(b.head_path)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    init = detector_state(in_features=16, hidden=8, num_classes=6)
    assert not torch.equal(wa["cls.weight"], init["cls.weight"])  # it did train
    assert a.metrics["final_loss"] == b.metrics["final_loss"]


@pytest.mark.parametrize("sampler,loss", [("bilevel", "ce"), ("rfs", "gol")])
def test_interrupted_then_resumed_equals_uninterrupted(world, tmp_path, sampler, loss):
    roiset, info, val, state = world
    cfg = _cfg(sampler={"name": sampler, "images_per_batch": 4}, loss={"name": loss, "gol_lambda": 0.2},
               schedule={"momentum": 0.9})
    full = train_head(config=cfg, source=InMemoryRoiSource(roiset=roiset, num_classes=6), class_info=info,
                      init_state=state, out_dir=tmp_path / "full", val=val, progress=False)
    out = tmp_path / "broken"
    with pytest.raises(KeyboardInterrupt):
        train_head(config=cfg, source=_streaming(roiset, info, fail_after=24), class_info=info, init_state=state,
                   out_dir=out, val=val, progress=False)
    assert (out / "last.pt").exists() and not (out / "metrics.json").exists() and not (out / "head.pt").exists()
    steps_before = [json.loads(x)["step"] for x in (out / "log.jsonl").read_text().splitlines()]
    assert max(steps_before) == 20  # crashed at step 25, after logging step 20 (last checkpoint at 20)
    resumed = train_head(config=cfg, source=InMemoryRoiSource(roiset=roiset, num_classes=6), class_info=info,
                         init_state=state, out_dir=out, val=val, progress=False)
    assert resumed.resumed_from == 20 and resumed.steps == 30
    wf, wr = _weights(full.head_path), _weights(resumed.head_path)
    assert all(torch.equal(wf[k], wr[k]) for k in wf)
    steps = [json.loads(x)["step"] for x in (out / "log.jsonl").read_text().splitlines()]
    assert steps == [5, 10, 15, 20, 25, 30]  # log continued without duplicates


def test_outputs_are_complete_and_the_head_learns(world, tmp_path):
    roiset, info, val, _ = world
    cfg = _cfg(head={"name": "2fc_rand", "hidden": 32}, sampler={"name": "class_balanced", "batch_rois": 64},
               schedule={"max_steps": 120, "milestones": [100], "lr": 0.1}, run={"log_interval": 20})
    res = train_head(config=cfg, source=InMemoryRoiSource(roiset=roiset, num_classes=6), class_info=info,
                     init_state=None, out_dir=tmp_path, val=val, progress=False)
    names = {p.name for p in tmp_path.iterdir()}
    assert {"head.pt", "last.pt", "log.jsonl", "config.toml", "config.json", "metrics.json"} <= names
    assert load_config(tmp_path / "config.toml") == cfg
    assert json.loads((tmp_path / "config.json").read_text())["head"]["name"] == "2fc_rand"
    log = [json.loads(x) for x in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert log[-1]["loss"] < log[0]["loss"]
    assert {"acc_fg", "acc_bin1", "acc_bin2", "acc_bin3", "acc_bin4", "n_bin1"} <= set(log[-1])
    val_metrics = res.metrics["val"]
    assert val_metrics["acc_fg"] > 0.9  # the prototypes are well separated
    n_fg = int((val.labels < 6).sum())
    assert sum(val_metrics[f"n_bin{k}"] for k in range(1, 5)) == n_fg
    _, spec, meta = load_head(res.head_path)
    assert spec.name == "2fc_rand" and spec.in_shape == SHAPE and meta["seed"] == 3
    assert res.steps_per_second and res.steps_per_second > 0


def test_ncm_single_pass_on_fc_level(tmp_path):
    roiset, info, _ = make_world(seed=1, num_images=30, num_classes=5, feature_shape=(12,))
    cfg = _cfg(head={"name": "ncm"})
    res = train_head(config=cfg, source=InMemoryRoiSource(roiset=roiset, num_classes=5), class_info=info,
                     init_state=None, out_dir=tmp_path, val=roiset, progress=False)
    head, spec, _ = load_head(res.head_path)
    fg = roiset.labels < 5
    want = torch.stack([roiset.features[roiset.labels == k].double().mean(0) for k in range(6)]).float()
    torch.testing.assert_close(head.means, want, rtol=1e-4, atol=1e-4)
    assert res.steps == 0 and res.metrics["val"]["acc_fg"] > 0.9 and res.metrics["ncm"]["rois"] == len(roiset)
    assert int(fg.sum()) > 0


def test_bad_inputs_raise_typed_one_line_errors(world, tmp_path):
    roiset, info, _, state = world
    feats = roiset.features.clone()
    feats[3] = float("nan")
    nan_set = replace(roiset, features=feats)
    with pytest.raises(NonFiniteFeatureError, match="NaN") as e:
        train_head(config=_cfg(sampler={"name": "random", "batch_rois": 10000}),
                   source=InMemoryRoiSource(roiset=nan_set, num_classes=6), class_info=info,
                   init_state=state, out_dir=tmp_path / "nan", progress=False)
    assert isinstance(e.value, RoicacheError) and "\n" not in str(e.value)
    all_bg = replace(roiset, labels=torch.full_like(roiset.labels, 6))
    with pytest.raises(SchemaError, match="empty class set"):
        train_head(config=_cfg(), source=InMemoryRoiSource(roiset=all_bg, num_classes=6), class_info=info,
                   init_state=state, out_dir=tmp_path / "bg", progress=False)
    no_images = make_class_info(image_classes=[set()] * 40, num_classes=6)
    with pytest.raises(SchemaError, match="empty class set"):
        train_head(config=_cfg(), source=InMemoryRoiSource(roiset=roiset, num_classes=6), class_info=no_images,
                   init_state=state, out_dir=tmp_path / "noimg", progress=False)
    with pytest.raises(ConfigError, match="detector"):
        train_head(config=_cfg(), source=InMemoryRoiSource(roiset=roiset, num_classes=6), class_info=info,
                   init_state=None, out_dir=tmp_path / "noinit", progress=False)
    with pytest.raises(ConfigError, match="level='fc'"):
        train_head(config=_cfg(head={"name": "lastfc"}), source=InMemoryRoiSource(roiset=roiset, num_classes=6),
                   class_info=info, init_state=state, out_dir=tmp_path / "lvl", progress=False)


def test_resume_refuses_other_settings(world, tmp_path):
    roiset, info, _, state = world
    src = InMemoryRoiSource(roiset=roiset, num_classes=6)
    train_head(config=_cfg(schedule={"max_steps": 10}), source=src, class_info=info, init_state=state,
               out_dir=tmp_path, progress=False)
    with pytest.raises(ConfigError, match="other settings"):
        train_head(config=_cfg(schedule={"max_steps": 10, "lr": 0.5}), source=src, class_info=info,
                   init_state=state, out_dir=tmp_path, progress=False)
    assert (tmp_path / "head.pt").exists() and (tmp_path / "metrics.json").exists()  # the finished run is kept


def test_real_store_split_in_memory_and_streaming_train_alike(tmp_path):
    from cache_schema import create_store
    from cache_schema.tiny import tiny_inputs, write_images

    inputs = tiny_inputs(seed=2, num_classes=4, split_images=(("train", 12), ("val", 3)))
    store = create_store(tmp_path / "s.zarr", meta=inputs.meta, classes=inputs.classes, splits=list(inputs.specs))
    for name in ("train", "val"):
        write_images(store, inputs, split=name)
    split, info = store.split("train"), store.classes
    state = detector_state(in_features=16, hidden=8, num_classes=4)
    cfg = _cfg(sampler={"name": "rfs", "images_per_batch": 3}, schedule={"max_steps": 12, "milestones": [10]})
    mem = InMemoryRoiSource(roiset=split.load(level="pooled"), num_classes=4)
    stream = StreamingRoiSource.from_split(split, level="pooled", num_classes=4)
    assert stream.feature_shape == mem.feature_shape == (4, 2, 2)
    a = train_head(config=cfg, source=mem, class_info=info, init_state=state, out_dir=tmp_path / "a", progress=False,
                   val=store.split("val").load(level="pooled"))
    b = train_head(config=cfg, source=stream, class_info=info, init_state=state, out_dir=tmp_path / "b", progress=False)
    wa, wb = _weights(a.head_path), _weights(b.head_path)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_check_finite_is_exact_even_when_the_sum_overflows(dtype):
    big = torch.finfo(dtype).max
    check_finite(torch.full((4, 3), big / 2, dtype=dtype), what="t")  # finite values, infinite sum
    check_finite(torch.zeros((0, 3), dtype=dtype), what="t")
    for bad in (float("nan"), float("inf"), -float("inf")):
        x = torch.ones((4, 3), dtype=dtype)
        x[2, 1] = bad
        with pytest.raises(NonFiniteFeatureError):
            check_finite(x, what="t")
    both = torch.tensor([float("inf"), -float("inf")], dtype=dtype)  # sums to NaN, still caught
    with pytest.raises(NonFiniteFeatureError):
        check_finite(both, what="t")

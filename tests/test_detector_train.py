"""Detector training on a tiny in-memory set: learning, schedule, sampling, resume, time budget."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from cache_schema.errors import ConfigError
from extract.detectors.checkpoint import load_detector
from extract.detectors.toy import ToyShapes, tiny_arch
from extract.detectors.train import run_training
from extract.detectors.train_config import DetectorTrainConfig, batch_indices, lr_at, step_seed


def _config(**overrides) -> DetectorTrainConfig:
    base = dict(
        max_steps=6,
        lr=0.02,
        warmup_steps=3,
        processes=1,
        threads_per_process=1,
        checkpoint_every=2,
        time_budget_s=None,
        seed=3,
    )
    return DetectorTrainConfig(**{**base, **overrides})


@pytest.fixture(scope="module")
def data():
    return ToyShapes(num_images=8, seed=0)


def _train(data, out_dir, config, **kwargs):
    return run_training(
        dataset=data, categories=data.categories, out_dir=out_dir, config=config, arch=tiny_arch(),
        progress=False, **kwargs,
    )


def test_loss_decreases_over_30_steps(data, tmp_path):
    path = _train(data, tmp_path, _config(max_steps=30, warmup_steps=5, checkpoint_every=30))
    assert path == tmp_path / "detector.pt"
    meta = load_detector(path).meta
    losses = np.array(meta["loss_history"])
    assert losses.shape == (30,) and np.isfinite(losses).all()
    first, last = losses[:5].mean(), losses[-10:].mean()
    assert last < 0.75 * first, (first, last)
    assert meta["steps_done"] == 30 and meta["total_steps"] == 30 and not meta["stopped_by_time_budget"]
    assert meta["epochs_done"] == pytest.approx(30 * 2 / 8)
    log = json.loads((tmp_path / "train_log.json").read_text())
    assert log["steps_done"] == 30 and log["images_per_second"] > 0


def test_resume_is_bit_identical_to_uninterrupted(data, tmp_path):
    config = _config()
    straight = _train(data, tmp_path / "a", config)
    first = _train(data, tmp_path / "b", config, stop_after_steps=3)
    assert first == tmp_path / "b" / "last.pt"
    assert not (tmp_path / "b" / "detector.pt").exists()
    resumed = _train(data, tmp_path / "b", config)
    assert resumed == tmp_path / "b" / "detector.pt"
    a, b = load_detector(straight), load_detector(resumed)
    assert a.meta["loss_history"] == b.meta["loss_history"]
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    # The final checkpoint has no wall-clock fields, so identical runs give identical files.
    assert a.sha256 == b.sha256
    # A finished run returns at once without training again.
    assert _train(data, tmp_path / "a", config) == straight
    assert load_detector(straight).sha256 == a.sha256


def test_resume_refuses_changed_settings(data, tmp_path):
    _train(data, tmp_path, _config(), stop_after_steps=2)
    with pytest.raises(ConfigError) as info:
        _train(data, tmp_path, _config(lr=0.01))
    assert "lr=0.02" in str(info.value) and "\n" not in str(info.value)


def test_time_budget_stops_early_with_a_final_checkpoint(data, tmp_path):
    path = _train(data, tmp_path, _config(max_steps=50, time_budget_s=1e-6))
    assert path == tmp_path / "detector.pt"
    meta = load_detector(path).meta
    assert meta["stopped_by_time_budget"] and meta["steps_done"] == 1 and meta["total_steps"] == 50


def test_lr_schedule_hand_values():
    cfg = DetectorTrainConfig(max_steps=100, lr=0.1, warmup_steps=10, warmup_start_factor=0.01, time_budget_s=None)
    assert lr_at(cfg, step=0, total_steps=100) == pytest.approx(0.1 * 0.01)
    # Half-way through warm-up: factor 0.01*0.5 + 0.5 = 0.505, cosine(5/100) = 0.5(1+cos(0.05 pi)).
    assert lr_at(cfg, step=5, total_steps=100) == pytest.approx(0.1 * 0.505 * 0.5 * (1 + math.cos(0.05 * math.pi)))
    assert lr_at(cfg, step=50, total_steps=100) == pytest.approx(0.05)
    step_cfg = DetectorTrainConfig(
        max_steps=100, lr=0.1, warmup_steps=0, schedule="step", step_milestones=(0.5, 0.8), time_budget_s=None
    )
    values = [lr_at(step_cfg, step=s, total_steps=100) for s in (0, 49, 50, 79, 80, 99)]
    assert values == pytest.approx([0.1, 0.1, 0.01, 0.01, 0.001, 0.001])


def test_sampling_covers_each_epoch_once_and_splits_ranks():
    n, b, w = 10, 2, 2
    seen = [
        i
        for s in range(5)
        for r in range(w)
        for i in batch_indices(seed=1, step=s, rank=r, batch_size=b, world=w, num_images=n)
    ]
    assert sorted(seen[:10]) == list(range(10))  # steps 0-4 = epoch 0, every image once
    ranks = [batch_indices(seed=1, step=0, rank=r, batch_size=b, world=w, num_images=n) for r in range(w)]
    assert not set(ranks[0]) & set(ranks[1])
    assert batch_indices(seed=1, step=3, rank=1, batch_size=b, world=w, num_images=n) == batch_indices(
        seed=1, step=3, rank=1, batch_size=b, world=w, num_images=n
    )
    assert batch_indices(seed=2, step=0, rank=0, batch_size=4, world=1, num_images=50) != batch_indices(
        seed=1, step=0, rank=0, batch_size=4, world=1, num_images=50
    )
    seeds = {step_seed(seed=0, step=s, rank=r) for s in range(50) for r in range(2)}
    assert len(seeds) == 100 and all(0 <= x < 2**63 for x in seeds)


def test_config_validation_and_epochs(tmp_path):
    cfg = DetectorTrainConfig(max_steps=None, epochs=1.5, batch_size=2, processes=2, time_budget_s=None)
    assert cfg.total_steps(10) == 4  # ceil(1.5 * 10 / 4)
    assert DetectorTrainConfig.from_dict(cfg.to_dict()) == cfg
    bad = [
        dict(max_steps=10, epochs=1.0),
        dict(max_steps=None),
        dict(max_steps=0),
        dict(lr=0.0),
        dict(schedule="poly"),
        dict(step_milestones=(0.9, 0.5)),
        dict(processes=0),
        dict(hflip_prob=2.0),
        dict(time_budget_s=-1.0),
    ]
    for kwargs in bad:
        with pytest.raises(ConfigError) as info:
            DetectorTrainConfig(**kwargs)
        assert "\n" not in str(info.value)
    with pytest.raises(ConfigError, match="num_classes"):
        run_training(
            dataset=ToyShapes(num_images=2), categories=ToyShapes.categories[:2], out_dir=tmp_path,
            config=_config(), arch=tiny_arch(), progress=False,
        )


def test_train_detector_reads_a_dataset_directory(tmp_path):
    from extract.datasets.synthetic import generate
    from extract.datasets.synthetic_config import SynthConfig

    from cache_schema.runtime import sha256_file
    from extract.detectors.train import train_detector

    synth = SynthConfig(
        num_classes=6, train_images=6, val_images=10, image_size=80, min_objects=2, max_objects=4,
        min_object_frac=0.15, max_object_frac=0.45, min_visible_pixels=12, seed=3,
    )
    data_dir = generate(synth, tmp_path / "ds", progress=False, workers=1)
    path = train_detector(
        data_dir=data_dir, out_dir=tmp_path / "run", config=_config(max_steps=3),
        arch=tiny_arch(num_classes=6, image_size=80), progress=False,
    )
    loaded = load_detector(path)
    train = json.loads((data_dir / "train.json").read_text())
    expected = sorted(({"id": c["id"], "name": c["name"]} for c in train["categories"]), key=lambda c: c["id"])
    assert list(loaded.categories) == expected
    assert loaded.meta["data"]["train_json_sha256"] == sha256_file(data_dir / "train.json")
    assert loaded.meta["num_train_images"] == 6 and loaded.meta["steps_done"] == 3
    with pytest.raises(ConfigError, match="num_classes"):
        train_detector(data_dir=data_dir, out_dir=tmp_path / "x", config=_config(), arch=tiny_arch(), progress=False)


@pytest.mark.slow
def test_two_process_ddp_is_deterministic_across_resume(data, tmp_path):
    """gloo DDP on CPU (2 spawned processes): an interrupted + resumed run equals a straight one."""
    config = _config(max_steps=4, processes=2)
    straight = _train(data, tmp_path / "a", config)
    assert _train(data, tmp_path / "b", config, stop_after_steps=2) == tmp_path / "b" / "last.pt"
    resumed = _train(data, tmp_path / "b", config)
    a, b = load_detector(straight), load_detector(resumed)
    assert a.meta["global_batch"] == 4 and a.meta["steps_done"] == 4
    assert a.meta["loss_history"] == b.meta["loss_history"] and a.sha256 == b.sha256


class _BrokenImage(ToyShapes):
    """A toy set whose image 5 is unreadable, as a dataset raises for a missing file."""

    def __getitem__(self, index):
        if index == 5:
            from cache_schema.errors import DatasetError

            raise DatasetError("image 5 is missing; regenerate the dataset")
        return super().__getitem__(index)


@pytest.mark.slow
def test_a_worker_error_reaches_the_caller_with_its_type(tmp_path):
    from cache_schema.errors import DatasetError

    data = _BrokenImage(num_images=8, seed=0)
    with pytest.raises(DatasetError, match="image 5 is missing"):
        _train(data, tmp_path, _config(max_steps=4, processes=2))
    assert not list(tmp_path.glob(".train_error.*"))

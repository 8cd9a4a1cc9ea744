"""Head-training config: TOML loading, strict keys, name validation, overrides, round trip."""

from __future__ import annotations

import json
import math

import pytest

from cache_schema.errors import ConfigError
from heads.combine import Combination
from heads.config import (ScheduleConfig, TrainConfig, config_from_dict, config_to_dict, dump_toml, load_config,
                          training_identity)


def _write(tmp_path, text):
    p = tmp_path / "c.toml"
    p.write_text(text)
    return p


def test_defaults_are_simcal_calibration():
    cfg = load_config(None)
    assert (cfg.sampler.name, cfg.sampler.classes_per_batch, cfg.sampler.images_per_class) == ("bilevel", 16, 1)
    assert cfg.sampler.background_ratio == 1.0 and cfg.loss.name == "ce" and cfg.head.name == "3fc_ft"
    s = cfg.schedule
    assert (s.lr, s.momentum, s.milestones, s.max_steps) == (0.01, 0.9, (8000, 11000), 12000)
    assert [s.lr_at(k) for k in (0, 7999, 8000, 10999, 11000, 11999)] == pytest.approx(
        [0.01, 0.01, 0.001, 0.001, 0.0001, 0.0001])


def test_warmup_is_linear_from_the_ratio():
    s = ScheduleConfig(lr=0.01, warmup_steps=10, warmup_ratio=0.5, milestones=(100,), max_steps=200)
    assert s.lr_at(0) == pytest.approx(0.005) and s.lr_at(5) == pytest.approx(0.0075) and s.lr_at(10) == 0.01


def test_toml_file_and_overrides(tmp_path):
    path = _write(tmp_path, '[sampler]\nname = "rfs"\nimages_per_batch = 8\n[schedule]\nmilestones = [5, 9]\n'
                            'max_steps = 10\n[loss]\nname = "focal"\n')
    cfg = load_config(path, {"schedule.lr": "0.02", "sampler.max_rois": "300", "loss": {"focal_gamma": 2},
                             "loss.train_background": "false", "eval.bins": "20,400,8000"})
    assert cfg.sampler.name == "rfs" and cfg.sampler.images_per_batch == 8 and cfg.sampler.max_rois == 300
    assert cfg.schedule.lr == 0.02 and cfg.schedule.milestones == (5, 9) and cfg.loss.focal_gamma == 2.0
    assert cfg.loss.train_background is False and cfg.eval.bins == (20, 400, 8000)


def test_dump_toml_round_trips(tmp_path):
    cfg = load_config(None, {"head.name": "2fc_rand", "head.hidden": 64, "loss.name": "gol", "run.seed": 7})
    assert load_config(_write(tmp_path, dump_toml(cfg))) == cfg
    assert isinstance(cfg, TrainConfig)


def test_unknown_keys_sections_and_names_are_named(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown key sampler\.classes; valid keys of \[sampler\]: name, batch_rois"):
        load_config(_write(tmp_path, "[sampler]\nclasses = 3\n"))
    with pytest.raises(ConfigError, match=r"unknown config section \[optim\]; valid sections: sampler, loss"):
        load_config(_write(tmp_path, "[optim]\nlr = 1\n"))
    with pytest.raises(ConfigError, match="sampler.name = 'uniform' is unknown; valid: random, class_balanced, bilevel, rfs"):
        load_config(None, {"sampler.name": "uniform"})
    with pytest.raises(ConfigError, match="loss.name = 'hinge' is unknown; valid: ce, reweight, focal, margin, gumbel, gol"):
        load_config(None, {"loss.name": "hinge"})
    with pytest.raises(ConfigError, match="valid: 3fc_ft, 2fc_rand, 3fc_rand, last2fc, lastfc, ncm"):
        load_config(None, {"head.name": "big"})


def test_bad_values_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="schedule.lr must be a number"):
        load_config(None, {"schedule.lr": "fast"})
    with pytest.raises(ConfigError, match="run.seed must be an integer"):
        load_config(None, {"run.seed": 1.5})
    with pytest.raises(ConfigError, match="milestones"):
        load_config(None, {"schedule.milestones": "9,5"})
    with pytest.raises(ConfigError, match="section.key"):
        load_config(None, {"lr": 1})
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(_write(tmp_path, "[sampler\n"))
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.toml")
    with pytest.raises(ConfigError, match="true or false"):
        load_config(None, {"sampler.class_replacement": "maybe"})


# ----------------------------------------------------------------------------- [combine]


def test_combine_section_from_toml_and_overrides(tmp_path):
    path = _write(tmp_path, '[combine]\nrule = "sel"\nT = 100\nboundary = "lt"\nthr = 0.05\nscale_ratio = "orig/cal"\n')
    cfg = load_config(path)
    assert cfg.combine == Combination(rule="sel", T=100.0, boundary="lt", thr=0.05, scale_ratio="orig/cal")
    over = load_config(path, {"combine.T": "inf", "combine.rule": "sel-thr", "combine.thr": "0.5"})
    assert (over.combine.T, over.combine.rule, over.combine.thr, over.combine.boundary) == (math.inf, "sel-thr", 0.5, "lt")
    assert load_config(None).combine == Combination()


@pytest.mark.parametrize("combine", [Combination(rule="sel-scale", T=math.inf, boundary="lt", thr=0.3, scale_ratio="orig/cal"),
                                     Combination(rule="avg", T=0)])
def test_combine_round_trips_through_toml_and_json(combine, tmp_path):
    cfg = load_config(None, {"combine": combine.to_dict(), "run.seed": 3})
    assert cfg.combine == combine
    assert load_config(_write(tmp_path, dump_toml(cfg))) == cfg  # TOML writes inf as inf
    d = config_to_dict(cfg)
    assert config_from_dict(json.loads(json.dumps(d, allow_nan=False))) == cfg  # JSON: T = "inf"


def test_combine_is_not_part_of_the_training_identity():
    """A post-training setting: changing it must not refuse resuming an interrupted run."""
    base = load_config(None)
    other = load_config(None, {"combine.rule": "sel-thr", "combine.T": "7", "combine.boundary": "lt",
                               "combine.thr": "0.4", "combine.scale_ratio": "orig/cal"})
    assert training_identity(other) == training_identity(base)
    assert "combine" not in json.dumps(training_identity(base))


@pytest.mark.parametrize("override,words", [
    ({"combine.rule": "bogus"}, ["bogus", "sel-thr"]),
    ({"combine.T": "many"}, ["combine.T", "many"]),
    ({"combine.boundary": "lte"}, ["lte", "le"]),
    ({"combine.boundary": 3}, ["combine.boundary", "'le', 'lt'"]),
    ({"combine.scale_ratio": "x"}, ["x", "orig/cal"]),
    ({"combine.thr": "2"}, ["thr=2.0"]),
    ({"combine.mode": "sel"}, ["combine.mode", "rule, T, boundary, thr, scale_ratio"]),
])
def test_bad_combine_settings_are_one_line_config_errors(override, words):
    with pytest.raises(ConfigError) as info:
        load_config(None, override)
    assert "\n" not in str(info.value) and all(w in str(info.value) for w in words), str(info.value)

"""Grid files of ``heads sweep`` (issue 12): parsing, expansion order, identities, one-line errors.

Pure tests: no store, no training.
"""

from __future__ import annotations

import math
import tomllib
from pathlib import Path

import pytest

from cache_schema.errors import ConfigError
from heads.sweep.grid import config_fields, grid_from_dict, load_grid
from heads.sweep.identity import train_id, trial_id

FINGERPRINT = {"identity": {"detector_sha256": "0" * 64}, "splits": {"train": {"images": 3}}}


def grid(text: str, tmp_path: Path | None = None):
    return grid_from_dict(tomllib.loads(text), base_dir=tmp_path or Path("."), text=text)


def message(text: str, tmp_path: Path | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        grid(text, tmp_path)
    msg = str(info.value)
    assert "\n" not in msg
    return msg


def test_cross_axes_expand_in_declared_order_first_axis_slowest():
    g = grid('[[axis]]\nfield = "sampler.name"\nvalues = ["bilevel", "rfs"]\n'
             '[[axis]]\nfield = "run.seed"\nvalues = [0, 1, 2]\n')
    got = [(t.config.sampler.name, t.config.run.seed) for t in g.trials]
    assert got == [("bilevel", 0), ("bilevel", 1), ("bilevel", 2), ("rfs", 0), ("rfs", 1), ("rfs", 2)]
    assert [t.index for t in g.trials] == list(range(6))
    assert g.trials[4].value_dict() == {"sampler.name": "rfs", "run.seed": 1}
    assert g.varied_fields == ("sampler.name", "run.seed")


def test_zip_axis_varies_its_fields_together_and_crosses_the_others():
    g = grid('[[axis]]\nzip = { "schedule.max_steps" = [1000, 3000], '
             '"schedule.milestones" = [[700, 900], [2000, 2750]] }\n'
             '[[axis]]\nfield = "combine.T"\nvalues = [100, inf]\n')
    got = [(t.config.schedule.max_steps, t.config.schedule.milestones, t.config.combine.T) for t in g.trials]
    assert got == [(1000, (700, 900), 100.0), (1000, (700, 900), math.inf),
                   (3000, (2000, 2750), 100.0), (3000, (2000, 2750), math.inf)]
    assert g.trials[0].value_dict() == {"schedule.max_steps": 1000, "schedule.milestones": [700, 900],
                                        "combine.T": 100}
    assert grid(g.text).trials == g.trials  # deterministic


def test_no_axis_is_one_trial_the_base():
    g = grid("[base.schedule]\nmax_steps = 50\nmilestones = [40]\n")
    assert len(g.trials) == 1 and g.trials[0].config.schedule.max_steps == 50 and g.trials[0].label == "base"


def test_base_file_relative_to_the_grid_and_inline_sections_override_it(tmp_path):
    (tmp_path / "run.toml").write_text('[sampler]\nname = "rfs"\n[schedule]\nlr = 0.05\nmax_steps = 99\n')
    (tmp_path / "a.toml").write_text('base = "run.toml"\n')
    (tmp_path / "b.toml").write_text('[base]\nfile = "run.toml"\n[base.schedule]\nlr = 0.2\n')
    a, b = load_grid(tmp_path / "a.toml"), load_grid(tmp_path / "b.toml")
    assert (a.base.sampler.name, a.base.schedule.lr, a.base.schedule.max_steps) == ("rfs", 0.05, 99)
    assert (b.base.sampler.name, b.base.schedule.lr, b.base.schedule.max_steps) == ("rfs", 0.2, 99)
    assert a.source == str(tmp_path / "a.toml") and a.text == 'base = "run.toml"\n'


def test_top_level_config_sections_override_the_base_file(tmp_path):
    (tmp_path / "run.toml").write_text('[sampler]\nname = "rfs"\n[schedule]\nlr = 0.05\nmax_steps = 99\n')
    (tmp_path / "c.toml").write_text('base = "run.toml"\n[schedule]\nlr = 0.3\n[combine]\nrule = "cal-only"\n'
                                     '[[axis]]\nfield = "run.seed"\nvalues = [0, 1]\n')
    c = load_grid(tmp_path / "c.toml")
    assert (c.base.sampler.name, c.base.schedule.lr, c.base.schedule.max_steps, c.base.combine.rule) == \
        ("rfs", 0.3, 99, "cal-only")
    assert [t.config.schedule.lr for t in c.trials] == [0.3, 0.3]


def test_post_training_axes_share_the_train_id():
    g = grid('[[axis]]\nfield = "sampler.name"\nvalues = ["bilevel", "rfs"]\n'
             '[[axis]]\nfield = "combine.T"\nvalues = [10, 300]\n'
             '[[axis]]\nfield = "combine.rule"\nvalues = ["sel", "sel-norm"]\n')
    heads = [train_id(t.config, FINGERPRINT) for t in g.trials]
    trials = [trial_id(t.config, h, bins="lvis", evaluator="auto") for t, h in zip(g.trials, heads)]
    assert len(set(heads)) == 2 and len(set(trials)) == 8
    assert heads[:4] == [heads[0]] * 4
    other_store = {**FINGERPRINT, "splits": {"train": {"images": 4}}}
    assert train_id(g.trials[0].config, other_store) != heads[0]


def test_unknown_field_lists_the_valid_fields():
    msg = message('[[axis]]\nfield = "sampler.nam"\nvalues = [1]\n')
    assert "axis 1" in msg and "'sampler.nam'" in msg and "sampler.name, sampler.batch_rois" in msg
    msg = message('[[axis]]\nfield = "nope.key"\nvalues = [1]\n')
    assert "combine.T" in msg and "schedule.max_steps" in msg
    assert {"combine.rule", "run.seed", "fasa.enabled", "head.name"} <= set(config_fields())


def test_unknown_choice_value_names_the_axis_and_lists_the_valid_values():
    msg = message('[[axis]]\nfield = "run.seed"\nvalues = [0]\n[[axis]]\nfield = "sampler.name"\nvalues = ["bilevel", "nope"]\n')
    assert "axis 2 (sampler.name)" in msg and "'nope'" in msg and "random, class_balanced, bilevel, rfs" in msg
    msg = message('[[axis]]\nfield = "combine.rule"\nvalues = ["zzz"]\n')
    assert "axis 1 (combine.rule)" in msg and "orig, cal-only" in msg
    msg = message('[[axis]]\nfield = "schedule.lr"\nvalues = ["fast"]\n')
    assert "axis 1 (schedule.lr)" in msg and "must be a number" in msg


@pytest.mark.parametrize("text, expected", [
    ('[[axis]]\nfield = "sampler.name"\nvalues = []\n', "sampler.name has no values"),
    ('[[axis]]\nzip = { "schedule.max_steps" = [1, 2], "schedule.lr" = [0.1] }\n',
     "unequal lengths (schedule.max_steps: 2, schedule.lr: 1)"),
    ('[[axis]]\nfield = "run.seed"\nvalues = [1]\n[[axis]]\nzip = { "run.seed" = [2] }\n',
     "field run.seed is on axis 1 and axis 2"),
    ('[[axis]]\nfield = "run.device"\nvalues = ["cpu", "cuda"]\n', "would train the same head and score it the same way"),
    ('[[axis]]\nfield = "sampler.name"\nvalues = ["rfs"]\nzip = { "run.seed" = [1] }\n', "either field + values or zip"),
    ('[[axis]]\nvalues = [1]\n', 'needs field = "section.key"'),
    ('[[axis]]\nfield = "run.seed"\nvalues = 3\n', "values must be a list"),
    ('axes = 1\n', "unknown key 'axes'; valid top-level keys: base, sweep, axis and the config sections sampler"),
    ('[base.run]\nseed = 1\n[run]\nseed = 2\n', "run.seed is set in both [base.run] and [run]"),
    ('[sweep]\nbins = "coco"\n', "bins = 'coco' is unknown; valid: lvis, coco-lt"),
    ('[base.sampler]\nname = "x"\n', "base: sampler.name = 'x' is unknown"),
    ('base = "missing.toml"\n', "missing.toml does not exist"),
    ('[base.schedule]\nmax_steps = 10\n[[axis]]\nfield = "eval.snapshots"\nvalues = [[20]]\n',
     "axis 1 (eval.snapshots) value eval.snapshots=[20]"),
])
def test_bad_grids_give_one_line(text, expected, tmp_path):
    assert expected in message(text, tmp_path)


def test_missing_or_invalid_grid_file(tmp_path):
    with pytest.raises(ConfigError, match="grid file .*nope.toml does not exist"):
        load_grid(tmp_path / "nope.toml")
    (tmp_path / "bad.toml").write_text("[[axis]\n")
    with pytest.raises(ConfigError, match="is not valid TOML"):
        load_grid(tmp_path / "bad.toml")

"""Every shipped sweep (``sweeps/*.toml``, docs/ablations.md) loads as a grid whose trials share
the shipped base and vary what the file's axes name."""

from __future__ import annotations

from pathlib import Path

import pytest

from heads.config import load_config
from heads.sweep.grid import load_grid

SWEEPS = Path(__file__).resolve().parents[1] / "sweeps"
GRIDS = sorted(p for p in SWEEPS.glob("*.toml") if p.name != "_base.toml")


def test_every_shipped_sweep_is_listed():
    assert {p.stem for p in GRIDS} >= {"T_sweep", "combine_rules", "fasa_table1", "gol_gumbel", "head_design",
                                       "learning_rate", "simcal_table4", "tradeoff"}


@pytest.mark.parametrize("path", GRIDS, ids=lambda p: p.stem)
def test_shipped_sweep_loads_on_the_shipped_base(path):
    grid = load_grid(path)
    assert len(grid.trials) >= 2 and grid.axes
    base = load_config(SWEEPS / "_base.toml", None)
    varied = {f for axis in grid.axes for f in axis.fields}
    for trial in grid.trials:
        # What no axis names is the base's (schedule, seed, sampler... unless varied).
        if "schedule.max_steps" not in varied:
            assert trial.config.schedule.max_steps == base.schedule.max_steps
        if "run.seed" not in varied:
            assert trial.config.run.seed == base.run.seed
    labels = [t.label for t in grid.trials]
    assert len(set(labels)) == len(labels)  # every trial is a distinct point of the grid

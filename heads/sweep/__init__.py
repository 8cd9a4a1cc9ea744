"""``heads sweep``: many head configurations over one store, each trained once, scored by cached
evaluation and tabulated (docs/sweeps.md).

Modules: :mod:`~heads.sweep.grid` (the grid file and its expansion into trials),
:mod:`~heads.sweep.identity` (content addresses of heads and trials), :mod:`~heads.sweep.jobs`
(what a worker runs: train one head, score one trial), :mod:`~heads.sweep.backends` (local
processes sharing the loaded features, or Ray tasks), :mod:`~heads.sweep.runner` (up-front checks,
scheduling, resume), :mod:`~heads.sweep.results` (the directory's records),
:mod:`~heads.sweep.tables` (table.csv / table.md), :mod:`~heads.sweep.progress`,
:mod:`~heads.sweep.cli` (the typer sub-app); :mod:`~heads.sweep.plots`,
:mod:`~heads.sweep.diagnostics` and :mod:`~heads.sweep.tensorboard` draw what the results hold.
"""

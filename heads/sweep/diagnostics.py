"""Per-class diagnostics of trained heads, for the sweep plots (:mod:`heads.sweep.plots`).

- :func:`classifier_weight_norms`: the L2 norm of each class's classifier row (FASA Fig. 4:
  long-tail training leaves tail classes with small norms, hence small scores).
- :func:`mean_class_scores`: each class's mean true-class probability on its val RoIs (FASA
  Fig. 1b: the same bias, seen in the scores).
- :func:`snapshot_dynamics`: cached AP per bin of each head snapshot a run kept
  (``eval.snapshots``, :func:`heads.train.snapshot_paths`): SimCal Fig. 4a.

The val RoIs come from :class:`~heads.evaluation.EvalInputs` (``heads.pipeline.load_eval_inputs``):
a sweep loads them once and shares them with its workers instead of reading the store per head.

:func:`trial_diagnostics` / :func:`snapshot_dynamics` return plain JSON types (NaN written as
``None``): what a sweep result's ``"diagnostics"`` holds and ``write_plots`` reads.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from torch import nn

from cache_schema.errors import ConfigError, SchemaError
from heads.combine import Combination
from heads.evaluation import BinSpec, EvalInputs
from heads.evaluation.scoring import LoadedHead, head_level, load_head_matching, score_rois
from heads.models import HeadSpec, classifier_of
from heads.pipeline import evaluate_with_inputs
from heads.train import snapshot_paths


def classifier_weight_norms(head: nn.Module, spec: HeadSpec) -> np.ndarray:
    """float64 ``[C]``: the L2 norm of each foreground class's row of the final classifier.

    MLP heads (``3fc_ft``, ``2fc_rand``, ``3fc_rand``, ``lastfc``) and ``last2fc``: rows
    ``0..C-1`` of ``cls.weight`` (``[C+1, D]``; the background row C and the bias are left out).
    ``ncm``: the norm of the class mean ``means[c]`` (its prototype), NaN for a class without
    train RoIs. With ``ncm_metric = "cosine"`` the logits normalise the means, so there the norm
    describes the class's mean feature, not a scale of its scores.
    """
    c = spec.num_classes
    cls = classifier_of(head)
    if cls is not None:
        rows = cls.weight[:c]
    elif spec.name == "ncm":
        rows = head.means[:c]
    else:  # pragma: no cover - every head of heads.models is one of the two
        raise ConfigError(f"head {spec.name} has no classifier rows to measure")
    norms = rows.detach().cpu().double().norm(dim=1).numpy()
    if spec.name == "ncm":
        norms[~head.present[:c].cpu().numpy()] = np.nan
    return norms


def mean_class_scores(probs: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """float64 ``[C]``: for each class c, the mean of ``probs[n, c]`` over the foreground RoIs n
    labelled c.

    Args:
        probs: float32 ``[N, C+1]`` class probabilities (background last), e.g. of val RoIs.
        labels: int64 ``[N]`` matched labels in ``0..C`` (``C`` = background, left out).
        num_classes: ``C``.
    Classes without a labelled RoI get NaN (no evidence, not a zero score).
    """
    probs, labels = np.asarray(probs), np.asarray(labels, dtype=np.int64)
    if probs.ndim != 2 or probs.shape != (len(labels), num_classes + 1):
        raise SchemaError(f"mean_class_scores: probs {probs.shape} must be [N, C+1] = [{len(labels)}, {num_classes + 1}]")
    fg = (labels >= 0) & (labels < num_classes)
    y = labels[fg]
    true_class = probs[np.flatnonzero(fg), y].astype(np.float64)
    total = np.bincount(y, weights=true_class, minlength=num_classes)
    count = np.bincount(y, minlength=num_classes)
    return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def json_floats(values: np.ndarray) -> list[float | None]:
    """A float array as a JSON list, NaN/Inf as ``None`` (result files are strict JSON)."""
    return [float(v) if math.isfinite(v) else None for v in np.asarray(values, dtype=np.float64).tolist()]


def val_class_scores(inputs: EvalInputs, head_path: Path, *, device: str = "cpu") -> tuple[np.ndarray, np.ndarray]:
    """``(probs float32 [N, C+1], labels int64 [N])`` of the foreground val RoIs of ``inputs``
    (``heads.pipeline.load_eval_inputs``, with the head's level) under the head at ``head_path``
    (a run folder or a head file)."""
    return _class_scores(inputs, _load(inputs, head_path), device=device)


def _load(inputs: EvalInputs, head_path: Path) -> LoadedHead:
    return load_head_matching(head_path, identity=inputs.store_identity, store_path=inputs.store_path)


def _class_scores(inputs: EvalInputs, loaded: LoadedHead, *, device: str) -> tuple[np.ndarray, np.ndarray]:
    val = inputs.rois(head_level(loaded))
    fg = torch.nonzero(val.labels < loaded.spec.num_classes).squeeze(1)
    probs = score_rois(loaded, val.features[fg], device=torch.device(device))
    return probs.numpy(), val.labels[fg].numpy()


def trial_diagnostics(inputs: EvalInputs, head_path: Path, *, device: str = "cpu") -> dict:
    """``{"weight_norms", "mean_scores", "instance_count"}``: three JSON lists of length C (class
    order of the store) — :func:`classifier_weight_norms`, :func:`mean_class_scores` on the val
    foreground RoIs of ``inputs`` (loaded with the head's level), and the training instances per class."""
    loaded = _load(inputs, head_path)
    probs, labels = _class_scores(inputs, loaded, device=device)
    c = loaded.spec.num_classes
    return {"weight_norms": json_floats(classifier_weight_norms(loaded.head, loaded.spec)),
            "mean_scores": json_floats(mean_class_scores(probs, labels, c)),
            "instance_count": [int(v) for v in inputs.class_info.instance_count]}


#: The calibrated head alone: what SimCal Fig. 4a follows during calibration.
CAL_ONLY = Combination(rule="cal-only")


def snapshot_dynamics(*, inputs: EvalInputs, run_dir: Path, combination: Combination = CAL_ONLY,
                      bins: BinSpec | None = None, device: str | None = None) -> list[dict]:
    """``[{"step": s, "rows": {rule: Metrics.to_dict()}}]`` by increasing step: cached evaluation
    (on ``inputs``, loaded with the run's level) of each snapshot in ``run_dir/snapshots``
    combined by ``combination`` (default ``cal-only``, the calibrated head alone, as SimCal Fig.
    4a). Empty when the run kept no snapshot."""
    out = []
    for step, path in snapshot_paths(run_dir).items():
        outcome = evaluate_with_inputs(inputs=inputs, head=path, combinations=(combination,), out_dir=None, bins=bins,
                                       device=device, progress=False)
        out.append({"step": step, "rows": {rule: m.to_dict() for rule, m in outcome.rows.items()}})
    return out


__all__ = [
    "classifier_weight_norms",
    "json_floats",
    "mean_class_scores",
    "snapshot_dynamics",
    "trial_diagnostics",
    "val_class_scores",
]

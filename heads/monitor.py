"""Training-time monitor: RoI classification accuracy on validation RoIs, per instance-count bin.

Only foreground val RoIs are scored (the question is "which class", not "object or not"); a
RoI counts as correct when the arg-max of its ``C+1`` scores is its class (predicting background
is wrong). Bins follow the AP1..AP4 convention: class ``c`` is in bin ``k`` when
``edges[k-1] <= instance_count[c] < edges[k]`` (edges ``(10, 100, 1000)`` → (0,10), [10,100),
[100,1000), [1000,∞)). Numbers are RoI-weighted within a bin.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from cache_schema.errors import SchemaError
from cache_schema.records import ClassInfo, RoiSet
from heads.models import HeadSpec, head_scores
from heads.samplers import step_rng
from heads.sources import check_finite

_STREAM_VAL_SUBSET = 9


@dataclass(frozen=True, kw_only=True, eq=False)
class ValRois:
    """Foreground val RoIs prepared once: features (stored dtype), labels and bin of each."""

    features: torch.Tensor
    labels: torch.Tensor
    bins: torch.Tensor
    num_bins: int


def class_bins(instance_count: np.ndarray, edges: tuple[int, ...]) -> np.ndarray:
    """Bin (0-based) of each class by its training instance count."""
    return np.searchsorted(np.asarray(edges), instance_count, side="right").astype(np.int64)


def prepare_val(val: RoiSet, *, class_info: ClassInfo, edges: tuple[int, ...], max_rois: int, seed: int) -> ValRois:
    """Keep foreground rows of ``val`` (a seeded subsample of ``max_rois`` when > 0)."""
    if val.features is None:
        raise SchemaError("validation RoIs have no features; load the val split with the head's level")
    labels = val.labels.detach().cpu().numpy()
    if len(labels) and (labels.min() < 0 or labels.max() > class_info.num_classes):
        raise SchemaError(f"validation RoI labels span {labels.min()}..{labels.max()} but C={class_info.num_classes}; "
                          f"load val from the same store as train")
    fg = np.flatnonzero(labels < class_info.num_classes)
    if max_rois and len(fg) > max_rois:
        fg = np.sort(step_rng(seed, _STREAM_VAL_SUBSET, 0).choice(fg, size=max_rois, replace=False))
    idx = torch.from_numpy(fg)
    bins = class_bins(class_info.instance_count, edges)[labels[fg]]
    return ValRois(features=val.features[idx.to(val.features.device)], labels=torch.from_numpy(labels[fg]),
                   bins=torch.from_numpy(bins), num_bins=len(edges) + 1)


@torch.no_grad()
def val_accuracy(head: nn.Module, spec: HeadSpec, val: ValRois, *, device: torch.device, batch_rois: int) -> dict:
    """``{"acc_fg", "acc_bin1".., "n_bin1"..}``; a bin without RoIs reports ``None``."""
    was_training = head.training
    head.eval()
    correct = []
    for start in range(0, len(val.labels), batch_rois):
        x = val.features[start:start + batch_rois].to(device).float()
        check_finite(x, what="validation")
        pred = head_scores(spec, head(x)).argmax(1).cpu()
        correct.append(pred == val.labels[start:start + batch_rois])
    head.train(was_training)
    hit = torch.cat(correct) if correct else torch.zeros(0, dtype=torch.bool)
    out: dict = {"acc_fg": float(hit.float().mean()) if len(hit) else None}
    for k in range(val.num_bins):
        sel = val.bins == k
        n = int(sel.sum())
        out[f"acc_bin{k + 1}"] = float(hit[sel].float().mean()) if n else None
        out[f"n_bin{k + 1}"] = n
    return out


@torch.no_grad()
def per_class_val_loss(head: nn.Module, spec: HeadSpec, val: ValRois, *, num_classes: int, device: torch.device,
                       batch_rois: int) -> torch.Tensor:
    """Mean of −log(score of the true class) per class, float64 ``[C]``; NaN for classes without
    val RoIs (FASA's adaptation signal)."""
    was_training = head.training
    head.eval()
    total = torch.zeros(num_classes, dtype=torch.float64)
    for start in range(0, len(val.labels), batch_rois):
        x = val.features[start:start + batch_rois].to(device).float()
        y = val.labels[start:start + batch_rois]
        p = head_scores(spec, head(x)).cpu().double().gather(1, y[:, None]).squeeze(1)
        total.index_add_(0, y, -torch.log(p.clamp(min=1e-12)))
    head.train(was_training)
    count = torch.bincount(val.labels, minlength=num_classes).double()
    return torch.where(count > 0, total / count.clamp(min=1), torch.full_like(total, float("nan")))

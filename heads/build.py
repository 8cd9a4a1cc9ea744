"""Config → objects: the one place where settings become samplers, losses and heads.

Why a separate module: samplers, losses and heads take explicit keyword arguments and know
nothing of the config classes; this module maps each config field to its argument by name.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from cache_schema.errors import ConfigError, SchemaError
from cache_schema.records import ClassInfo
from heads.config import HeadConfig, LossConfig, SamplerConfig, TrainConfig
from heads.losses import GUMBEL_LOSSES, GumbelOptimised, Gumbel, LOSSES, Focal, Margin, Reweighted
from heads.models import HEADS, HeadSpec, NCMHead, build_head, classifier_of
from heads.samplers import (BilevelSampler, ClassBalancedSampler, RandomSampler, RepeatFactorSampler)
from heads.sources import RoiIndex, RoiSource, check_finite

#: Heads whose classifier starts from the detector's (the rest are randomly initialised).
DETECTOR_INIT_HEADS = ("3fc_ft", "last2fc", "lastfc")
DEFAULT_HIDDEN = 1024


def build_sampler(cfg: SamplerConfig, *, index: RoiIndex, class_info: ClassInfo, seed: int):
    """The sampler ``cfg.name`` names, with that sampler's settings from ``cfg``."""
    if cfg.name == "random":
        return RandomSampler(index=index, seed=seed, batch_rois=cfg.batch_rois)
    if cfg.name == "class_balanced":
        return ClassBalancedSampler(index=index, seed=seed, batch_rois=cfg.batch_rois,
                                    background_ratio=cfg.background_ratio)
    if cfg.name == "bilevel":
        return BilevelSampler(index=index, class_info=class_info, seed=seed, classes_per_batch=cfg.classes_per_batch,
                              images_per_class=cfg.images_per_class, replacement=cfg.class_replacement,
                              keep=cfg.keep, background_ratio=cfg.background_ratio)
    if cfg.name == "rfs":
        return RepeatFactorSampler(index=index, class_info=class_info, seed=seed, threshold=cfg.rfs_threshold,
                                   images_per_batch=cfg.images_per_batch, max_rois=cfg.max_rois)
    raise ConfigError(f"unknown sampler {cfg.name!r}")  # pragma: no cover - config validates


def build_loss(cfg: LossConfig, *, class_info: ClassInfo, num_train_images: int):
    """The loss ``cfg.name`` names, bound to the class statistics it needs."""
    clip = (cfg.gumbel_clip_min, cfg.gumbel_clip_max)
    if cfg.name == "reweight":
        return Reweighted(class_info=class_info, base=cfg.reweight_base, min_weight=cfg.reweight_min,
                          max_weight=cfg.reweight_max, background_weight=cfg.background_weight)
    if cfg.name == "focal":
        return Focal(class_info=class_info, gamma=cfg.focal_gamma, alpha=cfg.focal_alpha)
    if cfg.name == "margin":
        return Margin(class_info=class_info, c=cfg.margin_c)
    if cfg.name == "gumbel":
        return Gumbel(class_info=class_info, sigma=cfg.gumbel_sigma, clip=clip, train_background=cfg.train_background)
    if cfg.name == "gol":
        return GumbelOptimised(class_info=class_info, num_train_images=num_train_images, sigma=cfg.gumbel_sigma,
                               clip=clip, train_background=cfg.train_background, lam=cfg.gol_lambda,
                               tail_by=cfg.gol_tail_by, background_mode=cfg.gol_background_mode,
                               clamp_max=cfg.gol_clamp_max)
    return LOSSES[cfg.name](class_info=class_info)


def _hidden_width(cfg: HeadConfig, init_state: dict | None) -> int:
    if cfg.name in ("lastfc", "ncm"):
        return 0
    if cfg.name in ("3fc_ft", "last2fc"):
        if init_state is None or "fc6.weight" not in init_state:
            raise ConfigError(f"head {cfg.name} starts from the detector's box head; pass its weights "
                              f"(fc6/fc7/cls) or choose head.name = 2fc_rand/3fc_rand")
        width = int(init_state["fc6.weight"].shape[0])
        if cfg.hidden and cfg.hidden != width:
            raise ConfigError(f"head.hidden = {cfg.hidden} but the detector's fc width is {width}; "
                              f"set head.hidden = 0 (detector width) for {cfg.name}")
        return width
    if cfg.hidden:
        return cfg.hidden
    if init_state is not None and "fc6.weight" in init_state:
        return int(init_state["fc6.weight"].shape[0])
    return DEFAULT_HIDDEN


def make_head_spec(config: TrainConfig, *, feature_shape: tuple[int, ...], num_classes: int,
                   init_state: dict | None, init_from: str | None, loss) -> HeadSpec:
    """The :class:`HeadSpec` of the head ``config`` asks for, on features of ``feature_shape``."""
    hc = config.head
    level = HEADS[hc.name].level
    if level == "fc" and len(feature_shape) != 1:
        raise ConfigError(f"head {hc.name} reads the 'fc' level (one vector per RoI) but the source holds "
                          f"features of shape {tuple(feature_shape)}; load the store with level='fc'")
    if level == "pooled" and len(feature_shape) != 3:
        raise ConfigError(f"head {hc.name} reads the 'pooled' level (C×H×W per RoI) but the source holds "
                          f"features of shape {tuple(feature_shape)}; load the store with level='pooled'")
    return HeadSpec(name=hc.name, level=level, in_shape=tuple(feature_shape), num_classes=num_classes,
                    hidden=_hidden_width(hc, init_state), loss=config.loss.name,
                    init_from=init_from if hc.name in DETECTOR_INIT_HEADS else None,
                    gumbel_sigma=config.loss.gumbel_sigma, background_score=loss.background_score,
                    ncm_metric=hc.ncm_metric, ncm_scale=hc.ncm_scale)


def build_training_head(spec: HeadSpec, *, cfg: HeadConfig, init_state: dict | None, seed: int, loss) -> nn.Module:
    """Build, initialise, then apply the loss's classifier init where ``cfg.classifier_init`` says:
    ``auto`` — random-init heads, and detector-init heads trained with a Gumbel-type loss;
    ``loss`` — every head with a classifier; ``detector`` — never.

    Why Gumbel under ``auto``: the detector's classifier was trained for softmax, whose logits
    are only meaningful relative to each other; read as Gumbel activations, η(q) = exp(−exp(−q)),
    they put most classes near 1 at once, and the per-class binary losses summed over C classes
    then stall (measured on the demo store: 3fc_ft + gumbel from the detector's classifier ended
    at 0.0 AP; with GOL's init W = 0.001, b = −log log(C+1) it trains)."""
    head = build_head(spec, init_state=init_state, seed=seed)
    cls = classifier_of(head)
    fresh = spec.name not in DETECTOR_INIT_HEADS or spec.loss in GUMBEL_LOSSES
    wants = cfg.classifier_init == "loss" or (cfg.classifier_init == "auto" and fresh)
    if cls is not None and wants:
        loss.init_classifier(cls, spec.num_classes)
    return head


def fit_ncm(head: NCMHead, *, source: RoiSource, device: torch.device, chunk_images: int = 256) -> dict:
    """One pass over every train RoI: per-class feature sums (float64) → class means. Returns
    ``{"rois": N, "classes_present": k}``."""
    c1, d = head.spec.num_classes + 1, head.spec.in_features
    sums = torch.zeros(c1, d, dtype=torch.float64, device=device)
    counts = torch.zeros(c1, dtype=torch.int64, device=device)
    index = source.index
    for start in range(0, index.num_blocks, chunk_images):
        rows = index.rows_of_blocks(np.arange(start, min(start + chunk_images, index.num_blocks)))
        if len(rows) == 0:
            continue
        feats, labels = source.gather(rows)
        x = feats.to(device).reshape(len(rows), -1).double()
        check_finite(x, what="ncm fit")
        labels = labels.to(device)
        sums.index_add_(0, labels, x)
        counts += torch.bincount(labels, minlength=c1)
    if int(counts[:-1].sum()) == 0:
        raise SchemaError("ncm: the train split has no foreground RoI (empty class set); nothing to average")
    head.to(device).set_means(sums=sums, counts=counts)
    return {"rois": int(counts.sum()), "classes_present": int((counts[:-1] > 0).sum())}

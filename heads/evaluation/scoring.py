"""A trained head for cached evaluation: loaded and checked against the store it is scored on
(:func:`load_head_matching`), and its class probabilities on RoI features (:func:`score_rois`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from cache_schema.errors import CheckpointError, ConfigError
from heads.evaluation.inputs import EvalInputs
from heads.losses import GUMBEL_LOSSES
from heads.models import head_scores, level_for_head, load_head


@dataclass(frozen=True, kw_only=True)
class LoadedHead:
    head: torch.nn.Module
    spec: object
    meta: dict
    path: Path


def load_head_matching(head_path: Path, *, identity: dict, store_path: str) -> LoadedHead:
    """Load ``head_path`` (a run directory or ``head.pt``) and refuse it unless it was trained on
    a store whose ``identity`` (``heads.pipeline.store_identity``: detector and classes) is this
    one; ``store_path`` names the store in the message. The store itself need not be open."""
    path = Path(head_path)
    path = path / "head.pt" if path.is_dir() else path
    head, spec, meta = load_head(path)
    trained_for = (meta or {}).get("store") or {}
    for key in ("detector_sha256", "category_ids"):
        if trained_for.get(key) != identity[key]:
            raise CheckpointError(
                f"head {path} was trained for another {key.split('_')[0]} than store {store_path} "
                f"({key} differs); train a head on this store with `heads train --cache {store_path}`"
            )
    return LoadedHead(head=head, spec=spec, meta=meta, path=path)


def head_level(loaded: LoadedHead) -> str:
    """The feature level the head reads (recorded with it; by its name for heads that predate the record)."""
    return loaded.meta.get("level", level_for_head(loaded.spec.name))


def head_stage(loaded: LoadedHead) -> int:
    """The cascade stage whose classifier the head replaces (0 for heads that predate the record)."""
    return int(loaded.meta.get("stage", 0))


@torch.inference_mode()
def score_rois(loaded: LoadedHead, features: torch.Tensor, *, device: torch.device,
               batch: int | None = None, logits: bool = False) -> torch.Tensor:
    """Class probabilities ``[N, C+1]`` float32 (background last) of ``features`` under the head
    (with ``logits``: the head's raw logits instead).

    ``batch`` rows at a time (default 1024 on CPU, where a float16 batch converted to float32 then
    stays in cache: 1.4x faster than 8192 rows, same values; 8192 elsewhere).
    """
    batch = batch or (1024 if device.type == "cpu" else 8192)
    head = loaded.head.to(device).eval()
    activation = (lambda x: x) if logits else (lambda x: head_scores(loaded.spec, x))
    out = [activation(head(features[i:i + batch].to(device).float())).cpu()
           for i in range(0, features.shape[0], batch)]
    return torch.cat(out) if out else torch.zeros(0, loaded.spec.num_classes + 1)


def cascade_probs(stage_logits: tuple[torch.Tensor, ...], retrained: dict[int, torch.Tensor]) -> torch.Tensor:
    """A cascade's class probabilities ``[N, C+1]`` with some stages' classifiers retrained:
    softmax of the stage logits averaged — mmdet's ``_refine_roi`` sums them in stage order and
    divides by the stage count — where stage ``k``'s logits are ``retrained[k]`` when given, else
    the detector's own ``stage_logits[k]``."""
    total = sum(retrained.get(k, own).float() for k, own in enumerate(stage_logits))
    return torch.softmax(total / float(len(stage_logits)), dim=1)


def head_paths(head: Path | Sequence[Path] | None) -> tuple[Path, ...]:
    """``--head`` given once or once per cascade stage."""
    if head is None:
        return ()
    return (Path(head),) if isinstance(head, (str, Path)) else tuple(Path(h) for h in head)


def head_features(loaded: tuple[LoadedHead, ...]) -> tuple[tuple[str, int], ...]:
    """The (level, stage) features ``loaded`` read: what :func:`load_eval_inputs` must load."""
    return tuple((head_level(h), head_stage(h)) for h in loaded)


def calibrated_probs(inputs: EvalInputs, loaded: tuple[LoadedHead, ...], device: torch.device) -> torch.Tensor:
    """The calibrated classifier's probabilities ``[N, C+1]``: one head's on a single-stage
    detector; on a cascade, the stage logits averaged with each given head in place of its
    stage's classifier (the others stay the detector's own), as the injected model scores."""
    stages = [head_stage(h) for h in loaded]
    if inputs.num_stages == 1:
        if len(loaded) != 1 or stages[0] != 0:
            what = f"{len(loaded)} heads" if len(loaded) != 1 else f"a stage-{stages[0]} head"
            raise ConfigError(f"store {inputs.store_path} is of a single-stage detector: evaluate one stage-0 head, not {what}")
        h = loaded[0]
        return score_rois(h, inputs.rois(head_level(h)).features, device=device)
    if len(set(stages)) != len(stages) or max(stages) >= inputs.num_stages:
        raise ConfigError(f"heads of stages {stages} for a {inputs.num_stages}-stage cascade; give at most one head "
                          f"per stage 0..{inputs.num_stages - 1}")
    for h in loaded:
        if h.spec.name != "ncm" and h.spec.loss in GUMBEL_LOSSES:
            raise ConfigError(f"head {h.path} scores with a {h.spec.loss} activation; a cascade averages softmax logits "
                              "over stages, so retrain its stages with a softmax loss (ce, reweight, focal, margin)")
    retrained = {head_stage(h): score_rois(h, inputs.rois(head_level(h), head_stage(h)).features, device=device,
                                           logits=True) for h in loaded}
    return cascade_probs(inputs.stage_logits, retrained)


__all__ = ["LoadedHead", "calibrated_probs", "cascade_probs", "head_features", "head_level", "head_paths", "head_stage",
           "load_head_matching", "score_rois"]

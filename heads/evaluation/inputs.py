"""What cached evaluation reads from a store's val split, as one in-memory record: :class:`EvalInputs`.

``heads.pipeline.load_eval_inputs`` fills it from a store; ``heads.pipeline.evaluate_with_inputs``
scores any number of heads on it without reading the store again. A sweep loads it once and
calls :meth:`EvalInputs.share_memory`: every array then lives in torch shared memory, and pickled
to a ``torch.multiprocessing`` worker a tensor travels as a file descriptor of the same pages, so
the val RoIs, logits, mask overlaps and ground truth are held once however many workers score.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from pathlib import Path

import numpy as np
import torch

from cache_schema.errors import ConfigError, SchemaError
from cache_schema.postprocess import BoxRegression, Postprocess
from cache_schema.records import ClassInfo, RoiSet
from heads.evaluation.fast_lvis import GtArrays

#: The RoiSet columns ``Split.load`` always returns: what the training monitor reads besides features.
_BASE_COLUMNS = ("labels", "ious", "image_index", "image_offsets", "images")


@dataclass(frozen=True, kw_only=True)
class SharedGt:
    """:class:`GtArrays` with its arrays held as torch tensors (zero-copy ``torch.from_numpy``
    views): tensors can move to shared memory and pickle as file descriptors, numpy arrays cannot.

    Attributes:
        columns: GtArrays field name -> tensor of that field's array (same dtype and shape; the
            optional ``mask_area`` / ``slot`` are absent when None).
        frequency: GtArrays' ``frequency`` (a tuple of str, kept as is).
    """

    columns: dict[str, torch.Tensor]
    frequency: tuple[str, ...]

    @classmethod
    def of(cls, gt: GtArrays) -> "SharedGt":
        cols = {f.name: torch.from_numpy(np.ascontiguousarray(getattr(gt, f.name))) for f in fields(gt)
                if f.name != "frequency" and getattr(gt, f.name) is not None}
        return cls(columns=cols, frequency=tuple(gt.frequency))

    def arrays(self) -> GtArrays:
        """The GtArrays again, its arrays numpy views of the tensors (no copy)."""
        return GtArrays(frequency=self.frequency, **{k: v.numpy() for k, v in self.columns.items()})


def feature_key(level: str, stage: int = 0) -> str:
    """Key of :attr:`EvalInputs.features`: the level, with ``@<stage>`` for cascade stages after 0."""
    return level if stage == 0 else f"{level}@{int(stage)}"


@dataclass(frozen=True, kw_only=True)
class EvalInputs:
    """Everything cached evaluation reads from a store for one evaluator setting.

    Attributes:
        store_path: the store's path or URL (messages).
        store_identity: ``heads.pipeline.store_identity`` of the store: a head is evaluated only
            if it was trained for the same detector and classes.
        evaluator: the ``evaluator`` setting the inputs were loaded for (``auto``, ``fast``, ``lvis-api``).
        roiset: the val RoIs without features: ``labels`` int64 ``[N]``, ``ious``, ``logits``
            float32 ``[N, C+1]``, ``reg_boxes`` float32 ``[N, 4]`` (or the proposals ``boxes``
            for a class-specific regressor) and either ``mask_area`` / ``mask_inter`` int32 (array
            evaluation) or ``mask_logits`` float16 ``[N, M, M]`` (LVIS API), when the store has them.
        features: :func:`feature_key` (level, cascade stage) -> float16 ``[N, *level_shape]``
            features of the same rows, for the levels (and stages) the heads to evaluate read
            (plus ``fc`` for a class-specific regressor).
        class_info: the store's class table (small: passed by value).
        position_ids: int64 ``[S]`` json image id of every val split position.
        image_sizes: ``[S, 2]`` (height, width) of every val split position, the store's dtype.
        evaluated_ids: json ids of the val images evaluated (the finished ones), split order.
        gt: the ground truth of array evaluation, or None when the LVIS API scores ``gt_json``.
        gt_json: the val annotation file (None when the store's own ground truth stands in).
        evaluator_note: which evaluator runs and why (a note on every row).
        notes: what holds for every row about this store (shown once on the console).
        postprocess: the detector's test-time detection settings.
        box_regression: the class-specific box regressor, or None (``O(C·D)``: passed by value).
        stage_logits: for a cascade's store, each stage's own logits float32 ``[N, C+1]`` (the
            roiset's ``logits`` are then the detector's final ones, their average); else empty.
    """

    store_path: str
    store_identity: dict
    evaluator: str
    roiset: RoiSet
    features: dict[str, torch.Tensor]
    class_info: ClassInfo
    position_ids: torch.Tensor
    image_sizes: torch.Tensor
    evaluated_ids: tuple[int, ...]
    gt: SharedGt | None
    gt_json: Path | None
    evaluator_note: str
    notes: tuple[str, ...]
    postprocess: Postprocess
    box_regression: BoxRegression | None
    stage_logits: tuple[torch.Tensor, ...] = ()

    def __post_init__(self) -> None:
        if self.roiset.features is not None:
            raise ConfigError("eval inputs: pass the features by level in `features`, not in the RoiSet")
        n = len(self.roiset)
        bad = {lv: tuple(f.shape) for lv, f in (*self.features.items(), *enumerate(self.stage_logits)) if f.shape[0] != n}
        if bad:
            raise SchemaError(f"eval inputs: features {bad} do not have the RoiSet's {n} rows; load both from one split")

    @property
    def num_stages(self) -> int:
        return max(1, len(self.stage_logits))

    def rois(self, level: str | None, stage: int = 0) -> RoiSet:
        """The val RoiSet with the features of ``level`` of cascade stage ``stage`` (None: without
        features), tensors shared."""
        if level is None:
            return self.roiset
        key = feature_key(level, stage)
        if key not in self.features:
            raise ConfigError(f"eval inputs hold the val features of {', '.join(self.features) or 'no level'}, not "
                              f"'{key}'; load them with the levels (and stages) of every head to evaluate")
        return replace(self.roiset, features=self.features[key])

    def monitor_rois(self, level: str) -> RoiSet:
        """The RoiSet ``Split.load(level=level)`` gives (the columns the training monitor reads),
        sharing this record's tensors: a sweep's parent then holds the val features once."""
        rois = self.rois(level)
        return RoiSet(features=rois.features, **{c: getattr(rois, c) for c in _BASE_COLUMNS})

    @property
    def fast_gt(self) -> GtArrays | None:
        return self.gt.arrays() if self.gt is not None else None

    def _tensors(self) -> list[torch.Tensor]:
        out = [v for v in vars(self.roiset).values() if isinstance(v, torch.Tensor)]
        out += [*self.features.values(), *self.stage_logits, self.position_ids, self.image_sizes]
        return out + (list(self.gt.columns.values()) if self.gt is not None else [])

    def share_memory(self) -> "EvalInputs":
        """Move every tensor into shared memory (in place) and return ``self``. Call it once, in
        the process that loaded the inputs: each call on an unshared tensor makes a new copy."""
        for t in self._tensors():
            t.share_memory_()
        return self

    @property
    def nbytes(self) -> int:
        """Bytes of the arrays (what sharing saves per extra worker)."""
        return sum(t.numel() * t.element_size() for t in self._tensors())

    @property
    def scratch_bytes(self) -> int:
        """Bytes one evaluation allocates besides these inputs: two float32 ``[N, C+1]`` score
        tables (the original head's softmax and the evaluated head's probabilities)."""
        return 2 * self.roiset.logits.numel() * 4 if self.roiset.logits is not None else 0


__all__ = ["EvalInputs", "SharedGt", "feature_key"]

"""Arrays a schema-2 store may recompute instead of storing: the original head's class logits.

Why: at LVIS size ``rois/logits`` is float32 ``[RoIs, C+1]`` — 4.8 KB per RoI at 1,203 classes,
more than the 1024-d fc feature it is computed from (2 KB as float16). The detector's classifier is
one linear layer on that feature (torchvision's ``FastRCNNPredictor.cls_score``, mmdet's
``fc_cls``), and the store keeps its weights (``detector_head/``), so
``logits = fc @ W.T + b`` gives the detector's own logits up to the float16 rounding of ``fc``.
A cascade's final logits are the mean of its stages' (as mmdet's ``_refine_roi`` computes them).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from cache_schema.errors import SchemaError
from cache_schema.head_init import read_head_weights

if TYPE_CHECKING:
    from cache_schema.split import SplitStore

# RoIs per matrix product: bounds the float32 copy of the features (~4 MB at D = 1024).
_ROWS_PER_PRODUCT = 1024


def logits_from_fc(fc: np.ndarray, weight: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """float32 ``[N, C+1]`` logits of float16 features ``fc`` ``[N, D]`` under a linear classifier
    ``weight`` float32 ``[C+1, D]``, ``bias`` ``[C+1]`` (rows in store order, background last)."""
    w_t = np.ascontiguousarray(weight.T, dtype=np.float32)
    out = np.empty((fc.shape[0], w_t.shape[1]), dtype=np.float32)
    for a in range(0, fc.shape[0], _ROWS_PER_PRODUCT):
        b = min(a + _ROWS_PER_PRODUCT, fc.shape[0])
        np.matmul(fc[a:b].astype(np.float32), w_t, out=out[a:b])
    out += bias.astype(np.float32)
    return out


def recompute_logits(split: "SplitStore", sel: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """float32 ``[sum(counts), C+1]`` class logits of the first ``counts[j]`` RoIs of images
    ``sel[j]``, as the split's reader would return ``rois/logits`` had it been stored: the stage
    the reader is bound to (:meth:`SplitStore.at_stage`), else the detector's final logits."""
    if "fc" not in split.levels:
        raise SchemaError(f"split {split.name} stores neither class logits nor the fc level they are computed from; "
                          "re-extract it with --levels fc or --store-logits")
    if split.stage is not None or split.num_stages == 1:
        stages = [0 if split.stage is None else split.stage]
    else:
        stages = list(range(split.num_stages))
    total = None
    for k in stages:
        head = read_head_weights(split.store, stage=k)
        reader = split if split.num_stages == 1 else split.at_stage(k)
        fc = reader._read_array(reader.stage_path("feat/fc"), sel, counts)
        logits = logits_from_fc(fc, head["cls.weight"], head["cls.bias"])
        total = logits if total is None else total + logits
    return total if len(stages) == 1 else total / np.float32(len(stages))

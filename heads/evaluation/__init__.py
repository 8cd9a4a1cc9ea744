"""Evaluation: official LVIS API (with numpy-2 fixes), AP bins, detection assembly, cached eval.

Modules: ``compat`` (lvis 0.5.3 fixes), ``metrics`` (BinSpec, Metrics, tables, files),
``lvis_eval`` (evaluate_lvis, LvisEvaluator: several result sets in parallel processes), ``detections`` (per-image detections, ``det`` merging), ``masks`` (pasting, RLE),
``cached`` (evaluate heads from the cache alone), ``inputs`` (EvalInputs: what cached evaluation
reads from a store, loaded once and shareable between processes), ``scoring`` (a head checked
against its store, its class probabilities), ``class_boxes`` / ``class_select`` (boxes of
detectors whose regression is class-specific, decoded per (RoI, class) on demand).
"""

from heads.evaluation.cached import cached_results, detect_cached_arrays, evaluate_cached, evaluated_image_ids
from heads.evaluation.class_boxes import BoxDecoder, ClassBoxes, decode_class_boxes
from heads.evaluation.compat import patch_lvis_numpy
from heads.evaluation.detections import (
    Detections,
    assemble_detection_arrays,
    assemble_detections,
    masks_of,
    merge_det,
    select_detections,
    to_results,
)
from heads.evaluation.inputs import EvalInputs
from heads.evaluation.masks import encode_masks, paste_and_encode, paste_roi_masks
from heads.evaluation.lvis_eval import LvisEvaluator, evaluate_lvis, evaluate_lvis_many, load_gt
from heads.evaluation.metrics import (
    BinSpec,
    IouMetrics,
    Metrics,
    format_table,
    read_metrics,
    write_metrics,
    write_results,
)

__all__ = [
    "BinSpec",
    "BoxDecoder",
    "ClassBoxes",
    "Detections",
    "EvalInputs",
    "IouMetrics",
    "LvisEvaluator",
    "Metrics",
    "assemble_detection_arrays",
    "assemble_detections",
    "cached_results",
    "decode_class_boxes",
    "detect_cached_arrays",
    "encode_masks",
    "evaluate_cached",
    "evaluate_lvis",
    "evaluate_lvis_many",
    "evaluated_image_ids",
    "format_table",
    "load_gt",
    "masks_of",
    "merge_det",
    "paste_and_encode",
    "paste_roi_masks",
    "patch_lvis_numpy",
    "read_metrics",
    "select_detections",
    "to_results",
    "write_metrics",
    "write_results",
]

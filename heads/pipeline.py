"""From a store to a trained head and its AP table: what ``heads train`` and ``heads eval`` run.

This is the only module that binds the store readers (``cache_schema``) to the training loop and
the cached evaluation; both of those work on in-memory records and know nothing of zarr.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from cache_schema import Store, open_store
from cache_schema.errors import ConfigError, SchemaError
from cache_schema.head_init import read_box_regression, read_head_weights
from cache_schema.postprocess import Postprocess
from cache_schema.records import RoiSet
from cache_schema.eval_gt import read_eval_gt
from cache_schema.inputs import resolve_annotation
from cache_schema.runtime import available_memory_bytes, check_output, pick_device
from heads.combine import RULES, Combination, recorded_combination
from heads.config import TrainConfig
from heads.evaluation import (BinSpec, LvisEvaluator, Metrics, cached_results, detect_cached_arrays, load_gt,
                              write_metrics, write_results)
from heads.evaluation.fast_inputs import (OverlapsUnavailable, det_arrays, evaluate_fast, gt_arrays, gt_arrays_from_store,
                                          store_slots)
from heads.evaluation.fast_lvis import GtArrays
from heads.evaluation.inputs import EvalInputs, SharedGt, feature_key
from heads.evaluation.scoring import LoadedHead, calibrated_probs, head_features, head_paths, load_head_matching
from heads.models import level_for_head, load_head
from heads.sources import InMemoryRoiSource, StreamingRoiSource
from heads.train import TrainResult, train_head

#: Heads that start from the detector's own layers (copied into the store at extraction).
FROM_DETECTOR = ("3fc_ft", "last2fc", "lastfc")
#: Columns cached evaluation reads from the val split (plus mask logits or mask overlaps).
EVAL_COLUMNS = ("logits", "reg_boxes")
#: ... when box regression is class-specific: the proposals each class's box is decoded from
#: (``reg_boxes`` holds the top class's box only), with the :data:`BOX_LEVEL` features.
CLASS_BOX_COLUMNS = ("logits", "boxes")
#: The feature level a class-specific box regressor reads.
BOX_LEVEL = "fc"
#: Detections per image of cached evaluation: LVIS's protocol, as ``serve eval`` (not the
#: detector's own ``max_dets``, so that both evaluations of a detector count the same detections).
MAX_DETS = 300
CLASS_BOX_NOTE = "boxes: class-specific, each (RoI, class) box decoded from the val fc features and the detector's regressor"
MASK_NOTE = ("box AP only: this detector's mask head is class-specific (or absent), so the store keeps no val mask "
             "logits; mask AP needs full inference (`serve eval`, or the detector's own test loop)")
#: ``heads eval --evaluator`` choices.
EVALUATORS = ("auto", "fast", "lvis-api")


def store_identity(store: Store) -> dict:
    """What a head must have been trained for to be evaluated or injected with this store."""
    meta = store.meta
    return {
        "detector_sha256": meta.detector.checkpoint_sha256,
        "category_ids": list(meta.dataset.category_ids),
        "train_annotation_sha256": meta.dataset.splits["train"].annotation_sha256 if "train" in meta.dataset.splits else None,
        "train_annotation_path": meta.dataset.splits["train"].annotation_path if "train" in meta.dataset.splits else None,
    }


def head_meta(store: Store, level: str, stage: int = 0) -> dict:
    """The provenance a head trained on ``store`` at ``level`` (of cascade stage ``stage``) keeps in
    ``head.pt`` (``heads train``, ``heads sweep``). Dual-head inference needs the training instance
    counts; recorded with the head, `serve inject` works without the store."""
    return {"store": store_identity(store), "store_path": store.path, "level": level, "stage": int(stage),
            "num_stages": store.meta.detector.num_stages,
            "instance_count": [int(v) for v in store.classes.instance_count]}


def choose_source(store: Store, level: str, *, stream: str, stage: int = 0) -> InMemoryRoiSource | StreamingRoiSource:
    """The train RoIs at ``level`` (of cascade stage ``stage``): loaded whole when they fit in half
    the free memory (or ``stream="never"``), streamed per image block otherwise (or
    ``stream="always"``). The same seed gives the same result either way (the sampler only sees
    row indices)."""
    if stream not in ("auto", "always", "never"):
        raise ConfigError(f"--stream {stream!r} is not one of auto, always, never")
    split = store.split("train").at_stage(stage)
    c = store.meta.num_classes
    fits = split.nbytes(level) < available_memory_bytes() // 2
    if stream == "always" or (stream == "auto" and not fits):
        return StreamingRoiSource.from_split(split, level=level, num_classes=c)
    return InMemoryRoiSource(roiset=split.load(level=level), num_classes=c)


def train_from_store(*, cache: str, config: TrainConfig, out_dir: Path, stream: str = "auto",
                     progress: bool = True, device: str | None = None) -> TrainResult:
    """Train the head ``config`` names on the store's train split; val RoIs feed the accuracy log."""
    store = open_store(cache)
    if "train" not in store.splits:
        raise SchemaError(f"store {store.path} has no train split; extract it with --splits train,val")
    level = level_for_head(config.head.name)
    if level not in store.split("train").levels:
        raise SchemaError(
            f"head {config.head.name} needs the '{level}' level, store {store.path} holds "
            f"{', '.join(store.split('train').levels) or 'none'}; re-extract with --levels {level}"
        )
    stage = config.head.stage
    source = choose_source(store, level, stream=stream, stage=stage)  # refuses a stage the store lacks
    init_state = read_head_weights(store, stage=stage) if config.head.name in FROM_DETECTOR else None
    val = store.split("val").at_stage(stage).load(level=level) if "val" in store.splits else None
    return train_head(config=config, source=source, class_info=store.classes,
                      init_state=init_state, out_dir=out_dir, val=val, device=device, progress=progress,
                      init_from=store.meta.detector.checkpoint_sha256, meta=head_meta(store, level, stage))


def load_head_for(store: Store, head_path: Path) -> LoadedHead:
    """Load ``head_path`` (a run directory or ``head.pt``) and refuse it unless it was trained on
    a store of the same detector and classes."""
    return load_head_matching(head_path, identity=store_identity(store), store_path=store.path)


def val_split_for_eval(store: Store, level: str | None, *, overlaps: bool = False, class_boxes: bool = False) -> RoiSet:
    """The val RoIs cached evaluation reads: with ``overlaps`` the mask areas and intersections
    (array evaluation), else the mask logits (pasted for the LVIS API); with ``class_boxes``
    the proposals (:data:`CLASS_BOX_COLUMNS`) instead of the class-agnostic ``reg_boxes``."""
    if "val" not in store.splits:
        raise SchemaError(f"store {store.path} has no val split; extract it with --splits train,val")
    split = store.split("val")
    masks = ("mask_area", "mask_inter") if overlaps else ("mask_logits",) if split.with_masks else ()
    val = split.load(level=level, columns=(CLASS_BOX_COLUMNS if class_boxes else EVAL_COLUMNS) + masks)
    require_finite(val, store=store, split="val", level=level)
    return val


def require_finite(roiset: RoiSet, *, store: Store, split: str, level: str | None) -> None:
    """Refuse NaN/Inf in the features and logits evaluation scores (they would silently drop
    RoIs from the detections and still report an AP)."""
    named = {f"feat/{level}": roiset.features, "rois/logits": roiset.logits}
    for name, values in named.items():
        if values is None:
            continue
        bad = ~torch.isfinite(values.reshape(len(values), -1).float()).all(dim=1)
        if bool(bad.any()):
            rows = torch.nonzero(bad).flatten()
            images = torch.unique(roiset.image_index[rows]).tolist()
            raise SchemaError(f"store {store.path}: {split}/{name} holds NaN/Inf in {len(rows)} RoIs of split images "
                              f"{images[:5]}{' …' if len(images) > 5 else ''}; run `roicache cache validate` and "
                              "re-extract those images")


def eval_postprocess(store: Store) -> Postprocess:
    """The detector's test-time detection settings the store records (torchvision's defaults for
    stores made before they were recorded)."""
    return store.meta.detector.postprocess or Postprocess.torchvision_default()


def _store_notes(store: Store, class_specific: bool) -> tuple[str, ...]:
    """What every row's metrics (and the console) should say about how this store is evaluated."""
    notes = []
    if class_specific:
        notes.append(CLASS_BOX_NOTE)
        if not store.split("val").with_masks:
            notes.append(MASK_NOTE)
    post, default = store.meta.detector.postprocess, Postprocess.torchvision_default()
    used = ("score_thresh", "nms_iou", "min_box_size")  # max_dets: MAX_DETS, whatever the detector's
    if post is not None and any(getattr(post, k) != getattr(default, k) for k in used):
        size = f"boxes under {post.min_box_size:g} px dropped" if post.min_box_size > 0 else "no box size filter"
        notes.append(f"detection settings: the detector's own (score > {post.score_thresh:g}, NMS IoU {post.nms_iou:g}, "
                     f"{size}; {MAX_DETS} per image as LVIS)")
    return tuple(notes)


@dataclass(frozen=True, kw_only=True)
class EvalOutcome:
    """Metrics per rule; ``notes``: what holds for every row (shown once on the console)."""

    rows: dict[str, Metrics]
    out_dir: Path | None
    notes: tuple[str, ...] = ()


def _fast_ground_truth(store: Store, gt_json: Path | None, evaluator: str, image_ids: list[int], *,
                       class_specific: bool = False) -> tuple[GtArrays | None, str]:
    """The ground truth for array evaluation, or None and why the LVIS API has to be used.
    ``gt_json`` is content-checked already (:func:`val_ground_truth`); None: the json was not
    found and the store's own copy (:mod:`cache_schema.eval_gt`) stands in for it."""
    if evaluator == "lvis-api":
        return None, "evaluator: lvis-api (asked for)"
    split = store.split("val")
    reason = ""
    if gt_json is None:
        record = read_eval_gt(split.group)
        gt_table = split.gt()
        slots = store_slots(gt_table.image, gt_table.ann_id) if split.mask_overlaps else None
        gt = gt_arrays_from_store(record, position_ids=split.image_ids, category_ids=store.classes.category_ids,
                                  image_ids=image_ids, slots=slots)
        return gt, ("evaluator: fast (LVISEval's rules on arrays, mask IoUs from the store's overlaps; ground truth "
                    "from the store, the annotation file was not found)")
    if class_specific and split.with_masks:
        reason = ("the stored mask overlaps are of each RoI's top-class box, class-specific detections need their "
                  "masks pasted into their own boxes")
    elif split.with_masks and not split.mask_overlaps:
        reason = "the store has no mask overlaps (extracted before they were added); re-extract val for fast evaluation"
    else:
        gt_table = split.gt()
        slots = store_slots(gt_table.image, gt_table.ann_id) if split.mask_overlaps else None
        try:
            return gt_arrays(load_gt(gt_json), image_ids, slots=slots), "evaluator: fast (LVISEval's rules on arrays, mask IoUs from the store's overlaps)"
        except OverlapsUnavailable as exc:
            reason = f"{exc} (crowd or degenerate annotations are not extracted)"
    if evaluator == "fast":
        raise SchemaError(f"--evaluator fast is not possible: {reason}; or pass --evaluator lvis-api")
    return None, f"evaluator: lvis-api ({reason})"


def val_ground_truth(store: Store, annotations: dict[str, Path] | None, evaluator: str = "auto") -> Path | None:
    """The val json cached evaluation will read, or ``None`` when it is not found but the store
    keeps the ground truth array evaluation needs (:mod:`cache_schema.eval_gt`); else the
    one-line error of :func:`cache_schema.inputs.resolve_annotation`."""
    given = (annotations or {}).get("val")
    try:
        return resolve_annotation(store, "val", given)
    except ConfigError:
        split = store.split("val")
        if given is not None or evaluator == "lvis-api" or (split.with_masks and not split.mask_overlaps) \
                or read_eval_gt(split.group) is None:
            raise
        return None


def head_combination(head: Path | None) -> Combination:
    """The combination the head run ``head`` (run directory or ``head.pt``) recorded — its
    ``[combine]`` config section — or the record's defaults without a head."""
    if head is None:
        return Combination()
    path = Path(head) / "head.pt" if Path(head).is_dir() else Path(head)
    return recorded_combination(load_head(path)[2])


def _check_combinations(combinations: tuple[Combination, ...], *, has_head: bool) -> None:
    """Rows are keyed by rule: one combination per rule in a call; rules other than ``orig`` need a head."""
    if not combinations:
        raise ConfigError(f"no combination rule to evaluate; give one or more of {', '.join(RULES)}")
    odd = [c for c in combinations if not isinstance(c, Combination)]
    if odd:
        raise ConfigError(f"combinations must be heads.combine.Combination records, got {odd[0]!r}")
    rules = [c.rule for c in combinations]
    twice = sorted({r for r in rules if rules.count(r) > 1})
    if twice:
        raise ConfigError(f"combination rule(s) {', '.join(twice)} given twice; rows are keyed by rule, so evaluate "
                          "one setting per rule in a call (or one call per setting)")
    if not has_head and any(r != "orig" for r in rules):
        raise ConfigError("combine schemes other than 'orig' need a head: pass --head RUN_DIR")


def load_eval_inputs(store: Store, *, levels: tuple[str | tuple[str, int], ...] = (), evaluator: str = "auto",
                     annotations: dict[str, Path] | None = None) -> EvalInputs:
    """Everything :func:`evaluate_with_inputs` reads from ``store``'s val split, for heads that
    read the feature ``levels`` (a level name, or ``(level, stage)`` for a cascade stage's; none:
    the original head only; the :data:`BOX_LEVEL` is added for a class-specific box regressor).
    A cascade's store also gives every stage's own logits. ``evaluator``, ``annotations``: as
    :func:`evaluate_from_store`."""
    if evaluator not in EVALUATORS:
        raise ConfigError(f"unknown evaluator {evaluator!r}; choose from {', '.join(EVALUATORS)}")
    if "val" not in store.splits:
        raise SchemaError(f"store {store.path} has no val split; extract it with --splits train,val")
    split = store.split("val")
    gt_json = val_ground_truth(store, annotations, evaluator)
    reg = read_box_regression(store)
    if reg is not None and BOX_LEVEL not in split.levels:
        raise SchemaError(
            f"store {store.path}: this detector's box regression is class-specific, so cached evaluation decodes each "
            f"class's box from the val '{BOX_LEVEL}' level, which the store lacks; re-extract with "
            f"--levels {','.join((BOX_LEVEL, *split.levels))}")
    image_ids = evaluated_image_ids_of(split)
    fast_gt, note = _fast_ground_truth(store, gt_json, evaluator, image_ids, class_specific=reg is not None)
    wanted = [(lv, 0) if isinstance(lv, str) else (str(lv[0]), int(lv[1])) for lv in levels]
    features = {}
    # Features before the other columns: their NaN check comes first, as when both were read together.
    for lv, stage in dict.fromkeys((*wanted, *(((BOX_LEVEL, 0),) if reg is not None else ()))):
        rois = split.at_stage(stage).load(level=lv)
        require_finite(rois, store=store, split="val", level=lv)
        features[feature_key(lv, stage)] = rois.features
    stages = split.num_stages
    stage_logits = tuple(split.at_stage(k).load(columns=("logits",)).logits for k in range(stages)) if stages > 1 else ()
    val = val_split_for_eval(store, None, overlaps=fast_gt is not None and split.mask_overlaps > 0,
                             class_boxes=reg is not None)
    return EvalInputs(store_path=store.path, store_identity=store_identity(store), evaluator=evaluator, roiset=val,
                      features=features, class_info=store.classes, position_ids=torch.tensor(split.image_ids),
                      image_sizes=torch.tensor(split.image_sizes),  # copies: the split's arrays stay its own
                      evaluated_ids=tuple(image_ids), gt=SharedGt.of(fast_gt) if fast_gt is not None else None,
                      gt_json=gt_json, evaluator_note=note, notes=_store_notes(store, reg is not None),
                      postprocess=eval_postprocess(store), box_regression=reg, stage_logits=stage_logits)


def evaluate_from_store(*, cache: str, head: Path | Sequence[Path] | None, combinations: tuple[Combination, ...],
                        out_dir: Path | None, bins: BinSpec | None = None, device: str | None = None,
                        progress: bool = True, evaluator: str = "auto", annotations: dict[str, Path] | None = None,
                        overwrite: bool = True) -> EvalOutcome:
    """Cached evaluation: the original head (``orig``) and/or ``head`` combined by each of
    ``combinations`` (rule + T, boundary, thr, scale_ratio; one per rule) on the store's val RoIs,
    scored against the val json. Rows are keyed by rule name.

    ``overwrite``: False refuses an ``out_dir`` holding a previous evaluation (the CLI's default).
    ``annotations``: ``{"val": PATH}`` when the val json is not where the store recorded it
    (:func:`cache_schema.inputs.resolve_annotation`).

    ``evaluator``: ``fast`` evaluates arrays with LVISEval's exact rules and the store's mask
    overlaps (:mod:`heads.evaluation.fast_lvis`, equal to the LVIS API, tested); ``lvis-api``
    pastes masks and runs the official API; ``auto`` takes ``fast`` when the store allows it.

    Detections follow the detector's recorded test-time settings (:func:`eval_postprocess`),
    :data:`MAX_DETS` per image. A store with a class-specific box regressor
    (``cache_schema.head_init.read_box_regression``) gets each (RoI, class) pair's own box,
    decoded from the val ``fc`` level; without val mask logits it is evaluated for box AP only
    (:data:`MASK_NOTE`).

    Reads the val split on each call; to score many heads, load it once with
    :func:`load_eval_inputs` and call :func:`evaluate_with_inputs` (the same rows).
    """
    if out_dir is not None:
        out_dir = check_output(out_dir, kind="dir", overwrite=overwrite, marker="eval_summary.json")  # before any work
    paths = head_paths(head)
    _check_combinations(combinations, has_head=bool(paths))
    store = open_store(cache)  # (load_eval_inputs checks the evaluator before reading anything)
    loaded = tuple(load_head_for(store, p) for p in paths)
    inputs = load_eval_inputs(store, levels=head_features(loaded), evaluator=evaluator, annotations=annotations)
    return _evaluate(inputs, loaded, combinations, out_dir=out_dir, bins=bins, device=device, progress=progress)


def evaluate_with_inputs(*, inputs: EvalInputs, head: Path | Sequence[Path] | None,
                         combinations: tuple[Combination, ...], out_dir: Path | None, bins: BinSpec | None = None,
                         device: str | None = None, progress: bool = True, overwrite: bool = True) -> EvalOutcome:
    """:func:`evaluate_from_store` on val inputs loaded once (:func:`load_eval_inputs`, with the
    level ``head`` reads): the same rows, without reading the store; the head is checked against
    the store identity the inputs recorded."""
    if out_dir is not None:
        out_dir = check_output(out_dir, kind="dir", overwrite=overwrite, marker="eval_summary.json")
    loaded = tuple(load_head_matching(p, identity=inputs.store_identity, store_path=inputs.store_path)
                   for p in head_paths(head))
    _check_combinations(combinations, has_head=bool(loaded))
    return _evaluate(inputs, loaded, combinations, out_dir=out_dir, bins=bins, device=device, progress=progress)


def _evaluate(inputs: EvalInputs, loaded: tuple[LoadedHead, ...], combinations: tuple[Combination, ...], *,
              out_dir: Path | None, bins: BinSpec | None, device: str | None, progress: bool) -> EvalOutcome:
    """The rows of ``combinations`` on ``inputs`` (see :func:`evaluate_from_store`)."""
    val = inputs.rois(None)
    probs = calibrated_probs(inputs, loaded, pick_device(device)) if loaded else None
    post, reg, fast_gt = inputs.postprocess, inputs.box_regression, inputs.fast_gt
    tables = dict(roiset=val, class_info=inputs.class_info, image_ids=inputs.position_ids.numpy(),
                  image_sizes=inputs.image_sizes.numpy())
    args = dict(tables, cal_probs=probs, progress=progress, score_thresh=post.score_thresh,
                nms_iou=post.nms_iou, min_box_size=post.min_box_size, max_dets=MAX_DETS, box_regression=reg,
                box_features=inputs.features[BOX_LEVEL] if reg is not None else None)
    notes = (inputs.evaluator_note, *inputs.notes)
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
    if fast_gt is not None:
        rows = {c.rule: _evaluate_rule_fast(fast_gt, detect_cached_arrays(combination=c, **args), tables, c.rule, bins,
                                            notes, out_dir) for c in combinations}
    else:
        # Each rule's LVIS evaluation runs in a worker process while the next rule's detections
        # are assembled here. Without val masks a class-specific store is evaluated for boxes only.
        iou_types = ("bbox",) if MASK_NOTE in inputs.notes else ("segm", "bbox")
        with LvisEvaluator(gt_json=inputs.gt_json, bins=bins, image_ids=list(inputs.evaluated_ids),
                           iou_types=iou_types, max_dets=MAX_DETS) as lvis:
            for c in combinations:
                results = cached_results(dets=detect_cached_arrays(combination=c, **args), **tables)
                lvis.submit(c.rule, results)
                if out_dir is not None:
                    write_results(out_dir / f"results_{c.rule}.json", results)
            rows = {name: replace(m, notes=m.notes + notes) for name, m in lvis.gather().items()}
    if out_dir is not None:
        for name, metrics in rows.items():
            write_metrics(out_dir / f"metrics_{name}.json", metrics)
        summary = {"combinations": {c.rule: c.to_dict() for c in combinations},
                   "rows": {name: m.to_dict() for name, m in rows.items()}}
        (out_dir / "eval_summary.json").write_text(json.dumps(summary, indent=1))
    return EvalOutcome(rows=rows, out_dir=out_dir, notes=inputs.notes)


def evaluated_image_ids_of(split) -> list[int]:
    """json ids of the val images cached evaluation reads (the finished ones)."""
    sel, _ = split.select()
    return [int(split.image_ids[p]) for p in sel]


def _evaluate_rule_fast(gt: GtArrays, dets: list, tables: dict, name: str, bins: BinSpec | None,
                        notes: tuple[str, ...], out_dir: Path | None) -> Metrics:
    """One rule's detections (``dets``, per image of ``tables["roiset"]``) by the array evaluator."""
    val, classes = tables["roiset"], tables["class_info"]
    image_ids = [int(tables["image_ids"][p]) for p in val.images.numpy()]
    arrays = det_arrays(dets=dets, image_ids=image_ids, category_ids=classes.category_ids,
                        row_offsets=val.image_offsets[:-1].tolist(), mask_area=val.mask_area, mask_inter=val.mask_inter)
    iou_types = ("segm", "bbox") if val.mask_inter is not None else ("bbox",)
    if iou_types == ("bbox",) and MASK_NOTE not in notes:
        notes = notes + ("segm not evaluated: the store keeps no masks",)
    if out_dir is not None:  # boxes only: this RoiSet has no mask logits, the masks are never pasted
        write_results(out_dir / f"results_{name}.json", cached_results(dets=dets, **tables))
    return evaluate_fast(gt=gt, dets=arrays, iou_types=iou_types, bins=bins, max_dets=MAX_DETS, notes=notes)

"""From a store to a trained head and its AP table: what ``heads train`` and ``heads eval`` run.

This is the only module that binds the store readers (``cache_schema``) to the training loop and
the cached evaluation; both of those work on in-memory records and know nothing of zarr.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from cache_schema import Store, open_store
from cache_schema.errors import CheckpointError, ConfigError, SchemaError
from cache_schema.head_init import read_head_weights
from cache_schema.records import RoiSet
from cache_schema.runtime import pick_device
from heads.combine import RULES, CombineConfig
from heads.config import TrainConfig
from heads.evaluation import BinSpec, LvisEvaluator, Metrics, detect_cached, evaluated_image_ids, write_metrics, write_results
from heads.models import head_scores, level_for_head, load_head
from heads.sources import InMemoryRoiSource, StreamingRoiSource
from heads.train import TrainResult, train_head

#: Heads that start from the detector's own layers (copied into the store at extraction).
FROM_DETECTOR = ("3fc_ft", "last2fc", "lastfc")
#: Columns cached evaluation reads from the val split.
EVAL_COLUMNS = ("logits", "reg_boxes", "mask_logits")


def store_identity(store: Store) -> dict:
    """What a head must have been trained for to be evaluated or injected with this store."""
    meta = store.meta
    return {
        "detector_sha256": meta.detector.checkpoint_sha256,
        "category_ids": list(meta.dataset.category_ids),
        "train_annotation_sha256": meta.dataset.splits["train"].annotation_sha256 if "train" in meta.dataset.splits else None,
        "train_annotation_path": meta.dataset.splits["train"].annotation_path if "train" in meta.dataset.splits else None,
    }


def _available_memory_bytes() -> int:
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:  # pragma: no cover - not Linux
        pass
    return 8 << 30


def choose_source(store: Store, level: str, *, stream: str) -> InMemoryRoiSource | StreamingRoiSource:
    """The train RoIs at ``level``: loaded whole when they fit in half the free memory (or
    ``stream="never"``), streamed per image block otherwise (or ``stream="always"``). The same
    seed gives the same result either way (the sampler only sees row indices)."""
    if stream not in ("auto", "always", "never"):
        raise ConfigError(f"--stream {stream!r} is not one of auto, always, never")
    split = store.split("train")
    c = store.meta.num_classes
    fits = split.nbytes(level) < _available_memory_bytes() // 2
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
    init_state = read_head_weights(store) if config.head.name in FROM_DETECTOR else None
    val = store.split("val").load(level=level) if "val" in store.splits else None
    # Dual-head inference needs the training instance counts; record them with the head so that
    # `serve inject` works without the store.
    meta = {"store": store_identity(store), "store_path": store.path, "level": level,
            "instance_count": [int(v) for v in store.classes.instance_count]}
    return train_head(config=config, source=choose_source(store, level, stream=stream), class_info=store.classes,
                      init_state=init_state, out_dir=out_dir, val=val, device=device, progress=progress,
                      init_from=store.meta.detector.checkpoint_sha256, meta=meta)


@dataclass(frozen=True, kw_only=True)
class LoadedHead:
    head: torch.nn.Module
    spec: object
    meta: dict
    path: Path


def load_head_for(store: Store, head_path: Path) -> LoadedHead:
    """Load ``head_path`` (a run directory or ``head.pt``) and refuse it unless it was trained on
    a store of the same detector and classes."""
    path = Path(head_path)
    path = path / "head.pt" if path.is_dir() else path
    head, spec, meta = load_head(path)
    trained_for = (meta or {}).get("store") or {}
    mine = store_identity(store)
    for key in ("detector_sha256", "category_ids"):
        if trained_for.get(key) != mine[key]:
            raise CheckpointError(
                f"head {path} was trained for another {key.split('_')[0]} than store {store.path} "
                f"({key} differs); train a head on this store with `heads train --cache {store.path}`"
            )
    return LoadedHead(head=head, spec=spec, meta=meta, path=path)


@torch.inference_mode()
def score_rois(loaded: LoadedHead, features: torch.Tensor, *, device: torch.device,
               batch: int = 8192) -> torch.Tensor:
    """Class probabilities ``[N, C+1]`` float32 (background last) of ``features`` under the head."""
    head = loaded.head.to(device).eval()
    out = [head_scores(loaded.spec, head(features[i:i + batch].to(device).float())).cpu()
           for i in range(0, features.shape[0], batch)]
    return torch.cat(out) if out else torch.zeros(0, loaded.spec.num_classes + 1)


def val_split_for_eval(store: Store, level: str | None) -> RoiSet:
    if "val" not in store.splits:
        raise SchemaError(f"store {store.path} has no val split; extract it with --splits train,val")
    split = store.split("val")
    columns = tuple(c for c in EVAL_COLUMNS if c != "mask_logits" or split.with_masks)
    return split.load(level=level, columns=columns)


@dataclass(frozen=True, kw_only=True)
class EvalOutcome:
    rows: dict[str, Metrics]
    out_dir: Path | None


def evaluate_from_store(*, cache: str, head: Path | None, combines: tuple[str, ...], T: float,
                        out_dir: Path | None, bins: BinSpec | None = None, device: str | None = None,
                        combine_config: CombineConfig | None = None, progress: bool = True) -> EvalOutcome:
    """Cached evaluation: the original head (``orig``) and/or ``head`` combined by each of
    ``combines`` on the store's val RoIs, scored with the LVIS API against the val json."""
    unknown = [c for c in combines if c not in RULES]
    if unknown:
        raise ConfigError(f"unknown combine scheme(s) {unknown}; choose from {', '.join(RULES)}")
    store = open_store(cache)
    loaded = load_head_for(store, head) if head is not None else None
    if loaded is None and any(c != "orig" for c in combines):
        raise ConfigError("combine schemes other than 'orig' need a head: pass --head RUN_DIR")
    level = loaded.meta.get("level", level_for_head(loaded.spec.name)) if loaded else None
    val = val_split_for_eval(store, level)
    probs = score_rois(loaded, val.features, device=pick_device(device)) if loaded else None
    split = store.split("val")
    gt_json = Path(store.meta.dataset.splits["val"].annotation_path)
    if not gt_json.is_file():
        raise SchemaError(f"the val annotation file {gt_json} recorded in the store is gone; restore it or re-extract")
    config = replace(combine_config or CombineConfig(), T=float(T))
    # Each rule's LVIS evaluation runs in a worker process while the next rule's detections are
    # assembled here.
    with LvisEvaluator(gt_json=gt_json, bins=bins, image_ids=evaluated_image_ids(val, split.image_ids)) as lvis:
        for name in combines:
            results = detect_cached(roiset=val, class_info=store.classes, cal_probs=probs, combine=name, config=config,
                                    image_ids=split.image_ids, image_sizes=split.image_sizes, progress=progress)
            lvis.submit(name, results)
            if out_dir is not None:
                out_dir.mkdir(parents=True, exist_ok=True)
                write_results(out_dir / f"results_{name}.json", results)
        rows = lvis.gather()
    if out_dir is not None:
        for name, metrics in rows.items():
            write_metrics(out_dir / f"metrics_{name}.json", metrics)
        summary = {name: m.to_dict() for name, m in rows.items()}
        (out_dir / "eval_summary.json").write_text(json.dumps({"T": T, "rows": summary}, indent=1))
    return EvalOutcome(rows=rows, out_dir=out_dir)

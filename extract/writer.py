"""``extract``: run a frozen detector over a dataset once and fill a store, shard by shard.

Order of work, and why it is safe to kill at any moment:
1. every input is checked (checkpoint, annotation files, images, class counts) before anything is
   written, so bad input never leaves a store behind;
2. shard 0 (or the only process) creates the store with its tables, detector head and evaluation
   ground truth, and marks it initialized last; other shards wait for it;
3. each shard runs the fixed image batches of its commit blocks (:mod:`extract.sharding`); a writer
   thread labels them beside the detector and writes block by block — a block's done marks are
   written last, so a killed run leaves the block "not done";
4. ``--resume`` re-runs every block that still holds an image without its mark (whole blocks, so
   the numbers equal an uninterrupted run's), and the last shard to finish marks the store complete.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cache_schema import (
    DatasetInfo,
    DetectorInfo,
    ExtractionSettings,
    GtTable,
    SplitSource,
    SplitSpec,
    Store,
    StoreMeta,
    create_store,
    finalize,
    open_for_resume,
)
from cache_schema.errors import (ConfigError, DatasetError, StoreExistsError, StoreNotFoundError,
                                 StoreUninitializedError)
from cache_schema.runtime import check_output, configure_threads, pick_device, sha256_file
from extract.datasets.images import read_rgb
from extract.datasets.lvis_json import AnnotationSet, check_images_exist, class_statistics, load_annotations, resolve_split
from cache_schema.head_init import write_box_regression, write_head_weights
from cache_schema.layout import stage_prefix
from cache_schema.eval_gt import write_eval_gt
from cache_schema.inputs import relative_to_store
from extract.detectors.backends import check_class_table, load_adapter
from extract.detectors.shipped import check_data_matches
from extract.detectors.base import DetectorAdapter
from extract.matching import match_rois, stored_rows
from extract.overlaps import eval_ground_truth, image_overlaps
from extract.progress import ExtractProgress
from extract.sharding import Shard, batch_groups, commit_block

#: Splits that get GT boxes appended as proposals (SimCal's calibration adds them for training).
GT_PROPOSAL_SPLITS = ("train",)
#: Splits that keep class-agnostic mask logits (what cached mask evaluation needs).
MASK_SPLITS = ("val",)


def keeps_masks(split: str, adapter: DetectorAdapter) -> bool:
    """The split stores mask logits: val, when the detector's mask head is class-agnostic (a
    class-specific head would need C masks per RoI; cached evaluation then gives box AP only)."""
    return split in MASK_SPLITS and adapter.mask_size > 0 and adapter.class_agnostic_mask


@dataclass(frozen=True, kw_only=True)
class ExtractConfig:
    """Settings of one extraction (what ``extract`` takes on its command line)."""

    splits: tuple[str, ...] = ("train", "val")
    levels: tuple[str, ...] = ("pooled", "fc")
    rois_per_image: int | None = None  # None: the detector's own test-time proposal count
    detector_config: str | None = None  # mmdet: config file or bundled name (default: the checkpoint's)
    fg_iou: float = 0.5
    batch_size: int = 4
    device: str = "auto"
    shard: Shard = field(default_factory=Shard)
    resume: bool = False
    overwrite: bool = False
    seed: int = 0
    threads: int | None = None
    wait_for_store_s: float = 600.0
    train_bg_per_image: int | None = None  # None: every background RoI of a train image is stored
    store_logits: bool = False  # False: logits recomputed from feat/fc on read (stored when fc is not extracted)
    block_images: int = 32  # images per commit block of a new store (rounded to a multiple of batch_size)

    def __post_init__(self) -> None:
        if not self.splits:
            raise ConfigError("--splits is empty; name at least one split, e.g. train,val")
        if not self.levels:
            raise ConfigError("--levels is empty; name at least one feature level, e.g. pooled,fc")
        if self.rois_per_image is not None and self.rois_per_image < 1:
            raise ConfigError(f"--rois-per-image must be >= 1, got {self.rois_per_image}")
        if self.batch_size < 1:
            raise ConfigError(f"--batch-size must be >= 1, got {self.batch_size}")
        if self.block_images < 1:
            raise ConfigError(f"--block-images must be >= 1, got {self.block_images}")
        if self.threads is not None and self.threads < 1:
            raise ConfigError(f"--threads must be >= 1 (or left out for every core), got {self.threads}")
        if not 0.0 < self.fg_iou <= 1.0:
            raise ConfigError(f"--fg-iou must lie in (0, 1], got {self.fg_iou}")
        if self.train_bg_per_image is not None and self.train_bg_per_image < 0:
            raise ConfigError(f"--train-bg-per-image must be >= 0 (background RoIs kept per train image), "
                              f"got {self.train_bg_per_image}")
        if self.resume and self.overwrite:
            raise ConfigError("--resume and --overwrite contradict each other; pick one")
        if self.overwrite and self.shard.count > 1:
            # Other shards could open the old store before shard 0 replaces it.
            raise ConfigError("--overwrite cannot be combined with --shard i/n (n > 1); delete the old store, then start the shards")


@dataclass(frozen=True, kw_only=True)
class ExtractReport:
    store: str
    images_written: int
    rois_written: int
    seconds: float
    complete: bool


@dataclass(frozen=True, kw_only=True)
class _SplitInput:
    name: str
    annset: AnnotationSet
    gt: GtTable
    gt_rows_of_image: list[np.ndarray]


def _load_split(data: Path, name: str, adapter: DetectorAdapter) -> _SplitInput:
    json_path, image_root = resolve_split(data, name)
    annset = load_annotations(json_path, image_root)
    if annset.num_classes != adapter.num_classes:
        raise DatasetError(
            f"{json_path} has {annset.num_classes} categories but the detector was trained for "
            f"{adapter.num_classes}; use the checkpoint trained on this dataset"
        )
    check_class_table(adapter.categories, annset, json_path)
    check_images_exist(annset)
    boxes, labels, image, area, ann_id, rows_of = [], [], [], [], [], []
    for pos, anns in enumerate(annset.annotations):
        start = len(labels)
        for a in anns:
            x, y, w, h = (float(v) for v in a["bbox"])
            boxes.append((x, y, x + w, y + h))
            labels.append(annset.index_of[a["category_id"]])
            image.append(pos)
            area.append(float(a.get("area", w * h)))
            ann_id.append(int(a.get("id", -1)))
        rows_of.append(np.arange(start, len(labels), dtype=np.int64))
    gt = GtTable(boxes=np.asarray(boxes, np.float32).reshape(-1, 4), labels=np.asarray(labels, np.int32),
                 image=np.asarray(image, np.int32), area=np.asarray(area, np.float32),
                 ann_id=np.asarray(ann_id, np.int64))
    return _SplitInput(name=name, annset=annset, gt=gt, gt_rows_of_image=rows_of)


def _meta(adapter: DetectorAdapter, ckpt: Path, inputs: list[_SplitInput], config: ExtractConfig,
          rois_per_image: int, out: str) -> StoreMeta:
    desc = adapter.describe()
    detector = DetectorInfo(backend=desc["backend"], arch=desc["arch"], checkpoint_sha256=desc["checkpoint_sha256"],
                            checkpoint_path=str(ckpt), levels=dict(adapter.levels), num_classes=adapter.num_classes,
                            postprocess=adapter.postprocess, stage_fg_iou=adapter.stage_fg_iou)
    dataset = DatasetInfo(
        # Absolute paths plus the json's path relative to the store: the store is read from other
        # directories and moved with its dataset (cache_schema.inputs).
        splits={s.name: SplitSource(annotation_path=str(Path(s.annset.json_path).resolve()),
                                    annotation_sha256=sha256_file(s.annset.json_path),
                                    image_root=str(Path(s.annset.image_root).resolve()),
                                    annotation_relpath=relative_to_store(s.annset.json_path, out)) for s in inputs},
        category_ids=inputs[0].annset.cat_ids,
    )
    settings = ExtractionSettings(fg_iou=config.fg_iou, bg_iou=config.fg_iou, rois_per_image=rois_per_image,
                                  gt_as_proposals=any(s.name in GT_PROPOSAL_SPLITS for s in inputs),
                                  with_masks=any(keeps_masks(s.name, adapter) for s in inputs),
                                  mask_size=adapter.mask_size, seed=config.seed,
                                  train_bg_per_image=config.train_bg_per_image if "train" in config.splits else None,
                                  store_logits=_stores_logits(config))
    return StoreMeta(detector=detector, dataset=dataset, extraction=settings,
                     splits=tuple(s.name for s in inputs), num_classes=adapter.num_classes)


def _overlap_columns(s: _SplitInput, masks: bool) -> int:
    """GT columns of the split's mask overlaps: the most GTs of any image, or 0 (none stored)
    when the split keeps no masks or some annotation has no segmentation to compare with."""
    if not masks:
        return 0
    if any("segmentation" not in a for anns in s.annset.annotations for a in anns):
        return 0
    return max((len(r) for r in s.gt_rows_of_image), default=0)


def _split_spec(s: _SplitInput, config: ExtractConfig, rois_per_image: int, masks: bool) -> SplitSpec:
    imgs = s.annset.images
    max_gt = max((len(r) for r in s.gt_rows_of_image), default=0)
    with_gt = s.name in GT_PROPOSAL_SPLITS
    return SplitSpec(
        name=s.name, image_ids=np.array([im.id for im in imgs], np.int64),
        image_sizes=np.array([(im.height, im.width) for im in imgs], np.int32).reshape(-1, 2),
        file_names=tuple(im.file_name for im in imgs), stride=rois_per_image + (max_gt if with_gt else 0),
        levels=config.levels, gt=s.gt, with_masks=masks, has_gt_proposals=with_gt,
        mask_overlaps=_overlap_columns(s, masks), image_block=commit_block(config.batch_size, config.block_images),
        # Train rows sorted by label: a bi-level batch's rows of one class sit together, so a
        # streamed batch decodes the inner chunks it uses (docs/scale.md).
        row_order="label" if s.name == "train" else "proposal", store_logits=_stores_logits(config),
    )


def _stores_logits(config: ExtractConfig) -> bool:
    """Logits are stored on request, or when no fc level is extracted to recompute them from."""
    return config.store_logits or "fc" not in config.levels


def _open_or_create(out: str, meta: StoreMeta, adapter: DetectorAdapter, inputs: list[_SplitInput],
                    config: ExtractConfig, rois_per_image: int) -> Store:
    overwrite = config.overwrite
    if config.resume:
        try:
            return open_for_resume(out, meta)
        except StoreNotFoundError:
            pass  # nothing there yet: --resume on a fresh location just starts
        except StoreUninitializedError:
            if config.shard.index != 0:
                return _wait_for_store(out, meta, config.wait_for_store_s)
            # Shard 0 alone creates stores, so an unfinished creation here was interrupted before
            # any image was written: creating it again loses nothing.
            overwrite = True
    if config.shard.index != 0:
        return _wait_for_store(out, meta, config.wait_for_store_s)
    classes = class_statistics(next(s.annset for s in inputs if s.name == "train")) if any(
        s.name == "train" for s in inputs) else class_statistics(inputs[0].annset)
    specs = [_split_spec(s, config, rois_per_image, keeps_masks(s.name, adapter)) for s in inputs]

    def extras(root) -> None:  # part of creation: a crash before the end leaves "not initialized"
        for stage in range(max(1, len(adapter.stage_fg_iou))):
            write_head_weights(root, adapter.head_state(stage), stage=stage)
        reg = adapter.box_regression()
        if reg is not None:
            write_box_regression(root, reg)
        for s, spec in zip(inputs, specs):  # cached evaluation without the json (cache_schema.eval_gt)
            record = eval_ground_truth(s.annset) if spec.mask_overlaps else None
            if record is not None:
                write_eval_gt(root[s.name], record)

    return create_store(out, meta=meta, classes=classes, overwrite=overwrite, splits=specs, extras=extras)


def _wait_for_store(out: str, meta: StoreMeta, timeout_s: float) -> Store:
    """Shards other than 0 wait for shard 0 to create the store, then check it matches."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return open_for_resume(out, meta)
        except (StoreNotFoundError, StoreUninitializedError):
            pass
        if time.monotonic() > deadline:
            raise StoreExistsError(f"shard 0 did not create the store at {out} within {timeout_s:.0f} s; start shard 0 too")
        time.sleep(1.0)


def _stage_arrays(out, s: _SplitInput, rows: np.ndarray, stage_fg_iou: tuple[float, ...], levels: tuple[str, ...],
                  num_classes: int) -> dict[str, np.ndarray]:
    """A cascade's per-stage arrays of one image (cache_schema.layout.stage_arrays): stage ``k``'s
    RoIs matched at its own foreground IoU, as its training assigner labels them."""
    arrays = {f"{stage_prefix(0)}rois/logits": out.stages[0].logits}
    for k, (stage, fg_iou) in enumerate(zip(out.stages, stage_fg_iou)):
        if k == 0:
            continue
        m = match_rois(rois=stage.boxes, gt_boxes=s.gt.boxes[rows], gt_labels=s.gt.labels[rows], gt_rows=rows,
                       num_classes=num_classes, fg_iou=fg_iou)
        values = {"boxes": stage.boxes, "labels": m.labels, "ious": m.ious, "gt_index": m.gt_index, "logits": stage.logits}
        arrays.update({f"{stage_prefix(k)}rois/{name}": v for name, v in values.items()})
        arrays.update({f"{stage_prefix(k)}feat/{lv}": stage.features[lv] for lv in levels})
    return arrays


def _label_batch(split, s: _SplitInput, group: list[int], outputs: list, config: ExtractConfig,
                 num_classes: int, with_masks: bool, stage_fg_iou: tuple[float, ...] = ()) -> list[dict[str, np.ndarray]]:
    """Label one batch's RoIs by IoU matching: per image, the arrays ``SplitStore.write_block``
    takes (train background subsampled, rows sorted by label where the split keeps that order)."""
    images = []
    for p, out in zip(group, outputs):
        rows = s.gt_rows_of_image[p]
        m = match_rois(rois=out.boxes, gt_boxes=s.gt.boxes[rows], gt_labels=s.gt.labels[rows], gt_rows=rows,
                       num_classes=num_classes, fg_iou=config.fg_iou)
        arrays = {"rois/boxes": out.boxes, "rois/objectness": out.objectness, "rois/is_gt": out.is_gt,
                  "rois/labels": m.labels, "rois/ious": m.ious, "rois/gt_index": m.gt_index,
                  "rois/logits": out.logits, "rois/reg_boxes": out.reg_boxes}
        arrays.update({f"feat/{lv}": out.features[lv] for lv in config.levels})
        if stage_fg_iou:
            arrays.update(_stage_arrays(out, s, rows, stage_fg_iou, config.levels, num_classes))
        keep = stored_rows(m.labels, num_classes=num_classes, seed=config.seed, image=p,
                           background=config.train_bg_per_image if s.name == "train" else None,
                           sort_by_label=split.row_order == "label")
        arrays = {path: np.asarray(v)[keep] for path, v in arrays.items()}
        if with_masks:
            arrays["rois/mask_logits"] = out.mask_logits
        if split.mask_overlaps:
            arrays["rois/mask_area"], arrays["rois/mask_inter"] = _overlaps(s, p, out, split.mask_overlaps)
        stored = split.roi_array_paths()
        images.append({path: v for path, v in arrays.items() if path in stored})
    return images


class _BlockCommitter:
    """Collects labelled images until their commit block is whole, then writes it in one
    ``write_block`` (done marks last). Batches of a block arrive consecutively, so at most one
    block is held. Returns from :meth:`add` the RoIs written."""

    def __init__(self, split) -> None:
        self.split = split
        self.start: int | None = None
        self.images: list[dict[str, np.ndarray]] = []

    def add(self, group: list[int], images: list[dict[str, np.ndarray]]) -> int:
        block = self.split.commit_block
        start = group[0] // block * block
        if self.start is not None and start != self.start:
            raise RuntimeError(f"block {self.start} was left incomplete before block {start}")  # a bug, not bad input
        if self.start is None:
            self.start = start
        expected = self.start + len(self.images)
        if group[0] != expected:
            raise RuntimeError(f"image {group[0]} arrived where image {expected} was expected")
        self.images.extend(images)
        if self.start + len(self.images) < min(self.start + block, self.split.num_images):
            return 0
        written = sum(len(a["rois/labels"]) for a in self.images)
        self.split.write_block(self.start, self.images)
        self.start, self.images = None, []
        return written


def _overlaps(s: _SplitInput, p: int, out, columns: int) -> tuple[np.ndarray, np.ndarray]:
    im = s.annset.images[p]
    return image_overlaps(anns=s.annset.annotations[p], height=im.height, width=im.width, reg_boxes=out.reg_boxes,
                          mask_logits=out.mask_logits, columns=columns)


def _run_split(store: Store, s: _SplitInput, adapter: DetectorAdapter, config: ExtractConfig,
               rois_per_image: int, progress: ExtractProgress) -> tuple[int, int]:
    split = store.split(s.name)
    done, block = split.done(), split.commit_block
    # Whole blocks are rerun when any of their images lacks its mark (e.g. after `cache invalidate`).
    groups = [g for g in batch_groups(len(s.annset), config.batch_size, config.shard, block=block)
              if not done[g[0] // block * block:(g[0] // block + 1) * block].all()]
    with_gt = s.name in GT_PROPOSAL_SPLITS
    with_masks = keeps_masks(s.name, adapter)
    progress.start_split(s.name, images=sum(len(g) for g in groups))
    images_written = rois_written = 0
    # Matching, encoding and writing a batch (numpy/blosc/file I/O, which release the GIL) run on a
    # writer thread while the detector computes the next batch. At most one batch waits, so memory
    # stays bounded and a failed write surfaces at the next batch.
    committer = _BlockCommitter(split)

    def label_and_commit(group: list[int], outputs: list) -> int:
        return committer.add(group, _label_batch(split, s, group, outputs, config, adapter.num_classes, with_masks,
                                                 adapter.stage_fg_iou))

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="roicache-writer") as writer:
        pending = None
        for group in groups:
            gt_boxes = [s.gt.boxes[s.gt_rows_of_image[p]] for p in group] if with_gt else None
            outputs = adapter.run([read_rgb(s.annset.image_path(p)) for p in group], gt_boxes=gt_boxes,
                                  levels=config.levels, max_proposals=rois_per_image, with_masks=with_masks)
            if pending is not None:
                rois_written += pending.result()
            pending = writer.submit(label_and_commit, group, outputs)
            images_written += len(group)
            progress.advance(images=len(group), rois=sum(len(o) for o in outputs))
        if pending is not None:
            rois_written += pending.result()
    return images_written, rois_written


def extract(*, ckpt: Path, data: Path, out: str, config: ExtractConfig, progress: bool = True) -> ExtractReport:
    """Fill the store at ``out`` with this shard's images; returns what was written."""
    configure_threads(config.threads)
    device = pick_device(config.device)
    if "://" not in str(out) and not Path(out).exists():  # an existing path: the store checks say more
        check_output(out, kind="dir")  # its parents, before the detector loads
    check_data_matches(Path(ckpt), Path(data))  # the shipped detector fits one benchmark only
    adapter = load_adapter(ckpt, device=device, config=config.detector_config)
    unknown = [lv for lv in config.levels if lv not in adapter.levels]
    if unknown:
        raise ConfigError(f"--levels {','.join(unknown)} not produced by this detector; choose from {','.join(adapter.levels)}")
    rois_per_image = config.rois_per_image or adapter.default_proposals
    inputs = [_load_split(Path(data), name, adapter) for name in config.splits]
    meta = _meta(adapter, Path(ckpt), inputs, config, rois_per_image, str(out))
    store = _open_or_create(str(out), meta, adapter, inputs, config, rois_per_image)
    start = time.perf_counter()
    images = rois = 0
    with ExtractProgress(enabled=progress) as bar:
        for s in inputs:
            i, r = _run_split(store, s, adapter, config, rois_per_image, bar)
            images, rois = images + i, rois + r
    complete = finalize(store)
    return ExtractReport(store=store.path, images_written=images, rois_written=rois,
                         seconds=time.perf_counter() - start, complete=complete)

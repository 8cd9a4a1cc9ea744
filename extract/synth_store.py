"""``roicache cache synth``: a store in the real layout filled with seeded synthetic RoIs.

Why: reading and training at LVIS scale (100k images, 1,203 classes) must be measurable without
a detector or the dataset. The store is an ordinary schema-2 store — same arrays, chunking,
commit blocks, label-sorted train rows, detector head weights — so every reader, ``heads train``
and ``cache validate`` run on it unchanged.

What is synthetic, and how (every draw from ``numpy.random.default_rng((seed, ...))``):

1. class frequencies: weight ``w_k = exp(sigma * z_k)``, ``z_k ~ N(0, 1)`` (log-normal). With
   ``sigma = 2.5`` at LVIS v1 size (100k images, 12.7 objects per image) about 28 / 38 / 34 % of
   classes fall in LVIS's rare / common / frequent groups (LVIS v1: 28 / 38 / 34 %); the report
   gives the shares of the store actually written;
2. per image ``n_gt ~ Poisson(gt_per_image)`` (at least 1) objects of classes ``~ w``; each
   object yields its GT box (appended, as extraction appends GT boxes to train proposals) and
   ``Poisson(fg_per_gt)`` more foreground proposals; ``bg_per_image`` background proposals
   (what ``extract --train-bg-per-image`` keeps); rows sorted by label, as extraction writes;
3. features: float16 rows of a seeded pool (post-ReLU for fc, dense for pooled) drawn by class
   and scaled per row, so they compress like real features but cost little to make.
"""

from __future__ import annotations

import hashlib
import json
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass

import numpy as np
from rich.progress import Progress

from cache_schema import (ClassInfo, DatasetInfo, DetectorInfo, ExtractionSettings, GtTable, SplitSource, SplitSpec,
                          StoreMeta, create_store, finalize)
from cache_schema.errors import ConfigError
from cache_schema.head_init import write_head_weights
from cache_schema.layout import FREQUENCY_CODES

_POOL_ROWS = 4096


@dataclass(frozen=True, kw_only=True)
class SynthStoreConfig:
    """What ``cache synth`` writes (recorded in the store's ``detector.arch``)."""

    images: int
    classes: int = 1203
    rois_per_image: int = 300
    levels: tuple[tuple[str, tuple[int, ...]], ...] = (("fc", (1024,)), ("pooled", (256, 7, 7)))
    gt_per_image: float = 12.7
    fg_per_gt: float = 4.0
    bg_per_image: int = 16
    sigma: float = 2.5
    seed: int = 0
    block_images: int = 32

    def __post_init__(self) -> None:
        if self.images < 1 or self.classes < 1 or self.rois_per_image < 1:
            raise ConfigError("--images, --classes and --rois-per-image must be >= 1")
        if self.gt_per_image <= 0 or self.fg_per_gt < 0 or self.bg_per_image < 0 or self.sigma < 0:
            raise ConfigError("--gt-per-image must be > 0; --fg-per-gt, --bg-per-image and --sigma >= 0")
        if self.block_images < 1:
            raise ConfigError(f"--block-images must be >= 1, got {self.block_images}")
        if "fc" not in dict(self.levels):
            raise ConfigError("--levels must include fc (the class logits are recomputed from it)")


@dataclass(frozen=True, kw_only=True)
class SynthReport:
    out: str
    images: int
    rois: int
    gt: int
    seconds: float
    stored_bytes: int
    frequency_shares: dict[str, float]


def parse_levels(text: str) -> tuple[tuple[str, tuple[int, ...]], ...]:
    """``"fc:1024,pooled:256x7x7"`` -> ``(("fc", (1024,)), ("pooled", (256, 7, 7)))``."""
    out = []
    for item in (t.strip() for t in text.split(",") if t.strip()):
        name, _, shape = item.partition(":")
        try:
            dims = tuple(int(d) for d in shape.split("x"))
        except ValueError:
            dims = ()
        if not name or not dims or min(dims) < 1:
            raise ConfigError(f"--levels item {item!r} is not name:shape, e.g. fc:1024 or pooled:256x7x7")
        out.append((name, dims))
    if not out:
        raise ConfigError("--levels is empty; give e.g. fc:1024,pooled:256x7x7")
    return tuple(out)


def _gt(config: SynthStoreConfig) -> tuple[GtTable, np.ndarray]:
    """The GT table and, per GT, its foreground proposals besides its own box (int64 ``[G]``)."""
    rng = np.random.default_rng((config.seed, 0))
    weights = np.exp(config.sigma * rng.standard_normal(config.classes))           # (1)
    per_image = np.maximum(1, rng.poisson(config.gt_per_image, size=config.images))  # (2)
    image = np.repeat(np.arange(config.images), per_image)
    labels = rng.choice(config.classes, size=len(image), p=weights / weights.sum())
    xy = rng.uniform(0, 400, size=(len(image), 2))
    wh = rng.uniform(16, 200, size=(len(image), 2))
    # Capped so that foreground never outnumbers the image's proposals.
    extra = np.minimum(rng.poisson(config.fg_per_gt, size=len(image)), max(0, config.rois_per_image // max(1, int(per_image.max()))))
    gt = GtTable(boxes=np.concatenate([xy, xy + wh], axis=1), labels=labels, image=image,
                 area=wh.prod(axis=1) * 0.7, ann_id=np.arange(1, len(image) + 1))
    return gt, extra.astype(np.int64)


def _classes(config: SynthStoreConfig, gt: GtTable) -> ClassInfo:
    c = config.classes
    pairs = np.unique(gt.labels.astype(np.int64) * config.images + gt.image)  # (class, image), sorted
    image_count = np.bincount(pairs // config.images, minlength=c).astype(np.int64)
    freq = tuple("r" if n <= 10 else "c" if n <= 100 else "f" for n in image_count)
    return ClassInfo(names=tuple(f"class_{k}" for k in range(c)), category_ids=tuple(range(1, c + 1)), frequency=freq,
                     instance_count=np.bincount(gt.labels, minlength=c).astype(np.int64), image_count=image_count,
                     csr_indptr=np.concatenate([[0], np.cumsum(image_count)]).astype(np.int64),
                     csr_images=(pairs % config.images).astype(np.int64))


def _meta(config: SynthStoreConfig) -> StoreMeta:
    identity = hashlib.sha256(json.dumps(asdict(config), sort_keys=True).encode()).hexdigest()
    levels = {name: tuple(shape) for name, shape in config.levels}
    detector = DetectorInfo(backend="synthetic", arch={"name": "synthetic", **asdict(config)}, checkpoint_sha256=identity,
                            checkpoint_path="(synthetic)", levels=levels, num_classes=config.classes)
    dataset = DatasetInfo(splits={"train": SplitSource(annotation_path="(synthetic)", annotation_sha256=identity,
                                                       image_root="(synthetic)")},
                          category_ids=tuple(range(1, config.classes + 1)))
    settings = ExtractionSettings(rois_per_image=config.rois_per_image, seed=config.seed, with_masks=False,
                                  train_bg_per_image=config.bg_per_image, store_logits=False)
    return StoreMeta(detector=detector, dataset=dataset, extraction=settings, splits=("train",), num_classes=config.classes)


def _head(config: SynthStoreConfig) -> dict[str, np.ndarray]:
    rng = np.random.default_rng((config.seed, 1))
    levels = dict(config.levels)
    d_in = int(np.prod(levels.get("pooled", levels["fc"])))
    d = int(levels["fc"][0])
    shapes = {"fc6.weight": (d, d_in), "fc6.bias": (d,), "fc7.weight": (d, d), "fc7.bias": (d,),
              "cls.weight": (config.classes + 1, d), "cls.bias": (config.classes + 1,)}
    return {k: (rng.standard_normal(s) * 0.01).astype(np.float32) for k, s in shapes.items()}


class _ImageMaker:
    """Rows of one image (the arrays ``write_block`` takes), from the GT and a seeded stream."""

    def __init__(self, config: SynthStoreConfig, gt: GtTable, extra: np.ndarray, paths: dict) -> None:
        self.config, self.gt, self.extra, self.paths = config, gt, extra, paths
        self.rows_of = np.concatenate([[0], np.cumsum(np.bincount(gt.image, minlength=config.images))])
        rng = np.random.default_rng((config.seed, 2))
        # (3) a pool of rows per level: fc is post-ReLU (~half zeros, the rest |N(0, 1)|), other
        # levels (RoIAlign of FPN outputs, no ReLU) dense N(0, 1) — so each compresses about as real
        # features do (fc ~0.5-0.6, pooled ~0.9 of raw: scale.md).
        self.pools = {p: (np.maximum(x, 0) if p == "feat/fc" else x).astype(np.float16)
                      for p, (_, t) in paths.items() if p.startswith("feat/")
                      for x in (rng.standard_normal((_POOL_ROWS, *t)),)}

    def __call__(self, i: int) -> dict[str, np.ndarray]:
        cfg, c = self.config, self.config.classes
        rng = np.random.default_rng((cfg.seed, 3, i))
        own = np.arange(self.rows_of[i], self.rows_of[i + 1])
        gt_rows = np.concatenate([np.repeat(own, self.extra[own]), own])
        n_fg, n = len(gt_rows), len(gt_rows) + cfg.bg_per_image
        labels = np.concatenate([self.gt.labels[gt_rows], np.full(cfg.bg_per_image, c)]).astype(np.int32)
        boxes = np.concatenate([self.gt.boxes[gt_rows] + rng.normal(0, 4, (n_fg, 4)),
                                rng.uniform(0, 400, (cfg.bg_per_image, 4))]).astype(np.float32)
        boxes[:, 2:] = np.maximum(boxes[:, 2:], boxes[:, :2] + 1)
        is_gt = np.zeros(n, bool)
        is_gt[n_fg - len(own):n_fg] = True
        boxes[is_gt] = self.gt.boxes[own]
        ious = np.concatenate([np.where(is_gt[:n_fg], 1.0, rng.uniform(0.5, 1.0, n_fg)), rng.uniform(0, 0.5, cfg.bg_per_image)])
        out = {"rois/boxes": boxes, "rois/objectness": np.where(is_gt, np.inf, rng.normal(0, 2, n)).astype(np.float32),
               "rois/is_gt": is_gt, "rois/labels": labels, "rois/ious": ious.astype(np.float32),
               "rois/gt_index": np.concatenate([gt_rows, np.full(cfg.bg_per_image, -1)]).astype(np.int32),
               "rois/reg_boxes": boxes.copy()}
        pick = (labels.astype(np.int64) * 31 + rng.integers(0, 8, n)) % _POOL_ROWS
        scale = rng.uniform(0.5, 1.5, size=n).astype(np.float16)
        for path, pool in self.pools.items():
            out[path] = pool[pick] * scale.reshape(-1, *([1] * (pool.ndim - 1)))
        order = np.argsort(labels, kind="stable")
        return {p: v[order] for p, v in out.items() if p in self.paths}


def synth_store(out: str, config: SynthStoreConfig, *, overwrite: bool = False, progress: bool = True) -> SynthReport:
    """Write the synthetic store described by ``config`` at ``out`` (a path or URL)."""
    start = time.perf_counter()
    gt, extra = _gt(config)
    classes = _classes(config, gt)
    # The stride is the most rows any image holds (as extraction's: proposals + GT), not more.
    rows = np.bincount(gt.image, weights=extra + 1, minlength=config.images) + config.bg_per_image
    spec = SplitSpec(name="train", image_ids=np.arange(config.images, dtype=np.int64) + 1,
                     image_sizes=np.full((config.images, 2), 600, np.int32),
                     file_names=tuple(f"synthetic/{i:08d}.jpg" for i in range(config.images)), stride=int(rows.max()),
                     levels=tuple(name for name, _ in config.levels), gt=gt, has_gt_proposals=True,
                     image_block=config.block_images, row_order="label", store_logits=False)
    store = create_store(out, meta=_meta(config), classes=classes, splits=[spec], overwrite=overwrite)
    write_head_weights(store, _head(config))
    split = store.split("train")
    make = _ImageMaker(config, gt, extra, split.roi_array_paths())
    rois = 0
    with Progress(disable=not progress, transient=True) as bar, ThreadPoolExecutor(1) as writer:
        task = bar.add_task("writing synthetic store", total=config.images)
        pending = None
        for a in range(0, config.images, split.commit_block):
            b = min(a + split.commit_block, config.images)
            images = [make(i) for i in range(a, b)]  # the next block is made while this one is written
            rois += sum(len(x["rois/labels"]) for x in images)
            if pending is not None:
                pending.result()
            pending = writer.submit(split.write_block, a, images)
            bar.advance(task, b - a)
        if pending is not None:
            pending.result()
    finalize(store)
    freq = np.asarray([FREQUENCY_CODES[f] for f in classes.frequency])
    shares = {g: float((freq == code).mean()) for g, code in FREQUENCY_CODES.items()}
    stored = sum(split.stored_nbytes(p) for p in split.roi_array_paths())
    return SynthReport(out=store.path, images=config.images, rois=rois, gt=len(gt), seconds=time.perf_counter() - start,
                       stored_bytes=int(stored), frequency_shares=shares)

"""Batch samplers over cached train RoIs (DESIGN.md §3).

Every sampler answers ``batch(step) -> Batch``: the global RoI rows (see
:class:`heads.sources.RoiIndex`) that make up training step ``step``. Randomness is
*counter-based*: step ``s`` draws from ``np.random.Generator(PCG64(SeedSequence([seed, stream,
s])))``, so a batch depends only on ``(seed, step)`` — resuming at step ``s`` needs no RNG state
beyond the step itself, and a source swap (memory ↔ streaming) cannot change the batches.

Plug-ins: :data:`SAMPLERS` maps a config name to a class; constructors are keyword-only.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cache_schema.errors import ConfigError, SchemaError
from cache_schema.records import ClassInfo
from heads.sources import RoiIndex

# Separate random streams per purpose so that, e.g., changing RFS's RoI budget never changes
# which images it drew.
_STREAM_BILEVEL, _STREAM_BALANCED, _STREAM_RANDOM_EPOCH, _STREAM_RFS_EPOCH, _STREAM_RFS_BUDGET = 1, 2, 3, 4, 5


def step_rng(seed: int, stream: int, counter: int) -> np.random.Generator:
    """The generator of draw ``counter`` (a step or an epoch) of random stream ``stream``."""
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(seed), int(stream), int(counter)])))


@dataclass(frozen=True, kw_only=True, eq=False)
class Batch:
    """One training step's RoIs.

    Attributes:
        rows: int64 ``[n]`` global rows into the source's index (duplicates allowed for RFS).
        images: int64 ``[k]`` split positions of the images the rows come from (ascending, unique).
        classes: int64 ``[m]`` classes drawn this step (bilevel, class_balanced), else ``None``.
    """

    rows: np.ndarray
    images: np.ndarray
    classes: np.ndarray | None = None


def _check_seed(seed: int) -> None:
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ConfigError(f"sampler seed must be a non-negative integer, got {seed!r}")


def _class_blocks(index: RoiIndex, class_info: ClassInfo) -> tuple[np.ndarray, np.ndarray]:
    """CSR class -> blocks of the index holding the class's train images (images absent from the
    index dropped). Returns ``(indptr [C+1], blocks [nnz])``."""
    if class_info.num_classes != index.num_classes:
        raise SchemaError(f"ClassInfo has C={class_info.num_classes} classes but the RoI index has "
                          f"C={index.num_classes}; load both from the same store")
    lut = index.block_of_position()
    pos = class_info.csr_images.astype(np.int64)
    cls = np.repeat(np.arange(class_info.num_classes), np.diff(class_info.csr_indptr))
    inside = (pos >= 0) & (pos < len(lut))
    blocks = np.full(len(pos), -1, dtype=np.int64)
    blocks[inside] = lut[pos[inside]]
    keep = blocks >= 0
    counts = np.bincount(cls[keep], minlength=class_info.num_classes)
    return np.concatenate(([0], np.cumsum(counts))).astype(np.int64), blocks[keep]


class RandomSampler:
    """Uniform RoI-level batches, as in standard training: each epoch is a fresh permutation of
    all train RoIs; step ``s`` takes positions ``[s*B, (s+1)*B)`` of the endless concatenation of
    epochs (a batch may straddle two epochs)."""

    name = "random"

    def __init__(self, *, index: RoiIndex, seed: int, batch_rois: int = 512) -> None:
        _check_seed(seed)
        if batch_rois <= 0:
            raise ConfigError(f"sampler.batch_rois must be positive, got {batch_rois}")
        if index.num_rows == 0:
            raise SchemaError("random sampler: the train split has no RoIs; extract it first")
        self.index, self.seed, self.batch_rois = index, int(seed), int(batch_rois)
        self._perms: dict[int, np.ndarray] = {}

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            if len(self._perms) >= 2:
                self._perms.pop(min(self._perms))
            self._perms[epoch] = step_rng(self.seed, _STREAM_RANDOM_EPOCH, epoch).permutation(self.index.num_rows)
        return self._perms[epoch]

    def batch(self, step: int) -> Batch:
        n, b = self.index.num_rows, self.batch_rois
        start, parts = step * b, []
        while b > 0:
            epoch, offset = divmod(start, n)
            take = min(b, n - offset)
            parts.append(self._perm(epoch)[offset:offset + take])
            start, b = start + take, b - take
        rows = np.concatenate(parts)
        return Batch(rows=rows, images=np.unique(self.index.images[self.index.blocks_of_rows(rows)]))

    def state_dict(self) -> dict:
        return {"name": self.name, "seed": self.seed, "batch_rois": self.batch_rois}


class ClassBalancedSampler:
    """cRT-style class-balanced RoI batches.

    (1) draw ``n_fg = round(B / (1 + r))`` classes uniformly (with replacement) from the classes
    that have at least one foreground RoI; (2) one RoI uniformly among that class's foreground
    RoIs; (3) ``B - n_fg`` background RoIs uniformly (``r`` = background_ratio, bg:fg = r:1;
    default 1.0, the SimCal ratio, so the head sees as much background as with bilevel).
    """

    name = "class_balanced"

    def __init__(self, *, index: RoiIndex, seed: int, batch_rois: int = 512, background_ratio: float = 1.0) -> None:
        _check_seed(seed)
        if batch_rois <= 1 or background_ratio < 0:
            raise ConfigError("class_balanced sampler needs batch_rois >= 2 and background_ratio >= 0")
        self.index, self.seed = index, int(seed)
        self.batch_rois, self.background_ratio = int(batch_rois), float(background_ratio)
        labels = index.labels
        fg = np.flatnonzero(labels < index.num_classes)
        order = fg[np.argsort(labels[fg], kind="stable")]
        counts = np.bincount(labels[fg], minlength=index.num_classes)
        self._fg_rows, self._fg_count = order, counts
        self._fg_ptr = np.concatenate(([0], np.cumsum(counts))).astype(np.int64)
        self._bg_rows = np.flatnonzero(labels == index.num_classes)
        self.classes = np.flatnonzero(counts > 0)
        if len(self.classes) == 0:
            raise SchemaError("class_balanced sampler: no train RoI is foreground (empty class set); check "
                              "the store's IoU threshold and that the train split was extracted")

    def batch(self, step: int) -> Batch:
        rng = step_rng(self.seed, _STREAM_BALANCED, step)
        n_fg = max(1, int(round(self.batch_rois / (1.0 + self.background_ratio))))
        n_bg = self.batch_rois - n_fg if len(self._bg_rows) else 0
        classes = rng.choice(self.classes, size=n_fg, replace=True)
        fg = self._fg_rows[self._fg_ptr[classes] + rng.integers(0, self._fg_count[classes])]
        bg = self._bg_rows[rng.integers(0, len(self._bg_rows), size=n_bg)] if n_bg else np.zeros(0, np.int64)
        rows = np.concatenate([fg, bg])
        return Batch(rows=rows, classes=np.unique(classes),
                     images=np.unique(self.index.images[self.index.blocks_of_rows(rows)]))

    def state_dict(self) -> dict:
        return {"name": self.name, "seed": self.seed, "batch_rois": self.batch_rois,
                "background_ratio": self.background_ratio}


class BilevelSampler:
    """SimCal bi-level sampling (seed 002 §4.2, supp. G.2).

    Per step:
      (1) n classes c_1..c_n ~ Uniform(all classes with a train image in the source)
          ("n object classes are sampled uniformly from all the classes"). The paper does not say
          whether with replacement; the official code draws with ``np.random.choice`` (with
          replacement) — our default; ``replacement=False`` draws distinct classes.
      (2) I_{c_i} ~ Uniform(train images containing c_i) (ClassInfo CSR), ``images_per_class``
          each, with replacement (as the code's ``random.choices``).
      (3) keep foreground RoIs whose matched class is one of c_1..c_n (``keep="drawn_classes"``,
          the paper: "only collect proposals that belong to the sampled classes and background")
          or, ``keep="own_class"`` (the code), only RoIs of the class each image was drawn for;
          an image drawn twice counts once under "drawn_classes".
      (4) background (label == C) subsampled without replacement to
          ``round(background_ratio * n_fg)`` (1:1 by default) — fewer when the images hold fewer.
    A draw whose kept foreground is empty has a zero background quota and teaches nothing, so the
    step redraws (1)-(4) from the same step stream, up to ``max_tries`` times, then raises.
    """

    name = "bilevel"

    def __init__(self, *, index: RoiIndex, class_info: ClassInfo, seed: int, classes_per_batch: int = 16,
                 images_per_class: int = 1, replacement: bool = True, keep: str = "drawn_classes",
                 background_ratio: float = 1.0, max_tries: int = 64) -> None:
        _check_seed(seed)
        if classes_per_batch <= 0 or images_per_class <= 0 or background_ratio < 0:
            raise ConfigError("bilevel sampler needs classes_per_batch > 0, images_per_class > 0, "
                              "background_ratio >= 0")
        if keep not in ("drawn_classes", "own_class"):
            raise ConfigError(f"bilevel sampler keep={keep!r} is unknown; valid: drawn_classes, own_class")
        self.index, self.seed = index, int(seed)
        self.classes_per_batch, self.images_per_class = int(classes_per_batch), int(images_per_class)
        self.replacement, self.keep = bool(replacement), keep
        self.background_ratio, self.max_tries = float(background_ratio), int(max_tries)
        self._ptr, self._blocks = _class_blocks(index, class_info)
        self._count = np.diff(self._ptr)
        self.classes = np.flatnonzero(self._count > 0)
        if len(self.classes) == 0:
            raise SchemaError("bilevel sampler: no class has a train image in the source (empty class set); "
                              "check that ClassInfo and the RoIs come from the same store's train split")

    def _draw(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        n = self.classes_per_batch if self.replacement else min(self.classes_per_batch, len(self.classes))
        classes = rng.choice(self.classes, size=n, replace=self.replacement)                      # (1)
        per_image_class = np.repeat(classes, self.images_per_class)
        pick = self._ptr[per_image_class] + rng.integers(0, self._count[per_image_class])          # (2)
        blocks = self._blocks[pick]
        index, bg_label = self.index, self.index.num_classes
        uniq = np.unique(blocks)
        rows_u = index.rows_of_blocks(uniq)
        if self.keep == "drawn_classes":                                                           # (3)
            fg = rows_u[np.isin(index.labels[rows_u], classes)]
        else:
            rows_p = index.rows_of_blocks(blocks)
            owner = np.repeat(per_image_class, np.diff(index.image_offsets)[blocks])
            fg = rows_p[index.labels[rows_p] == owner]
        bg_all = rows_u[index.labels[rows_u] == bg_label]
        n_bg = min(len(bg_all), int(round(self.background_ratio * len(fg))))                      # (4)
        bg = np.sort(rng.choice(bg_all, size=n_bg, replace=False)) if n_bg else np.zeros(0, np.int64)
        return classes, uniq, fg, bg

    def batch(self, step: int) -> Batch:
        rng = step_rng(self.seed, _STREAM_BILEVEL, step)
        for _ in range(self.max_tries):
            classes, blocks, fg, bg = self._draw(rng)
            if len(fg):
                return Batch(rows=np.concatenate([fg, bg]), classes=np.sort(classes),
                             images=self.index.images[blocks])
        raise SchemaError(f"bilevel sampler: {self.max_tries} draws at step {step} found no foreground RoI of "
                          f"the drawn classes; the store's train RoIs lack matched proposals (extract with GT "
                          f"boxes added as proposals)")

    def state_dict(self) -> dict:
        return {"name": self.name, "seed": self.seed, "classes_per_batch": self.classes_per_batch,
                "images_per_class": self.images_per_class, "replacement": self.replacement, "keep": self.keep,
                "background_ratio": self.background_ratio}


class RepeatFactorSampler:
    """Repeat-factor image sampling (LVIS paper; behaviour of detectron2's RepeatFactorTrainingSampler).

      (1) f(c) = |images containing c| / |train images|
      (2) r(c) = max(1, sqrt(t / f(c)))
      (3) r(I) = max_{c in I} r(c)   (1 for an image without annotations)
      (4) every epoch, image I appears floor(r(I)) + Bernoulli(frac(r(I))) times (stochastic
          rounding), then the epoch's list is shuffled; epochs are concatenated endlessly.
    Step ``s`` takes the ``k`` images at stream positions ``[s*k, (s+1)*k)`` and all their RoIs
    (duplicated when an image repeats within the batch), subsampled uniformly to ``max_rois``
    when ``max_rois > 0``.
    """

    name = "rfs"

    def __init__(self, *, index: RoiIndex, class_info: ClassInfo, seed: int, threshold: float = 0.001,
                 images_per_batch: int = 16, max_rois: int = 0, num_train_images: int | None = None) -> None:
        _check_seed(seed)
        if threshold <= 0 or images_per_batch <= 0 or max_rois < 0:
            raise ConfigError("rfs sampler needs threshold > 0, images_per_batch > 0, max_rois >= 0")
        if index.num_blocks == 0:
            raise SchemaError("rfs sampler: the train split has no images; extract it first")
        self.index, self.seed, self.threshold = index, int(seed), float(threshold)
        self.images_per_batch, self.max_rois = int(images_per_batch), int(max_rois)
        n_images = int(num_train_images or index.num_blocks)
        ptr, blocks = _class_blocks(index, class_info)
        f = class_info.image_count.astype(np.float64) / n_images                                   # (1)
        with np.errstate(divide="ignore"):
            self.class_factors = np.maximum(1.0, np.sqrt(self.threshold / f))                      # (2)
        owner = np.repeat(np.arange(class_info.num_classes), np.diff(ptr))
        self.image_factors = np.ones(index.num_blocks, dtype=np.float64)
        np.maximum.at(self.image_factors, blocks, self.class_factors[owner])                       # (3)
        self._whole = np.floor(self.image_factors).astype(np.int64)
        self._frac = self.image_factors - self._whole
        self._epochs: dict[int, np.ndarray] = {}
        self._starts = [0]  # stream position where epoch e starts, grown lazily

    def epoch(self, e: int) -> np.ndarray:
        """Block order of epoch ``e`` (int64), after stochastic rounding and shuffling (4)."""
        if e not in self._epochs:
            rng = step_rng(self.seed, _STREAM_RFS_EPOCH, e)
            reps = self._whole + (rng.random(len(self._frac)) < self._frac)
            order = rng.permutation(np.repeat(np.arange(len(reps), dtype=np.int64), reps))
            if len(self._epochs) >= 3:
                self._epochs.pop(min(self._epochs))
            self._epochs[e] = order
        return self._epochs[e]

    def _locate(self, pos: int) -> tuple[int, int]:
        while self._starts[-1] <= pos:
            e = len(self._starts) - 1
            self._starts.append(self._starts[-1] + len(self.epoch(e)))
        e = int(np.searchsorted(self._starts, pos, side="right")) - 1
        return e, pos - self._starts[e]

    def batch(self, step: int) -> Batch:
        pos, need, parts = step * self.images_per_batch, self.images_per_batch, []
        while need > 0:
            e, off = self._locate(pos)
            order = self.epoch(e)
            take = min(need, len(order) - off)
            parts.append(order[off:off + take])
            pos, need = pos + take, need - take
        blocks = np.concatenate(parts)
        rows = self.index.rows_of_blocks(blocks)
        if self.max_rois and len(rows) > self.max_rois:
            rng = step_rng(self.seed, _STREAM_RFS_BUDGET, step)
            rows = rows[np.sort(rng.choice(len(rows), size=self.max_rois, replace=False))]
        return Batch(rows=rows, images=np.unique(self.index.images[blocks]))

    def state_dict(self) -> dict:
        return {"name": self.name, "seed": self.seed, "threshold": self.threshold,
                "images_per_batch": self.images_per_batch, "max_rois": self.max_rois}


#: Config name -> sampler class.
SAMPLERS: dict[str, type] = {
    "random": RandomSampler,
    "class_balanced": ClassBalancedSampler,
    "bilevel": BilevelSampler,
    "rfs": RepeatFactorSampler,
}

"""Settings of the synthetic long-tailed benchmark and its deterministic per-class instance budget.

The train split has ``T = train_images * (min_objects + max_objects) / 2`` instances (rounded).
Class ``k`` of rank ``r`` (1 = most frequent) gets a share proportional to the Zipf-Mandelbrot
power law ``(r + rank_offset) ** -exponent`` of ``T``, at least ``min_train_instances``, rounded
by largest remainders so the total is exactly ``T``. The counts depend only on the config (not on
the seed); the seed only decides which class gets which rank. With the defaults the instance bins
are 119 / 56 / 21 / 4 classes for ``<10``, ``[10,100)``, ``[100,1000)``, ``>=1000`` instances.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

from cache_schema.errors import ConfigError

GENERATOR_VERSION = "roicache.synthetic/1"
# Validation image ids are offset so they never collide with training ids (LVIS ids are unique
# across splits, and tools that merge splits rely on it).
VAL_ID_OFFSET = 1_000_000


@dataclass(frozen=True, kw_only=True)
class SynthConfig:
    """Synthetic benchmark settings. Sizes are pixels; fractions are of the image side or area.

    Attributes:
        num_classes: number of glyph classes ``C`` (4..number of usable OpenMoji glyphs).
        train_images / val_images: planned images per split (a few extra "overflow" images are
            appended when objects could not be placed visibly in a crowded image).
        image_size: square image side.
        min_objects / max_objects: objects per image (uniform, then adjusted to the budget).
        exponent / rank_offset: the power law ``(rank + rank_offset) ** -exponent``.
        min_train_instances: floor of a class's training instances.
        val_min_instances / val_max_instances: every class gets this many val instances (uniform)
            before the rest of the val budget is shared out like the train distribution.
        min_object_frac / max_object_frac: longer side of an object, log-uniform in this range.
        max_rotation_deg: rotation uniform in ``[-max, max]`` degrees.
        aspect_jitter: width/height ratio multiplied by ``exp(U(-a, a))``.
        colour_jitter: scale of brightness, contrast, saturation (``1 +- j``) and hue (``+- j/6``).
        blur_prob: probability of a Gaussian blur (radius 0.3-1.2 px) per object.
        min_visible_fraction / min_visible_pixels: an object must keep at least this much of its
            own mask visible after later objects are drawn over it.
        seed: master seed; every random choice derives from it via ``np.random.SeedSequence``.
    """

    num_classes: int = 200
    train_images: int = 3200
    val_images: int = 370
    image_size: int = 256
    min_objects: int = 2
    max_objects: int = 8
    exponent: float = 2.4
    rank_offset: float = 8.0
    min_train_instances: int = 1
    val_min_instances: int = 3
    val_max_instances: int = 5
    min_object_frac: float = 0.1
    max_object_frac: float = 0.45
    max_rotation_deg: float = 30.0
    aspect_jitter: float = 0.25
    colour_jitter: float = 0.3
    blur_prob: float = 0.3
    min_visible_fraction: float = 0.4
    min_visible_pixels: int = 40
    seed: int = 0

    def __post_init__(self) -> None:
        _check(self.num_classes >= 4, f"num_classes={self.num_classes} must be >= 4")
        _check(self.train_images >= 1 and self.val_images >= 1, "train_images and val_images must be >= 1")
        _check(self.train_images < VAL_ID_OFFSET // 2, f"train_images must be < {VAL_ID_OFFSET // 2}")
        _check(self.image_size >= 32, f"image_size={self.image_size} must be >= 32 pixels")
        _check(1 <= self.min_objects <= self.max_objects, "need 1 <= min_objects <= max_objects")
        _check(self.exponent > 0 and self.rank_offset >= 0, "exponent must be > 0 and rank_offset >= 0")
        _check(self.min_train_instances >= 1, "min_train_instances must be >= 1 (every class is trained on)")
        _check(1 <= self.val_min_instances <= self.val_max_instances, "need 1 <= val_min_instances <= val_max_instances")
        _check(0 < self.min_object_frac <= self.max_object_frac <= 0.6, "need 0 < min_object_frac <= max_object_frac <= 0.6")
        _check(0 <= self.max_rotation_deg <= 180, "max_rotation_deg must be in [0, 180]")
        _check(0 <= self.aspect_jitter <= 1 and 0 <= self.colour_jitter < 1, "aspect_jitter in [0,1], colour_jitter in [0,1)")
        _check(0 <= self.blur_prob <= 1, "blur_prob must be in [0, 1]")
        _check(0 < self.min_visible_fraction <= 1, "min_visible_fraction must be in (0, 1]")
        _check(self.min_visible_pixels >= 1, "min_visible_pixels must be >= 1")
        _check(self.seed >= 0, "seed must be >= 0")
        smallest = (self.min_object_frac * self.image_size) ** 2 * 0.25  # a thin glyph's area, roughly
        _check(
            self.min_visible_pixels <= smallest,
            f"min_visible_pixels={self.min_visible_pixels} exceeds what the smallest objects can show "
            f"(~{int(smallest)} px); lower it or raise min_object_frac",
        )
        total = self.train_total()
        _check(
            total >= self.num_classes * self.min_train_instances,
            f"train budget {total} instances cannot give {self.num_classes} classes "
            f"{self.min_train_instances} each; raise train_images",
        )
        _check(
            self.val_total() >= self.num_classes * self.val_max_instances,
            f"val budget {self.val_total()} instances cannot give {self.num_classes} classes "
            f"{self.val_max_instances} each; raise val_images",
        )

    def train_total(self) -> int:
        return int(round(self.train_images * (self.min_objects + self.max_objects) / 2))

    def val_total(self) -> int:
        return int(round(self.val_images * (self.min_objects + self.max_objects) / 2))

    def to_dict(self) -> dict:
        return asdict(self)


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(f"SynthConfig: {message}")


def _largest_remainder(raw: np.ndarray, total: int, floor: np.ndarray) -> np.ndarray:
    """Integers ``>= floor`` summing to ``total``, close to ``raw`` (ties broken by index)."""
    n = np.maximum(floor, np.floor(raw)).astype(np.int64)
    frac = raw - np.floor(raw)
    order = np.argsort(-frac, kind="stable")
    i = 0
    while n.sum() < total:
        n[order[i % len(n)]] += 1
        i += 1
    while n.sum() > total:
        # Why take from the largest: the floors hold the tail up; only the head can give.
        j = int(np.argmax(n - floor))
        n[j] -= 1
    return n


def rank_counts(config: SynthConfig) -> np.ndarray:
    """int64 ``[C]`` training instances by rank (descending); sums to ``config.train_total()``."""
    ranks = np.arange(1, config.num_classes + 1, dtype=np.float64)
    weight = (ranks + config.rank_offset) ** -config.exponent
    raw = config.train_total() * weight / weight.sum()
    floor = np.full(config.num_classes, config.min_train_instances, dtype=np.int64)
    return np.sort(_largest_remainder(raw, config.train_total(), floor))[::-1].copy()


def class_ranks(config: SynthConfig) -> np.ndarray:
    """int64 ``[C]``: rank position (0 = most frequent) of each class, a seeded permutation."""
    rng = np.random.default_rng(np.random.SeedSequence([config.seed, 1]))
    return rng.permutation(config.num_classes).astype(np.int64)


def train_targets(config: SynthConfig) -> np.ndarray:
    """int64 ``[C]`` training instances of each class (contiguous index)."""
    return rank_counts(config)[class_ranks(config)]


def val_targets(config: SynthConfig) -> np.ndarray:
    """int64 ``[C]`` val instances: a uniform floor in ``[val_min, val_max]`` per class, the rest
    of the val budget shared in proportion to the training counts."""
    rng = np.random.default_rng(np.random.SeedSequence([config.seed, 2]))
    floor = rng.integers(config.val_min_instances, config.val_max_instances + 1, size=config.num_classes)
    train = train_targets(config).astype(np.float64)
    spare = config.val_total() - int(floor.sum())
    raw = floor + spare * train / train.sum()
    return _largest_remainder(raw, config.val_total(), floor.astype(np.int64))


def objects_per_image(total: int, num_images: int, lo: int, hi: int, rng: np.random.Generator) -> np.ndarray:
    """int64 ``[num_images]`` object counts in ``[lo, hi]`` summing exactly to ``total``.

    The caller picks ``num_images`` so that ``num_images * lo <= total <= num_images * hi``.
    """
    if not num_images * lo <= total <= num_images * hi:
        raise ConfigError(f"{total} objects do not fit {num_images} images of {lo}..{hi} objects each")
    counts = rng.integers(lo, hi + 1, size=num_images).astype(np.int64)
    while counts.sum() != total:
        if counts.sum() < total:
            room = np.flatnonzero(counts < hi)
            counts[room[int(rng.integers(len(room)))]] += 1
        else:
            room = np.flatnonzero(counts > lo)
            counts[room[int(rng.integers(len(room)))]] -= 1
    return counts


def plan_split(targets: np.ndarray, num_images: int, config: SynthConfig, rng: np.random.Generator) -> list[list[int]]:
    """Class labels of each planned image (in drawing order), using every target instance once.

    The image count moves away from ``num_images`` only when the targets cannot fill that many
    images within ``[min_objects, max_objects]``.
    """
    total = int(targets.sum())
    num_images = max(num_images, math.ceil(total / config.max_objects))
    num_images = min(num_images, total // config.min_objects)
    counts = objects_per_image(total, num_images, config.min_objects, config.max_objects, rng)
    labels = rng.permutation(np.repeat(np.arange(len(targets)), targets))
    bounds = np.concatenate([[0], np.cumsum(counts)])
    return [labels[bounds[i] : bounds[i + 1]].tolist() for i in range(num_images)]

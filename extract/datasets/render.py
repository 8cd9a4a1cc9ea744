"""Rendering one synthetic image: jittered glyph instances composited over a background.

Objects are drawn in the given order; later objects occlude earlier ones. An object is only
accepted where, after drawing it, every earlier object still shows at least
``min_visible_fraction`` of its own mask (and ``min_visible_pixels``); after ``_MAX_TRIES`` failed
poses (shrinking the object every ``_SHRINK_EVERY`` tries) it is returned in ``leftover`` and the
caller puts it into another image, so no instance, and no class, is ever lost.

The instance mask is ``alpha >= 128`` of the transformed glyph; the visible mask is that minus the
masks of every later object. These are exactly what the annotation file stores.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFilter

from extract.datasets.backgrounds import random_background
from extract.datasets.synthetic_config import SynthConfig

MASK_THRESHOLD = 128  # alpha >= this is inside the instance mask
_MAX_TRIES = 40
_SHRINK_EVERY = 10
_SHRINK = 0.8


@dataclass(frozen=True, kw_only=True)
class RenderedImage:
    """One composited image and its instances (``N`` placed objects, drawing order).

    Attributes:
        rgb: uint8 ``[S, S, 3]``.
        labels: int64 ``[N]`` contiguous class indices of the placed objects.
        alphas: uint8 ``[N, S, S]`` each object's alpha in image coordinates (0 outside it).
        full_masks: bool ``[N, S, S]`` ``alphas >= MASK_THRESHOLD``.
        visible_masks: bool ``[N, S, S]`` full mask minus the full masks of later objects.
        leftover: class indices that could not be placed visibly (to be drawn elsewhere).
    """

    rgb: np.ndarray
    labels: np.ndarray
    alphas: np.ndarray
    full_masks: np.ndarray
    visible_masks: np.ndarray
    leftover: tuple[int, ...]


def image_rng(seed: int, split_code: int, image_id: int) -> np.random.Generator:
    """The generator of one image: a pure function of (master seed, split, image id), so images can
    be rendered in any order and in any process with identical results."""
    return np.random.default_rng(np.random.SeedSequence([seed, 100 + split_code, image_id]))


_LUMA = np.array([0.299, 0.587, 0.114], np.float32)


def colour_matrix(rng: np.random.Generator, j: float) -> tuple[np.ndarray, float]:
    """A random 3x3 colour transform and contrast factor: hue rotation about the grey axis by
    ``+- j/6`` turns, saturation and brightness ``x(1 +- j)``; contrast ``(1 +- j)`` is returned
    separately because it pulls towards the patch's mean luminance.

    Why linear: one matrix product per object instead of RGB<->HSV round trips (3x faster).
    """
    theta = rng.uniform(-j, j) / 6 * 2 * math.pi
    cos, sin = math.cos(theta), math.sin(theta)
    a, b = (1 - cos) / 3, math.sqrt(1 / 3) * sin
    hue = np.array([[cos + a, a - b, a + b], [a + b, cos + a, a - b], [a - b, a + b, cos + a]], np.float32)
    sat = rng.uniform(1 - j, 1 + j)
    saturation = sat * np.eye(3, dtype=np.float32) + (1 - sat) * np.tile(_LUMA, (3, 1))
    brightness = rng.uniform(1 - j, 1 + j)
    contrast = rng.uniform(1 - j, 1 + j)
    return (brightness * saturation @ hue).astype(np.float32), float(contrast)


def _colour_jitter(rgba: Image.Image, rng: np.random.Generator, j: float) -> Image.Image:
    """Jittered copy of an RGBA patch (alpha unchanged); contrast pulls to the mean luminance."""
    matrix, contrast = colour_matrix(rng, j)
    arr = np.asarray(rgba)
    opaque = arr[..., 3] >= MASK_THRESHOLD
    mean_rgb = arr[..., :3][opaque].mean(axis=0) if opaque.any() else np.zeros(3)
    mean = float(_LUMA @ matrix @ mean_rgb)
    # Pillow applies a 3x4 affine colour matrix in C: out = contrast * M x + (1 - contrast) * mean.
    affine = np.concatenate([contrast * matrix, np.full((3, 1), (1 - contrast) * mean, np.float32)], axis=1)
    rgb = rgba.convert("RGB").convert("RGB", matrix=tuple(float(v) for v in affine.ravel()))
    out = rgb.convert("RGBA")
    out.putalpha(rgba.getchannel("A"))
    return out


def render_instance(template: np.ndarray, side_px: float, rng: np.random.Generator, config: SynthConfig) -> np.ndarray:
    """A jittered copy of a glyph template, uint8 RGBA ``[h, w, 4]`` cropped to its alpha.

    ``side_px`` is the longer side before aspect change and rotation.
    """
    th, tw = template.shape[:2]
    aspect = math.exp(rng.uniform(-config.aspect_jitter, config.aspect_jitter))
    scale = side_px / max(th, tw)
    w = max(3, int(round(tw * scale * math.sqrt(aspect))))
    h = max(3, int(round(th * scale / math.sqrt(aspect))))
    # Pillow's resize filters RGBA with premultiplied alpha, so edges do not bleed colour.
    img = Image.fromarray(template, "RGBA").resize((w, h), Image.Resampling.BILINEAR)
    if config.colour_jitter > 0:
        img = _colour_jitter(img, rng, config.colour_jitter)
    angle = rng.uniform(-config.max_rotation_deg, config.max_rotation_deg)
    img = img.rotate(angle, resample=Image.Resampling.BILINEAR, expand=True)
    if rng.random() < config.blur_prob:
        img = img.filter(ImageFilter.GaussianBlur(radius=rng.uniform(0.3, 1.2)))
    arr = np.asarray(img)
    ys, xs = np.nonzero(arr[..., 3] >= MASK_THRESHOLD)
    if len(ys) == 0:
        return np.zeros((0, 0, 4), np.uint8)
    return np.ascontiguousarray(arr[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1])


class _Canvas:
    """Accumulates objects; keeps each object's visible mask to test new placements against."""

    def __init__(self, size: int, config: SynthConfig) -> None:
        self.size = size
        self.config = config
        self.alphas: list[np.ndarray] = []  # full-size uint8
        self.visible: list[np.ndarray] = []  # full-size bool
        self.full_area: list[int] = []
        self.patches: list[tuple[int, int, np.ndarray]] = []  # (y0, x0, rgba patch)

    def _min_visible(self, area: int) -> float:
        return max(self.config.min_visible_fraction * area, self.config.min_visible_pixels)

    def try_add(self, patch: np.ndarray, y0: int, x0: int) -> bool:
        """Add ``patch`` at ``(y0, x0)`` unless it leaves an earlier object too little visible."""
        h, w = patch.shape[:2]
        inside = patch[..., 3] >= MASK_THRESHOLD
        area = int(inside.sum())
        if area < self.config.min_visible_pixels:
            return False
        window = (slice(y0, y0 + h), slice(x0, x0 + w))
        for vis, full in zip(self.visible, self.full_area):
            remaining = int(vis.sum()) - int((vis[window] & inside).sum())
            if remaining < self._min_visible(full):
                return False
        for vis in self.visible:
            vis[window] &= ~inside
        alpha = np.zeros((self.size, self.size), np.uint8)
        alpha[window] = patch[..., 3]
        vis = np.zeros((self.size, self.size), bool)
        vis[window] = inside
        self.alphas.append(alpha)
        self.visible.append(vis)
        self.full_area.append(area)
        self.patches.append((y0, x0, patch))
        return True

    def composite(self, background: np.ndarray) -> np.ndarray:
        """Alpha-blend every patch in order over ``background``; uint8 ``[S, S, 3]``."""
        out = background.astype(np.float32)
        for y0, x0, patch in self.patches:
            h, w = patch.shape[:2]
            a = patch[..., 3:4].astype(np.float32) / 255.0
            region = out[y0 : y0 + h, x0 : x0 + w]
            region[...] = patch[..., :3].astype(np.float32) * a + region * (1.0 - a)
        return np.rint(out).clip(0, 255).astype(np.uint8)


def _place_one(canvas: _Canvas, template: np.ndarray, rng: np.random.Generator, config: SynthConfig) -> bool:
    size = config.image_size
    lo, hi = config.min_object_frac * size, config.max_object_frac * size
    side = math.exp(rng.uniform(math.log(lo), math.log(hi)))
    for attempt in range(_MAX_TRIES):
        if attempt and attempt % _SHRINK_EVERY == 0:
            side = max(lo, side * _SHRINK)
        patch = render_instance(template, side, rng, config)
        h, w = patch.shape[:2]
        if h == 0 or h > size or w > size:
            continue
        y0 = int(rng.integers(0, size - h + 1))
        x0 = int(rng.integers(0, size - w + 1))
        if canvas.try_add(patch, y0, x0):
            return True
    return False


def render_image(
    *,
    labels: Sequence[int],
    templates: Sequence[np.ndarray],
    backgrounds: Sequence[np.ndarray],
    config: SynthConfig,
    rng: np.random.Generator,
) -> RenderedImage:
    """Render one image holding ``labels`` (drawn in this order) over a random background.

    Args:
        labels: class indices into ``templates``.
        templates: per class uint8 RGBA glyph template.
        backgrounds: background sources (see :mod:`extract.datasets.backgrounds`).
        rng: this image's generator (see :func:`image_rng`); consumed in a fixed order.
    """
    size = config.image_size
    background = random_background(rng, size, tuple(backgrounds))
    canvas = _Canvas(size, config)
    placed, leftover = [], []
    for label in labels:
        if _place_one(canvas, templates[int(label)], rng, config):
            placed.append(int(label))
        else:
            leftover.append(int(label))
    n = len(placed)
    alphas = np.stack(canvas.alphas) if n else np.zeros((0, size, size), np.uint8)
    visible = np.stack(canvas.visible) if n else np.zeros((0, size, size), bool)
    return RenderedImage(
        rgb=canvas.composite(background),
        labels=np.asarray(placed, dtype=np.int64),
        alphas=alphas,
        full_masks=alphas >= MASK_THRESHOLD,
        visible_masks=visible,
        leftover=tuple(leftover),
    )

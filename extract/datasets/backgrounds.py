"""Background images for the synthetic benchmark: random crops of scikit-image's bundled photos.

Only images that ship inside the scikit-image wheel are used (no download at run time); each
was checked to load offline. Grey-scale textures are tinted with a random colour per crop.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
from PIL import Image

from cache_schema.errors import ConfigError

# skimage.data functions whose files are bundled with the wheel (verified offline, 0.26).
BACKGROUND_SOURCES = (
    "astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "hubble_deep_field",
    "retina", "stereo_motorcycle", "grass", "gravel", "brick", "camera", "moon", "coins",
    "page", "text", "clock",
)


@lru_cache(maxsize=1)
def load_backgrounds() -> tuple[np.ndarray, ...]:
    """All background sources as uint8 arrays, ``[h, w, 3]`` (colour) or ``[h, w]`` (grey)."""
    import skimage.data

    out = []
    for name in BACKGROUND_SOURCES:
        try:
            img = getattr(skimage.data, name)()
        except Exception as exc:  # any failure here means a broken scikit-image install
            raise ConfigError(
                f"background image skimage.data.{name} failed to load ({type(exc).__name__}); "
                "reinstall scikit-image (its bundled images are needed offline)"
            ) from exc
        if isinstance(img, tuple):  # stereo_motorcycle returns (left, right, disparity)
            img = img[0]
        out.append(np.ascontiguousarray(np.asarray(img, dtype=np.uint8)))
    return tuple(out)


# The 8 flips/rotations of a square (identity included).
_TRANSPOSES = (
    None, Image.Transpose.ROTATE_90, Image.Transpose.ROTATE_180, Image.Transpose.ROTATE_270,
    Image.Transpose.FLIP_LEFT_RIGHT, Image.Transpose.FLIP_TOP_BOTTOM, Image.Transpose.TRANSPOSE,
    Image.Transpose.TRANSVERSE,
)


def random_background(rng: np.random.Generator, size: int, sources: tuple[np.ndarray, ...]) -> np.ndarray:
    """A ``size``x``size`` uint8 RGB background: random source, crop, flip/rotation and colour.

    The crop side is 35-100% of the source's short side, so the scale of textures varies; grey
    sources are tinted, every crop gets a random flip/rotation and brightness gain.
    """
    src = sources[int(rng.integers(len(sources)))]
    h, w = src.shape[:2]
    side = int(round(min(h, w) * rng.uniform(0.35, 1.0)))
    side = max(8, min(side, h, w))
    y0 = int(rng.integers(0, h - side + 1))
    x0 = int(rng.integers(0, w - side + 1))
    crop = src[y0 : y0 + side, x0 : x0 + side]
    img = Image.fromarray(crop).resize((size, size), Image.Resampling.BILINEAR, reducing_gap=3.0)
    transpose = _TRANSPOSES[int(rng.integers(len(_TRANSPOSES)))]
    if transpose is not None:
        img = img.transpose(transpose)
    gain = rng.uniform(0.75, 1.2)
    if img.mode == "L":
        # Why tint: grey textures would otherwise make "colourless background" a class-free cue.
        r, g, b = gain * rng.uniform(0.55, 1.0, size=3)
        img = Image.merge("RGB", (img, img, img)).convert("RGB", matrix=(r, 0, 0, 0, 0, g, 0, 0, 0, 0, b, 0))
    else:
        img = img.convert("RGB", matrix=(gain, 0, 0, 0, 0, gain, 0, 0, 0, 0, gain, 0))
    return np.asarray(img)

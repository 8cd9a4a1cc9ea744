"""Reading dataset images: one place for how a file becomes an RGB array and how failures read."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from cache_schema.errors import DatasetError


def read_rgb(path: Path) -> np.ndarray:
    """uint8 ``[H, W, 3]`` (writable) of the image at ``path``; ``DatasetError`` when missing or unreadable."""
    try:
        with Image.open(path) as im:
            return np.array(im.convert("RGB"), dtype=np.uint8)
    except FileNotFoundError:
        raise DatasetError(f"image {path} is missing; check the image root or regenerate the dataset") from None
    except (OSError, ValueError) as exc:
        raise DatasetError(f"cannot read image {path} ({exc}); replace the file or regenerate the dataset") from None

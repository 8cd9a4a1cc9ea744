"""A tiny in-memory detection set (coloured squares, discs and triangles on noise) and a tiny arch.

For tests and smoke runs of the detector code without a dataset on disk. Items follow the dataset
contract of ``extract.datasets.torch_dataset.DetectionDataset``: ``(image float32 [3, H, W] in
[0, 1], target)`` with ``boxes`` float32 ``[N, 4]`` xyxy pixels, ``labels`` int64 ``0..C-1``,
``masks`` uint8 ``[N, H, W]``, ``image_id`` and ``index``.
"""

from __future__ import annotations

import numpy as np
import torch

from extract.detectors.arch import DetectorArch

SHAPES = ("square", "disc", "triangle")
# One colour per class so the toy task is learnable in a few dozen steps.
COLOURS = np.array([[0.9, 0.15, 0.1], [0.1, 0.8, 0.2], [0.15, 0.25, 0.95]], dtype=np.float32)


def tiny_arch(*, num_classes: int = 3, image_size: int = 64) -> DetectorArch:
    """A small arch for 64 px images: narrow FPN and heads, few proposals, small anchors."""
    return DetectorArch(
        num_classes=num_classes,
        fpn_channels=16,
        representation_size=32,
        mask_head_channels=16,
        image_size=image_size,
        anchor_sizes=(8, 16, 32, 64),
        rpn_pre_nms_top_n_train=200,
        rpn_pre_nms_top_n_test=200,
        rpn_post_nms_top_n_train=64,
        rpn_post_nms_top_n_test=50,
        rpn_batch_size_per_image=64,
        box_batch_size_per_image=32,
        box_detections_per_img=50,
    )


def _shape_mask(kind: str, side: int, h: int, w: int, x0: int, y0: int) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w]
    u, v = (xx - x0 + 0.5) / side, (yy - y0 + 0.5) / side  # unit coordinates inside the box
    inside = (u >= 0) & (u <= 1) & (v >= 0) & (v <= 1)
    if kind == "disc":
        inside &= (u - 0.5) ** 2 + (v - 0.5) ** 2 <= 0.25
    elif kind == "triangle":
        inside &= np.abs(u - 0.5) <= 0.5 * v
    return inside


def render_toy_image(rng: np.random.Generator, *, size: int, max_objects: int) -> tuple[np.ndarray, dict]:
    """One image: uint8 ``[H, W, 3]`` and numpy targets (boxes from the drawn masks)."""
    image = rng.uniform(0.3, 0.7, size=(size, size, 3)).astype(np.float32)
    image += rng.normal(0.0, 0.05, size=image.shape).astype(np.float32)
    boxes, labels, masks = [], [], []
    for _ in range(int(rng.integers(1, max_objects + 1))):
        label = int(rng.integers(0, len(SHAPES)))
        side = int(rng.integers(size // 5, size // 2))
        x0, y0 = (int(v) for v in rng.integers(0, size - side, size=2))
        mask = _shape_mask(SHAPES[label], side, size, size, x0, y0)
        image[mask] = COLOURS[label]
        # Later objects occlude earlier ones: cut them out of the earlier masks.
        masks = [m & ~mask for m in masks]
        masks.append(mask)
        labels.append(label)
    keep = [i for i, m in enumerate(masks) if m.sum() >= 16]
    out_boxes = []
    for i in keep:
        ys, xs = np.nonzero(masks[i])
        out_boxes.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
    target = {
        "boxes": np.asarray(out_boxes, dtype=np.float32).reshape(-1, 4),
        "labels": np.asarray([labels[i] for i in keep], dtype=np.int64),
        "masks": np.stack([masks[i] for i in keep]).astype(np.uint8) if keep else np.zeros((0, size, size), np.uint8),
    }
    return (np.clip(image, 0, 1) * 255).round().astype(np.uint8), target


class ToyShapes:
    """``num_images`` deterministic toy images (from ``seed``), held in memory."""

    categories = [{"id": i + 1, "name": name} for i, name in enumerate(SHAPES)]

    def __init__(self, *, num_images: int = 8, size: int = 64, max_objects: int = 3, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        self.items = [render_toy_image(rng, size=size, max_objects=max_objects) for _ in range(num_images)]

    def __len__(self) -> int:
        return len(self.items)

    def image_uint8(self, index: int) -> np.ndarray:
        """The image as the adapter takes it: uint8 ``[H, W, 3]``."""
        return self.items[index][0]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict]:
        image, target = self.items[index]
        return torch.from_numpy(image).permute(2, 0, 1).float() / 255.0, {
            "boxes": torch.from_numpy(target["boxes"]),
            "labels": torch.from_numpy(target["labels"]),
            "masks": torch.from_numpy(target["masks"]),
            "image_id": index + 1,
            "index": index,
        }

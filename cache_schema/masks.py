"""Pasting class-agnostic RoI masks into the image, and RLE encoding.

Pixel-identical to torchvision's ``paste_masks_in_image`` (0.29: pad the M x M mask by one zero
cell, grow the box by (M+2)/M about its centre, truncate it to integers, bilinear-resize the
padded mask to the integer box's (y1-y0+1, x1-x0+1), copy the part inside the image) followed by
``> 0.5``, but much faster: torchvision does a dozen 0-d tensor operations per mask and builds a
full float image per mask; here box arithmetic is done once for all masks and each resized patch
is thresholded and written straight into its crop of one uint8 array.

It also holds what extraction stores for fast mask evaluation: each RoI's pasted-mask area and its
pixel intersection with every ground-truth mask of the image (:func:`mask_overlaps`), from which
any detection's mask IoU is exact integer arithmetic, and the ground-truth RLE exactly as the LVIS
API builds it (:func:`gt_rle`).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pycocotools.mask as mask_utils
import torch
import torch.nn.functional as F

MASK_THRESHOLD = 0.5  # on the pasted probability, strictly greater (torchvision references)


def _patches(
    mask_logits: torch.Tensor, boxes: torch.Tensor, image_size: tuple[int, int]
) -> Iterator[tuple[int, int, int, int, int, np.ndarray]]:
    """Per mask ``k``: (k, y0, y1, x0, x1, bool patch) to write at ``[y0:y1, x0:x1]``."""
    im_h, im_w = int(image_size[0]), int(image_size[1])
    m = mask_logits.shape[-1]
    padded = F.pad(torch.sigmoid(mask_logits.float().cpu()), (1, 1, 1, 1))  # [K, M+2, M+2]
    scale = float(m + 2) / m
    b = boxes.float().cpu()
    # Same float32 operations, in the same order, as torchvision's expand_boxes.
    w_half = (b[:, 2] - b[:, 0]) * 0.5
    h_half = (b[:, 3] - b[:, 1]) * 0.5
    x_c = (b[:, 2] + b[:, 0]) * 0.5
    y_c = (b[:, 3] + b[:, 1]) * 0.5
    w_half = w_half * scale
    h_half = h_half * scale
    grown = torch.stack([x_c - w_half, y_c - h_half, x_c + w_half, y_c + h_half], dim=1).to(torch.int64)
    for k, (bx0, by0, bx1, by1) in enumerate(grown.tolist()):
        w, h = max(bx1 - bx0 + 1, 1), max(by1 - by0 + 1, 1)
        x0, x1 = max(bx0, 0), min(bx1 + 1, im_w)
        y0, y1 = max(by0, 0), min(by1 + 1, im_h)
        if x1 <= x0 or y1 <= y0:
            continue  # the grown box lies outside the image: empty mask
        resized = F.interpolate(padded[k][None, None], size=(h, w), mode="bilinear", align_corners=False)[0, 0]
        patch = resized[y0 - by0 : y1 - by0, x0 - bx0 : x1 - bx0] > MASK_THRESHOLD
        yield k, y0, y1, x0, x1, patch.numpy()


def paste_roi_masks(*, mask_logits: torch.Tensor, boxes: torch.Tensor, image_size: tuple[int, int]) -> torch.Tensor:
    """bool ``[K, H, W]``: mask logits ``[K, M, M]`` (any float dtype) on boxes ``[K, 4]`` (xyxy,
    pixels) pasted at ``image_size`` = (H, W), probability > 0.5."""
    h, w = int(image_size[0]), int(image_size[1])
    out = np.zeros((mask_logits.shape[0], h, w), dtype=bool)
    for k, y0, y1, x0, x1, patch in _patches(mask_logits, boxes, image_size):
        out[k, y0:y1, x0:x1] = patch
    return torch.from_numpy(out)


def _rle_json(rles: list[dict]) -> list[dict]:
    return [{"size": [int(s) for s in r["size"]], "counts": r["counts"].decode("ascii")} for r in rles]


def encode_masks(masks: torch.Tensor) -> list[dict]:
    """RLE (``counts`` as str, json-ready) of each bool mask ``[K, H, W]``."""
    if masks.shape[0] == 0:
        return []
    arr = np.asfortranarray(masks.permute(1, 2, 0).cpu().numpy().astype(np.uint8))
    return _rle_json(mask_utils.encode(arr))


def paste_and_encode(*, mask_logits: torch.Tensor, boxes: torch.Tensor, image_size: tuple[int, int]) -> list[dict]:
    """RLEs of :func:`paste_roi_masks`' masks, written straight into the column-major
    ``[H, W, K]`` array pycocotools encodes (no full-size intermediate per mask)."""
    k = mask_logits.shape[0]
    if k == 0:
        return []
    arr = np.zeros((int(image_size[0]), int(image_size[1]), k), dtype=np.uint8, order="F")
    for i, y0, y1, x0, x1, patch in _patches(mask_logits, boxes, image_size):
        arr[y0:y1, x0:x1, i] = patch
    return _rle_json(mask_utils.encode(arr))


def gt_rle(segmentation: list | dict, height: int, width: int) -> dict:
    """Compressed RLE of an annotation's ``segmentation`` (polygons, uncompressed RLE or RLE),
    built as ``lvis.LVIS.ann_to_rle`` builds it (polygon parts merged into one mask)."""
    if isinstance(segmentation, list):
        return mask_utils.merge(mask_utils.frPyObjects(segmentation, int(height), int(width)))
    if isinstance(segmentation.get("counts"), list):
        return mask_utils.frPyObjects(segmentation, int(height), int(width))
    return segmentation


def mask_overlaps(
    *, mask_logits: torch.Tensor, boxes: torch.Tensor, image_size: tuple[int, int], gt_rles: list[dict]
) -> tuple[np.ndarray, np.ndarray]:
    """Pixel counts for exact mask IoUs without pasting at evaluation time.

    Args:
        mask_logits: ``[K, M, M]`` class-agnostic mask logits (any float dtype; pass them in the
            dtype they are stored in, so the counts match masks pasted from the store).
        boxes: float ``[K, 4]`` xyxy boxes the masks are pasted on (clipped to the image).
        image_size: (height, width) of the image in pixels.
        gt_rles: the image's ``G`` ground-truth masks as compressed RLEs of that size.
    Returns:
        (int32 ``[K]`` area of each pasted mask, int32 ``[K, G]`` pixels it shares with each
        ground-truth mask). IoU = inter / (area + gt_area - inter), as pycocotools computes it.
    """
    k, g = int(mask_logits.shape[0]), len(gt_rles)
    area = np.zeros(k, dtype=np.int32)
    inter = np.zeros((k, g), dtype=np.int32)
    # [H, W, G] float32: counts below 2**24 pixels are exact in float32 dot products.
    gt = mask_utils.decode(gt_rles).astype(np.float32) if g else None
    for i, y0, y1, x0, x1, patch in _patches(mask_logits, boxes, image_size):
        area[i] = int(np.count_nonzero(patch))
        if gt is not None and area[i]:
            region = gt[y0:y1, x0:x1].reshape(-1, g)
            inter[i] = patch.reshape(-1).astype(np.float32) @ region
    return area, inter

"""A torch ``Dataset`` over an ``AnnotationSet``: images and detection targets for training/extraction."""

from __future__ import annotations

import numpy as np
import pycocotools.mask as mask_util
import torch
from PIL import Image

from cache_schema.errors import DatasetError
from extract.datasets.lvis_json import AnnotationSet


def segmentation_to_mask(segmentation: list | dict, height: int, width: int) -> np.ndarray:
    """Decode polygons, uncompressed RLE or compressed RLE to a uint8 ``[height, width]`` mask."""
    if isinstance(segmentation, list):
        if not segmentation:
            return np.zeros((height, width), np.uint8)
        rle = mask_util.merge(mask_util.frPyObjects(segmentation, height, width))
    elif isinstance(segmentation, dict) and isinstance(segmentation.get("counts"), list):
        rle = mask_util.frPyObjects(segmentation, height, width)
    elif isinstance(segmentation, dict) and "counts" in segmentation:
        rle = segmentation
    else:
        raise DatasetError("segmentation is neither polygons nor RLE; fix the annotation file")
    mask = mask_util.decode(rle)
    if mask.shape != (height, width):
        raise DatasetError(f"segmentation decodes to {mask.shape}, image is {(height, width)}; fix the annotation file")
    return mask


class DetectionDataset(torch.utils.data.Dataset):
    """``ds[i]`` -> ``(image, target)`` for the image at position ``i`` of ``annset``.

    ``image``: float32 ``[3, H, W]`` RGB in ``[0, 1]``. ``target``:
        ``boxes`` float32 ``[N, 4]`` xyxy pixels; ``labels`` int64 ``[N]`` contiguous ``0..C-1``
        (a torchvision adapter adds 1); ``masks`` uint8 ``[N, H, W]`` (only with ``with_masks``);
        ``image_id`` int64 scalar (json id); ``index`` int64 scalar (position ``i``).
    """

    def __init__(self, annset: AnnotationSet, *, with_masks: bool = True) -> None:
        self.annset = annset
        self.with_masks = with_masks

    def __len__(self) -> int:
        return len(self.annset.images)

    def load_image(self, i: int) -> torch.Tensor:
        """float32 ``[3, H, W]`` in ``[0, 1]``; checks the file's size against the json."""
        record = self.annset.images[i]
        path = self.annset.image_path(i)
        try:
            with Image.open(path) as img:
                arr = np.asarray(img.convert("RGB"))
        except FileNotFoundError as exc:
            raise DatasetError(f"image {path} is missing; check the image root or regenerate the dataset") from exc
        except OSError as exc:
            raise DatasetError(f"image {path} cannot be read ({exc}); replace the file") from exc
        if arr.shape[:2] != (record.height, record.width):
            raise DatasetError(
                f"image {path} is {arr.shape[1]}x{arr.shape[0]} but the json says {record.width}x{record.height}; fix the json or the image"
            )
        return torch.from_numpy(arr.copy()).permute(2, 0, 1).to(torch.float32).div_(255.0)

    def target(self, i: int) -> dict[str, torch.Tensor]:
        """The detection target of image ``i`` (see the class docstring)."""
        record = self.annset.images[i]
        anns = self.annset.annotations[i]
        boxes = torch.tensor([a["bbox"] for a in anns], dtype=torch.float32).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]  # xywh -> xyxy
        labels = torch.tensor([self.annset.index_of[a["category_id"]] for a in anns], dtype=torch.int64)
        target = {
            "boxes": boxes,
            "labels": labels,
            "image_id": torch.tensor(record.id, dtype=torch.int64),
            "index": torch.tensor(i, dtype=torch.int64),
        }
        if self.with_masks:
            h, w = record.height, record.width
            masks = np.zeros((len(anns), h, w), np.uint8)
            for j, ann in enumerate(anns):
                if "segmentation" not in ann:
                    raise DatasetError(
                        f"annotation {ann.get('id', j)} of image {record.id} has no segmentation; use with_masks=False"
                    )
                masks[j] = segmentation_to_mask(ann["segmentation"], h, w)
            target["masks"] = torch.from_numpy(masks)
        return target

    def __getitem__(self, i: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if not 0 <= i < len(self):
            raise IndexError(f"image position {i} out of range 0..{len(self) - 1}")
        return self.load_image(i), self.target(i)


def collate(batch: list[tuple[torch.Tensor, dict]]) -> tuple[list[torch.Tensor], list[dict]]:
    """Batch for torchvision detectors: images and targets as lists (sizes may differ)."""
    images = [item[0] for item in batch]
    targets = [item[1] for item in batch]
    return images, targets

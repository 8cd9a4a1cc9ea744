"""Tiny, fully consistent stores built from a seed — real zarr, random content — for tests.

``tiny_inputs`` draws everything a store holds (metadata, class table, split specs, every
image's RoI arrays); ``write_images`` puts chosen images into a created store. Other packages'
tests may use these to get a real store in milliseconds without a detector.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from cache_schema.layout import roi_arrays
from cache_schema.meta import (SCHEMA_VERSION, DatasetInfo, DetectorInfo, ExtractionSettings, GtTable, SplitSource, SplitSpec,
                               StoreMeta)
from cache_schema.records import ClassInfo
from cache_schema.store import Store


@dataclass(frozen=True, kw_only=True)
class TinyInputs:
    """Everything needed to create and fill a tiny store.

    Attributes:
        meta, classes, specs: arguments of :func:`cache_schema.create_store`.
        rows: split -> per image, the ``arrays`` argument of ``SplitStore.write_image``.
    """

    meta: StoreMeta
    classes: ClassInfo
    specs: tuple[SplitSpec, ...]
    rows: dict[str, tuple[dict[str, np.ndarray], ...]]


def fake_sha(text: str) -> str:
    """A valid-looking sha256 for metadata of inputs that are not real files."""
    return hashlib.sha256(text.encode()).hexdigest()


def _gt(rng: np.random.Generator, n_images: int, c: int, sizes: np.ndarray, first_ann: int) -> GtTable:
    per_image = rng.integers(1, 4, size=n_images)
    image = np.repeat(np.arange(n_images), per_image)
    g = len(image)
    h, w = sizes[image, 0], sizes[image, 1]
    x0, y0 = rng.uniform(0, w / 2), rng.uniform(0, h / 2)
    boxes = np.stack([x0, y0, x0 + rng.uniform(4, w / 2), y0 + rng.uniform(4, h / 2)], axis=1)
    labels = rng.integers(0, c, size=g)
    return GtTable(boxes=boxes, labels=labels, image=image, area=rng.uniform(10, 500, size=g),
                   ann_id=np.arange(first_ann, first_ann + g))


def _class_info(c: int, gt: GtTable) -> ClassInfo:
    instance = np.bincount(gt.labels, minlength=c).astype(np.int64)
    lists = [np.unique(gt.image[gt.labels == k]).astype(np.int64) for k in range(c)]
    image_count = np.asarray([len(x) for x in lists], dtype=np.int64)
    indptr = np.concatenate([[0], np.cumsum(image_count)]).astype(np.int64)
    freq = tuple("r" if n <= 10 else "c" if n <= 100 else "f" for n in image_count)
    return ClassInfo(names=tuple(f"class_{k}" for k in range(c)), category_ids=tuple(range(1, c + 1)), frequency=freq,
                     instance_count=instance, image_count=image_count, csr_indptr=indptr,
                     csr_images=np.concatenate(lists + [np.zeros(0, np.int64)]))


def _image_rows(rng: np.random.Generator, n: int, num_gt: int, paths: dict[str, tuple[np.dtype, tuple[int, ...]]], c: int) -> dict[str, np.ndarray]:
    rows: dict[str, np.ndarray] = {}
    for path, (dtype, trailing) in paths.items():
        if dtype == np.bool_:
            rows[path] = rng.random((n, *trailing)) < 0.2
        elif path == "rois/labels":
            rows[path] = rng.integers(0, c + 1, size=n).astype(dtype)
        elif path == "rois/gt_index":
            rows[path] = rng.integers(-1, num_gt, size=n).astype(dtype)
        elif path.startswith("feat/"):
            rows[path] = np.maximum(rng.standard_normal((n, *trailing)), 0).astype(dtype)  # post-ReLU-like
        else:
            rows[path] = rng.standard_normal((n, *trailing)).astype(dtype)
    rows["rois/ious"] = rng.uniform(0, 1, size=n).astype(np.float32)
    return rows


def tiny_inputs(
    *,
    seed: int = 0,
    num_classes: int = 4,
    split_images: tuple[tuple[str, int], ...] = (("train", 6), ("val", 3)),
    stride: int = 8,
    levels: tuple[tuple[str, tuple[int, ...]], ...] = (("fc", (16,)), ("pooled", (4, 2, 2))),
    mask_size: int = 4,
    checkpoint_sha256: str | None = None,
    annotation_sha256: str | None = None,
    schema_version: int = SCHEMA_VERSION,
) -> TinyInputs:
    """Random but consistent inputs. Splits named ``val`` store masks; ``train`` has GT
    proposals and provides the class table. Image 1 of every split (when it exists) has 0 RoIs
    and the last image exactly ``stride`` RoIs, so padding and edge cases are always exercised.
    ``schema_version=1`` lays the store out as version 1 did (for migration and compatibility)."""
    rng = np.random.default_rng(seed)
    c = num_classes
    level_map = dict(levels)
    detector = DetectorInfo(backend="torchvision", arch={"name": "tiny", "seed": seed}, checkpoint_sha256=checkpoint_sha256 or fake_sha(f"ckpt{seed}"),
                            checkpoint_path="/nowhere/tiny.pt", levels=level_map, num_classes=c)
    sources = {name: SplitSource(annotation_path=f"/nowhere/{name}.json", annotation_sha256=annotation_sha256 or fake_sha(f"{name}{seed}"),
                                 image_root="/nowhere") for name, _ in split_images}
    meta = StoreMeta(schema_version=schema_version, detector=detector, dataset=DatasetInfo(splits=sources, category_ids=tuple(range(1, c + 1))),
                     extraction=ExtractionSettings(rois_per_image=stride, seed=seed, mask_size=mask_size, created="2026-01-01T00:00:00+00:00"),
                     splits=tuple(name for name, _ in split_images), num_classes=c)
    specs, rows, classes = [], {}, None
    first_ann = 1
    for name, n_images in split_images:
        sizes = rng.integers(32, 96, size=(n_images, 2))
        gt = _gt(rng, n_images, c, sizes, first_ann)
        first_ann += len(gt)
        with_masks = name == "val"
        overlaps = int(np.bincount(gt.image, minlength=n_images).max()) if with_masks and len(gt) else 0
        spec = SplitSpec(name=name, image_ids=np.arange(n_images) * 7 + 100, image_sizes=sizes,
                         file_names=tuple(f"images/{name}/{i:012d}.png" for i in range(n_images)), stride=stride,
                         levels=tuple(level_map), gt=gt, with_masks=with_masks, has_gt_proposals=name == "train", image_block=4,
                         mask_overlaps=overlaps)
        specs.append(spec)
        paths = roi_arrays(num_classes=c, with_masks=with_masks, mask_size=mask_size, mask_overlaps=overlaps)
        paths.update({f"feat/{lv}": (np.dtype(np.float16), shape) for lv, shape in level_map.items()})
        counts = rng.integers(1, stride + 1, size=n_images)
        if n_images > 1:
            counts[1] = 0
        counts[-1] = stride
        rows[name] = tuple(_image_rows(rng, int(n), len(gt), paths, c) for n in counts)
        if name == "train" or classes is None:
            classes = _class_info(c, gt)
    return TinyInputs(meta=meta, classes=classes, specs=tuple(specs), rows=rows)


def write_images(store: Store, inputs: TinyInputs, *, split: str, images: list[int] | range | None = None) -> None:
    """Write ``images`` (default all) of ``split`` from ``inputs`` into an ``r+`` store."""
    target = store.split(split)
    for i in images if images is not None else range(target.num_images):
        target.write_image(i, arrays=inputs.rows[split][i])

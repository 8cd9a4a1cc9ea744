"""Loading LVIS v1 / COCO instance annotation files into a validated, indexed ``AnnotationSet``.

Conventions: categories are sorted by json id and mapped to contiguous indices ``0..C-1``;
images are sorted by id, and an image's *position* in that order is what the cache and
``ClassInfo.csr_images`` call its index. Crowd annotations (``iscrowd=1``) and boxes with zero
width or height are left out of ``annotations`` (a detector cannot train on them) and counted
in ``skipped_crowd`` / ``skipped_degenerate``.
"""

from __future__ import annotations

import math

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cache_schema.errors import DatasetError
from cache_schema.records import ClassInfo

# LVIS frequency groups from the number of training images holding a category.
RARE_MAX_IMAGES = 10
COMMON_MAX_IMAGES = 100


@dataclass(frozen=True, kw_only=True)
class ImageRecord:
    """One image: json id, path relative to the image root, size in pixels, and LVIS's
    federated labels (json category ids verified absent / not exhaustively annotated)."""

    id: int
    file_name: str
    height: int
    width: int
    neg_category_ids: tuple[int, ...] = ()
    not_exhaustive_category_ids: tuple[int, ...] = ()


@dataclass(frozen=True, kw_only=True)
class AnnotationSet:
    """A loaded annotation file.

    Attributes:
        json_path: the file read.
        image_root: directory ``file_name`` is relative to.
        cat_ids: json category ids, ascending; position = contiguous class index.
        index_of: json category id -> contiguous class index.
        categories: the json category dicts, in ``cat_ids`` order.
        images: image records sorted by id.
        position_of: json image id -> position in ``images``.
        annotations: per image position, that image's annotation dicts (json order).
        skipped_crowd / skipped_degenerate: annotations left out (see module doc).
    """

    json_path: Path
    image_root: Path
    cat_ids: tuple[int, ...]
    index_of: dict[int, int]
    categories: tuple[dict, ...]
    images: tuple[ImageRecord, ...]
    position_of: dict[int, int]
    annotations: tuple[tuple[dict, ...], ...]
    skipped_crowd: int = 0
    skipped_degenerate: int = 0
    info: dict = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.cat_ids)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(str(c["name"]) for c in self.categories)

    def image_path(self, position: int) -> Path:
        return self.image_root / self.images[position].file_name

    def __len__(self) -> int:
        return len(self.images)


def resolve_split(data: Path, split: str) -> tuple[Path, Path]:
    """``(json_path, image_root)`` of a split.

    ``data`` is either a dataset directory (``DIR/<split>.json``, images relative to ``DIR``) or
    an annotation file (images relative to the file's directory; ``split`` is then unused).
    """
    data = Path(data)
    if data.is_dir():
        path = data / f"{split}.json"
        if not path.is_file():
            raise DatasetError(f"{data} has no {split}.json; pass a dataset directory holding it or the json file itself")
        return path, data
    if data.is_file():
        return data, data.parent
    raise DatasetError(f"dataset path {data} does not exist; pass a dataset directory or an annotation json file")


def _is_number(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _check_area_and_segmentation(ann: dict, where: str) -> None:
    """``area`` a finite number >= 0; ``segmentation`` polygons (lists of an even number >= 4 of
    finite numbers) or an RLE dict with ``size`` and ``counts`` — what LVIS evaluation reads."""
    if "area" in ann and not (_is_number(ann["area"]) and ann["area"] >= 0):
        raise DatasetError(f"{where} area {ann['area']!r} must be a finite number >= 0; fix the file")
    seg = ann.get("segmentation")
    if seg is None:
        return
    if isinstance(seg, dict):
        if "size" not in seg or "counts" not in seg:
            raise DatasetError(f"{where} segmentation RLE needs 'size' and 'counts'; fix the file")
        return
    ok = isinstance(seg, list) and all(isinstance(p, list) and len(p) >= 4 and len(p) % 2 == 0
                                       and all(_is_number(v) for v in p) for p in seg)
    if not ok:
        raise DatasetError(f"{where} segmentation must be polygons (lists of x, y numbers) or an "
                           "RLE dict; fix the file")


def _require(items: list, kind: str, keys: tuple[str, ...], path: Path) -> None:
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise DatasetError(f"{path}: {kind}[{i}] is not an object; the file is not LVIS/COCO format")
        missing = [k for k in keys if k not in item]
        if missing:
            raise DatasetError(f"{path}: {kind}[{i}] lacks key(s) {missing}; fix or regenerate the annotation file")


def _file_name(img: dict, path: Path) -> str:
    """COCO's ``file_name``, else the last two components of LVIS v1's ``coco_url``."""
    if img.get("file_name"):
        return str(img["file_name"])
    url = img.get("coco_url")
    if not url:
        raise DatasetError(f"{path}: image {img['id']} has neither file_name nor coco_url; add one of them")
    return "/".join(str(url).rstrip("/").split("/")[-2:])


def read_json(path: Path) -> dict:
    """The parsed file, checked to be an object with lists images, annotations, categories."""
    if not path.is_file():
        raise DatasetError(f"annotation file {path} does not exist; check the path")
    try:
        with path.open("r", encoding="utf-8") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DatasetError(f"{path} is not valid JSON ({exc.__class__.__name__} near char {getattr(exc, 'pos', '?')}); re-download or regenerate it") from exc
    if not isinstance(data, dict):
        raise DatasetError(f"{path}: top level is not an object; expected LVIS/COCO keys images, annotations, categories")
    missing = [k for k in ("images", "annotations", "categories") if not isinstance(data.get(k), list)]
    if missing:
        raise DatasetError(f"{path}: missing list(s) {missing}; expected an LVIS/COCO instances file")
    return data


def _unique_ids(items: list[dict], kind: str, path: Path) -> None:
    ids = [item["id"] for item in items]
    if len(set(ids)) != len(ids):
        raise DatasetError(f"{path}: duplicate {kind} ids; every {kind} id must be unique")


def load_annotations(json_path: Path, image_root: Path | None = None) -> AnnotationSet:
    """Load and validate an LVIS v1 or COCO instances file.

    Args:
        json_path: the annotation file.
        image_root: directory image ``file_name`` s are relative to (default: the file's directory).

    Raises:
        DatasetError: missing file, invalid JSON, missing keys, duplicate ids, or an annotation
            that references an unknown image or category.
    """
    path = Path(json_path)
    data = read_json(path)
    _require(data["categories"], "categories", ("id", "name"), path)
    _require(data["images"], "images", ("id", "height", "width"), path)
    _require(data["annotations"], "annotations", ("image_id", "category_id", "bbox"), path)
    _unique_ids(data["categories"], "category", path)
    _unique_ids(data["images"], "image", path)
    if not data["categories"]:
        raise DatasetError(f"{path}: no categories; the file must list at least one category")

    categories = tuple(sorted(data["categories"], key=lambda c: int(c["id"])))
    cat_ids = tuple(int(c["id"]) for c in categories)
    index_of = {cid: k for k, cid in enumerate(cat_ids)}
    images = tuple(
        ImageRecord(id=int(im["id"]), file_name=_file_name(im, path), height=int(im["height"]), width=int(im["width"]),
                    neg_category_ids=tuple(int(c) for c in im.get("neg_category_ids") or ()),
                    not_exhaustive_category_ids=tuple(int(c) for c in im.get("not_exhaustive_category_ids") or ()))
        for im in sorted(data["images"], key=lambda im: int(im["id"]))
    )
    position_of = {im.id: p for p, im in enumerate(images)}
    per_image: list[list[dict]] = [[] for _ in images]
    crowd = degenerate = 0
    for i, ann in enumerate(data["annotations"]):
        pos = position_of.get(ann["image_id"])
        if pos is None:
            raise DatasetError(f"{path}: annotations[{i}] references unknown image_id {ann['image_id']}; remove it or add the image")
        if ann["category_id"] not in index_of:
            raise DatasetError(f"{path}: annotations[{i}] references unknown category_id {ann['category_id']}; remove it or add the category")
        bbox = ann["bbox"]
        where = f"{path}: annotations[{i}] (id {ann.get('id', '?')})"
        if not (isinstance(bbox, list) and len(bbox) == 4):
            raise DatasetError(f"{where} bbox must be [x, y, w, h]; fix the file")
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in bbox):
            raise DatasetError(f"{where} bbox {bbox} must hold four finite numbers [x, y, w, h]; fix the file")
        if bbox[2] < 0 or bbox[3] < 0:
            raise DatasetError(f"{where} bbox {bbox} has a negative width or height; fix the file")
        _check_area_and_segmentation(ann, where)
        if ann.get("iscrowd", 0):
            crowd += 1
            continue
        if bbox[2] == 0 or bbox[3] == 0:  # empty boxes (LVIS has a few): nothing to detect
            degenerate += 1
            continue
        per_image[pos].append(ann)
    return AnnotationSet(
        json_path=path,
        image_root=Path(image_root) if image_root is not None else path.parent,
        cat_ids=cat_ids,
        index_of=index_of,
        categories=categories,
        images=images,
        position_of=position_of,
        annotations=tuple(tuple(a) for a in per_image),
        skipped_crowd=crowd,
        skipped_degenerate=degenerate,
        info=dict(data.get("info") or {}),
    )


def check_images_exist(annset: AnnotationSet) -> None:
    """Raise ``DatasetError`` naming the first missing image file and how many are missing."""
    missing = [p for p in range(len(annset.images)) if not annset.image_path(p).is_file()]
    if missing:
        first = annset.image_path(missing[0])
        raise DatasetError(
            f"{len(missing)} of {len(annset.images)} images are missing, first {first}; "
            "check the image root (image_root=) or regenerate the dataset"
        )


def frequency_group(image_count: int) -> str:
    """LVIS group of a category from its training image count: ``r`` <= 10 < ``c`` <= 100 < ``f``.
    A category with no training image counts as rare, as in LVIS."""
    if image_count <= RARE_MAX_IMAGES:
        return "r"
    return "c" if image_count <= COMMON_MAX_IMAGES else "f"


def class_statistics(annset: AnnotationSet) -> ClassInfo:
    """Per-class training statistics of ``annset`` (meant for the train split) as a ``ClassInfo``.

    ``csr_images`` lists, per class, the sorted positions of the images containing it.
    """
    c = annset.num_classes
    instances = np.zeros(c, np.int64)
    members: list[list[int]] = [[] for _ in range(c)]
    for pos, anns in enumerate(annset.annotations):
        present = set()
        for ann in anns:
            k = annset.index_of[ann["category_id"]]
            instances[k] += 1
            present.add(k)
        for k in present:
            members[k].append(pos)  # positions ascend with pos, so each list is sorted
    image_count = np.array([len(m) for m in members], dtype=np.int64)
    indptr = np.zeros(c + 1, np.int64)
    indptr[1:] = np.cumsum(image_count)
    flat = np.fromiter((p for m in members for p in m), dtype=np.int64, count=int(indptr[-1]))
    return ClassInfo(
        names=annset.names,
        category_ids=annset.cat_ids,
        frequency=tuple(frequency_group(int(n)) for n in image_count),
        instance_count=instances,
        image_count=image_count,
        csr_indptr=indptr,
        csr_images=flat,
    )

"""COCO-LT: a long-tailed subsample of COCO train, as in SimCal (ECCV'20) supplement C / I.

The categories, sorted by id, are split evenly into 4 groups by index (1-20, 21-40, 41-60,
61-80 for COCO). Group 1 keeps every instance. Group ``i >= 2`` keeps, for each of its
categories, a random ``n`` instances with ``n`` drawn uniformly from the integers strictly inside
``(8 * 10^(4-i), 8 * 10^(5-i))`` — i.e. (800, 8000), (80, 800), (8, 80); a category with fewer
instances than ``n`` keeps all of them. Unsampled instances are removed from their images and
images left without instances are dropped. ``top`` (8000) and ``ratio`` (10) generalise the
bounds to ``(top / ratio^(i-1), top / ratio^(i-2))`` so tests can use small numbers.

The paper reads "n_i instances" per subset; we read it per category (each category draws its own
``n``), which is what gives the 20-classes-per-bin staircase of its Fig. 3 and the bins
[1, 20), [20, 400), [400, 8000), [8000, inf) it evaluates with.

Crowd annotations are dropped: the LVIS API has no crowd handling (a kept crowd region would be a
ground truth nobody can match). The output carries the LVIS fields (``frequency``, counts,
``neg_category_ids`` = every category absent from the image since COCO is exhaustively labelled,
``not_exhaustive_category_ids`` = []) so ``lvis.LVIS`` and LVIS evaluation load it.
``convert_coco_val`` does the same for the (unsampled) validation file.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np

from cache_schema.errors import ConfigError, DatasetError
from cache_schema.runtime import sha256_file
from extract.datasets.lvis_json import frequency_group, read_json

COCO_LT_BINS: tuple[tuple[int, int | None], ...] = ((1, 20), (20, 400), (400, 8000), (8000, None))
NUM_GROUPS = 4


def group_bounds(*, top: float = 8000, ratio: float = 10, num_groups: int = NUM_GROUPS) -> list[tuple[int, int] | None]:
    """Per group, the inclusive integer range ``n`` is drawn from (``None`` = keep everything).

    Group ``i`` (1-based, ``i >= 2``) draws from the open interval
    ``(top / ratio^(i-1), top / ratio^(i-2))``.
    """
    if top <= 0 or ratio <= 1:
        raise ConfigError(f"COCO-LT: need top > 0 and ratio > 1 (got top={top}, ratio={ratio})")
    out: list[tuple[int, int] | None] = [None]
    for i in range(2, num_groups + 1):
        lo_open, hi_open = top / ratio ** (i - 1), top / ratio ** (i - 2)
        lo, hi = math.floor(lo_open) + 1, math.ceil(hi_open) - 1
        if lo > hi:
            raise ConfigError(
                f"COCO-LT: group {i} interval ({lo_open:g}, {hi_open:g}) holds no integer; raise top or lower ratio"
            )
        out.append((lo, hi))
    return out


def _groups(num_categories: int) -> list[np.ndarray]:
    if num_categories < NUM_GROUPS:
        raise DatasetError(f"COCO-LT needs at least {NUM_GROUPS} categories, the file has {num_categories}")
    return np.array_split(np.arange(num_categories), NUM_GROUPS)


def _write_atomic(path: Path, obj: dict) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.partial-{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(obj, separators=(",", ":")) + "\n", encoding="utf-8")
        tmp.replace(path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise DatasetError(f"cannot write {path} ({exc.strerror}); choose a writable output path") from exc


def _lvis_fields(data: dict, counts_from: dict | None = None) -> None:
    """Add LVIS category and image fields in place.

    Category counts and frequency come from ``counts_from`` (a category id -> (images, instances)
    map of the training split) or, without it, from ``data`` itself.
    """
    cat_ids = sorted(int(c["id"]) for c in data["categories"])
    present: dict[int, set[int]] = {}
    instances: dict[int, int] = dict.fromkeys(cat_ids, 0)
    images: dict[int, set[int]] = {cid: set() for cid in cat_ids}
    image_ids = {img["id"] for img in data["images"]}
    for ann in data["annotations"]:
        if ann["category_id"] not in instances or ann["image_id"] not in image_ids:
            raise DatasetError(
                f"annotation {ann.get('id')} references an unknown image or category; fix the annotation file"
            )
        present.setdefault(ann["image_id"], set()).add(ann["category_id"])
        instances[ann["category_id"]] += 1
        images[ann["category_id"]].add(ann["image_id"])
    counts = counts_from or {cid: (len(images[cid]), instances[cid]) for cid in cat_ids}
    for cat in data["categories"]:
        n_img, n_inst = counts[int(cat["id"])]
        cat["image_count"], cat["instance_count"] = int(n_img), int(n_inst)
        cat["frequency"] = frequency_group(int(n_img))
        cat.setdefault("synonyms", [cat["name"]])
        cat.setdefault("def", str(cat["name"]))
    for img in data["images"]:
        here = present.get(img["id"], set())
        img["neg_category_ids"] = [cid for cid in cat_ids if cid not in here]
        img["not_exhaustive_category_ids"] = []


def _sample(data: dict, rng: np.random.Generator, bounds: list, path: Path) -> tuple[list[dict], list[dict]]:
    """Kept annotations (sorted by id) and a per-category record of the sampling."""
    cats = sorted(data["categories"], key=lambda c: int(c["id"]))
    by_cat: dict[int, list[dict]] = {int(c["id"]): [] for c in cats}
    for ann in sorted(data["annotations"], key=lambda a: a["id"]):
        if ann["category_id"] not in by_cat:
            raise DatasetError(f"{path}: annotation {ann['id']} has unknown category_id {ann['category_id']}; fix the file")
        if not ann.get("iscrowd", 0):
            by_cat[ann["category_id"]].append(ann)
    kept, record = [], []
    for g, members in enumerate(_groups(len(cats))):
        for k in members:
            cid = int(cats[k]["id"])
            pool = by_cat[cid]
            if bounds[g] is None:
                target, chosen = None, pool
            else:
                target = int(rng.integers(bounds[g][0], bounds[g][1] + 1))
                take = np.sort(rng.choice(len(pool), size=min(target, len(pool)), replace=False))
                chosen = [pool[int(j)] for j in take]
            kept.extend(chosen)
            record.append({"category_id": cid, "group": g + 1, "target": target, "available": len(pool), "kept": len(chosen)})
    kept.sort(key=lambda a: a["id"])
    return kept, record


def build_coco_lt(
    src_json: Path,
    out_json: Path,
    *,
    seed: int = 0,
    top: float = 8000,
    ratio: float = 10,
    bins: tuple[tuple[int, int | None], ...] = COCO_LT_BINS,
) -> dict:
    """Write the COCO-LT training file sampled from the COCO train file ``src_json``.

    Returns the sampling summary also stored under ``info["coco_lt"]`` of the output: seed,
    top/ratio, per-group ``n`` ranges, the evaluation bins, per-category target/available/kept
    counts, kept image and instance totals, and the source file's sha256.
    """
    src = Path(src_json)
    data = read_json(src)
    if any("id" not in a for a in data["annotations"]) or any("id" not in c for c in data["categories"]):
        raise DatasetError(f"{src}: every annotation and category needs an id; expected a COCO instances file")
    bounds = group_bounds(top=top, ratio=ratio)
    rng = np.random.default_rng(np.random.SeedSequence([seed, 7]))
    kept, record = _sample(data, rng, bounds, src)
    kept_images = {a["image_id"] for a in kept}
    out = {k: v for k, v in data.items() if k not in ("images", "annotations", "categories")}
    out["categories"] = [dict(c) for c in sorted(data["categories"], key=lambda c: int(c["id"]))]
    out["images"] = [dict(im) for im in sorted(data["images"], key=lambda im: im["id"]) if im["id"] in kept_images]
    out["annotations"] = [dict(a) for a in kept]
    _lvis_fields(out)
    summary = {
        "seed": seed,
        "top": top,
        "ratio": ratio,
        "group_bounds": [list(b) if b else None for b in bounds],
        "bins": [list(b) for b in bins],
        "categories": record,
        "images": len(out["images"]),
        "instances": len(out["annotations"]),
        "source": src.name,
        "source_sha256": sha256_file(src),
    }
    info = dict(out.get("info") or {})
    info["description"] = "COCO-LT (SimCal supplement C) sampled by roicache"
    info["coco_lt"] = summary
    out["info"] = info
    _write_atomic(Path(out_json), out)
    return summary


def convert_coco_val(src_json: Path, out_json: Path, *, train_json: Path) -> dict:
    """Write the COCO validation file with LVIS fields; category counts and frequency come from the
    (COCO-LT) training file ``train_json``. Crowd annotations are dropped. Returns a summary."""
    src = Path(src_json)
    data = read_json(src)
    train = read_json(Path(train_json))
    counts = {int(c["id"]): (c.get("image_count", 0), c.get("instance_count", 0)) for c in train["categories"]}
    cat_ids = {int(c["id"]) for c in data["categories"]}
    if cat_ids != set(counts):
        raise DatasetError(f"{src} and {train_json} have different categories; pass the matching train file")
    out = {k: v for k, v in data.items() if k not in ("images", "annotations", "categories")}
    out["categories"] = [dict(c) for c in sorted(data["categories"], key=lambda c: int(c["id"]))]
    out["images"] = [dict(im) for im in sorted(data["images"], key=lambda im: im["id"])]
    out["annotations"] = [dict(a) for a in data["annotations"] if not a.get("iscrowd", 0)]
    _lvis_fields(out, counts_from=counts)
    summary = {
        "images": len(out["images"]),
        "instances": len(out["annotations"]),
        "dropped_crowd": len(data["annotations"]) - len(out["annotations"]),
        "train_json": Path(train_json).name,
    }
    info = dict(out.get("info") or {})
    info["coco_lt_val"] = summary
    out["info"] = info
    _write_atomic(Path(out_json), out)
    return summary

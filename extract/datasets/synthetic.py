"""The embedded long-tailed benchmark: OpenMoji glyph instances on photo backgrounds, LVIS v1 format.

``generate(config, out_dir)`` writes::

    out_dir/train.json  out_dir/val.json      LVIS v1 (categories / images / annotations)
    out_dir/images/{train,val}/<id:012d>.png  RGB, fixed PNG settings
    out_dir/meta.json                         config, seed, generator and library versions,
                                              glyph codepoints, per-class targets, overflow images

The benchmark is *exhaustively labelled*: every object of every class is annotated, so each image
lists every category absent from it in ``neg_category_ids`` (and ``not_exhaustive_category_ids``
is empty). LVIS evaluation therefore counts a detection of any class on any image as a false
positive when the image holds no such object — stricter than LVIS itself, where most categories
are "unknown" on most images and their detections are ignored.

Everything is a pure function of the config: the same config (seed included) gives byte-identical
files on the same library versions, whatever the number of worker processes.
"""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import PIL
import pycocotools.mask as mask_util
from PIL import Image

from cache_schema.errors import ConfigError, DatasetError
from cache_schema.runtime import available_cores
from extract.datasets.backgrounds import BACKGROUND_SOURCES, load_backgrounds
from extract.datasets.glyphs import Glyph, openmoji_version, select_glyphs
from extract.datasets.render import RenderedImage, image_rng, render_image
from extract.datasets.synthetic_config import (
    GENERATOR_VERSION,
    VAL_ID_OFFSET,
    SynthConfig,
    plan_split,
    train_targets,
    val_targets,
)

SPLITS = ("train", "val")
_SPLIT_CODE = {"train": 0, "val": 1}
_FIRST_ID = {"train": 1, "val": VAL_ID_OFFSET + 1}
_PNG_COMPRESS_LEVEL = 1  # level 6 tripled generation time for 6% smaller files

# A task is (split, image_id, labels in drawing order); its result is
# (split, image_id, [(label, rle, area, bbox)], leftover labels).
Task = tuple[str, int, list[int]]
Result = tuple[str, int, list[tuple[int, dict, int, list[float]]], tuple[int, ...]]

_WORKER: dict = {}


def template_px(config: SynthConfig) -> int:
    """Font size of the class templates: about the largest object, so templates are only shrunk."""
    return max(64, int(math.ceil(config.max_object_frac * config.image_size * 1.1)))


def class_glyphs(config: SynthConfig) -> tuple[Glyph, ...]:
    """The benchmark's classes, contiguous index ``k`` = category id ``k + 1``."""
    return select_glyphs(config.num_classes, template_px=template_px(config))


def image_file(split: str, image_id: int) -> str:
    """``file_name`` of an image, relative to the dataset directory."""
    return f"images/{split}/{image_id:012d}.png"


def plan_images(config: SynthConfig) -> dict[str, list[Task]]:
    """Planned images per split (before overflow images), each ``(split, id, labels)``."""
    plans = {}
    for split, targets, stream in (("train", train_targets(config), 3), ("val", val_targets(config), 4)):
        rng = np.random.default_rng(np.random.SeedSequence([config.seed, stream]))
        n = config.train_images if split == "train" else config.val_images
        groups = plan_split(targets, n, config, rng)
        plans[split] = [(split, _FIRST_ID[split] + i, g) for i, g in enumerate(groups)]
    return plans


def rerender(config: SynthConfig, split: str, image_id: int, labels: list[int]) -> RenderedImage:
    """Render one image exactly as ``generate`` did (for checks and debugging)."""
    return render_image(
        labels=labels,
        templates=[g.template for g in class_glyphs(config)],
        backgrounds=load_backgrounds(),
        config=config,
        rng=image_rng(config.seed, _SPLIT_CODE[split], image_id),
    )


def _init_worker(templates: list[np.ndarray], backgrounds: tuple, config: SynthConfig, root: str) -> None:
    _WORKER.update(templates=templates, backgrounds=backgrounds, config=config, root=Path(root))


def _encode(mask: np.ndarray) -> tuple[dict, int, list[float]]:
    rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
    area = int(mask_util.area(rle))
    bbox = [float(v) for v in mask_util.toBbox(rle)]
    rle["counts"] = rle["counts"].decode("ascii")  # json cannot hold bytes
    return {"size": [int(s) for s in rle["size"]], "counts": rle["counts"]}, area, bbox


def _render_task(task: Task) -> Result:
    split, image_id, labels = task
    config: SynthConfig = _WORKER["config"]
    img = render_image(
        labels=labels,
        templates=_WORKER["templates"],
        backgrounds=_WORKER["backgrounds"],
        config=config,
        rng=image_rng(config.seed, _SPLIT_CODE[split], image_id),
    )
    path = _WORKER["root"] / image_file(split, image_id)
    Image.fromarray(img.rgb, "RGB").save(path, format="PNG", compress_level=_PNG_COMPRESS_LEVEL)
    anns = []
    for label, mask in zip(img.labels.tolist(), img.visible_masks):
        rle, area, bbox = _encode(mask)
        anns.append((int(label), rle, area, bbox))
    return split, image_id, anns, img.leftover


def _run(tasks: list[Task], workers: int, progress: bool, description: str) -> Iterator[Result]:
    """Results of ``tasks`` in task order (so output never depends on scheduling)."""
    from rich.progress import Progress

    with Progress(disable=not progress, transient=False) as bar:
        job = bar.add_task(description, total=len(tasks))
        if workers <= 1 or len(tasks) < 8:
            results: Iterable[Result] = map(_render_task, tasks)
            for r in results:
                bar.advance(job)
                yield r
            return
        ctx = multiprocessing.get_context("fork")
        with ctx.Pool(workers, initializer=_init_worker, initargs=_worker_args()) as pool:
            for r in pool.imap(_render_task, tasks, chunksize=8):
                bar.advance(job)
                yield r


def _worker_args() -> tuple:
    return (_WORKER["templates"], _WORKER["backgrounds"], _WORKER["config"], str(_WORKER["root"]))


def _render_all(config: SynthConfig, workers: int, progress: bool) -> tuple[dict[str, list[Result]], dict]:
    """Render planned images, then overflow images for objects that did not fit, until none remain."""
    plans = plan_images(config)
    results: dict[str, list[Result]] = {s: [] for s in SPLITS}
    overflow: dict[str, list[list]] = {s: [] for s in SPLITS}
    tasks = plans["train"] + plans["val"]
    next_id = {s: _FIRST_ID[s] + len(plans[s]) for s in SPLITS}
    description = "rendering synthetic benchmark"
    while tasks:
        leftovers: dict[str, list[int]] = {s: [] for s in SPLITS}
        for r in _run(tasks, workers, progress, description):
            results[r[0]].append(r)
            leftovers[r[0]].extend(r[3])
        tasks = []
        # Why half-full overflow images: the objects failed in crowded scenes; fewer neighbours
        # let them be placed with enough of them visible.
        per_image = max(1, config.max_objects // 2)
        for split in SPLITS:
            left = leftovers[split]
            for i in range(0, len(left), per_image):
                task = (split, next_id[split], left[i : i + per_image])
                next_id[split] += 1
                tasks.append(task)
                overflow[split].append([task[1], task[2]])
        description = "rendering overflow images"
    return results, overflow


def _check_counts(results: dict[str, list[Result]], config: SynthConfig) -> None:
    """Every class must end with exactly its target instances in each split (none lost)."""
    for split, targets in (("train", train_targets(config)), ("val", val_targets(config))):
        got = np.zeros(config.num_classes, np.int64)
        for _, _, anns, _ in results[split]:
            np.add.at(got, [a[0] for a in anns], 1)
        if not np.array_equal(got, targets):
            raise DatasetError(f"internal: {split} instance counts differ from the targets; please report this")


def _frequency(image_count: int) -> str:
    return "r" if image_count <= 10 else ("c" if image_count <= 100 else "f")


def _categories(glyphs: tuple[Glyph, ...], train: list[Result]) -> list[dict]:
    c = len(glyphs)
    instances = np.zeros(c, np.int64)
    images = np.zeros(c, np.int64)
    for _, _, anns, _ in train:
        labels = [a[0] for a in anns]
        np.add.at(instances, labels, 1)
        np.add.at(images, sorted(set(labels)), 1)
    cats = []
    for k, g in enumerate(glyphs):
        cats.append({
            "id": k + 1,
            "name": g.name,
            "synonyms": [g.name],
            "def": f"OpenMoji {openmoji_version()} glyph U+{g.codepoint:04X} ({g.name.replace('_', ' ')})",
            "frequency": _frequency(int(images[k])),
            "image_count": int(images[k]),
            "instance_count": int(instances[k]),
        })
    return cats


def _split_json(config: SynthConfig, split: str, results: list[Result], categories: list[dict]) -> dict:
    size = config.image_size
    all_ids = [cat["id"] for cat in categories]
    images, annotations = [], []
    for _, image_id, anns, _ in sorted(results, key=lambda r: r[1]):
        present = {label + 1 for label, *_ in anns}
        images.append({
            "id": image_id,
            "file_name": image_file(split, image_id),
            "height": size,
            "width": size,
            "neg_category_ids": [cid for cid in all_ids if cid not in present],
            "not_exhaustive_category_ids": [],
        })
        for label, rle, area, bbox in anns:
            annotations.append({
                "id": len(annotations) + 1,
                "image_id": image_id,
                "category_id": label + 1,
                "bbox": bbox,
                "area": area,
                "segmentation": rle,
                "iscrowd": 0,
            })
    info = {
        "description": f"roicache synthetic long-tailed benchmark ({split})",
        "version": GENERATOR_VERSION,
        "seed": config.seed,
        "exhaustive": True,
    }
    return {"info": info, "licenses": [], "categories": categories, "images": images, "annotations": annotations}


def _meta(config: SynthConfig, glyphs: tuple[Glyph, ...], overflow: dict, counts: dict) -> dict:
    return {
        "generator": GENERATOR_VERSION,
        "seed": config.seed,
        "config": config.to_dict(),
        "openmoji_version": openmoji_version(),
        "numpy_version": np.__version__,
        "pillow_version": PIL.__version__,
        "glyph_codepoints": [g.codepoint for g in glyphs],
        "background_sources": list(BACKGROUND_SOURCES),
        "train_targets": train_targets(config).tolist(),
        "val_targets": val_targets(config).tolist(),
        "overflow_images": overflow,
        "counts": counts,
        "license": "glyphs: OpenMoji, CC BY-SA 4.0; backgrounds: scikit-image sample data",
    }


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, sort_keys=True, separators=(",", ":")) + "\n", encoding="utf-8")


def _prepare_dirs(out_dir: Path, overwrite: bool) -> Path:
    """Create the temporary sibling directory the dataset is built in; returns it."""
    if out_dir.exists() and not out_dir.is_dir():
        raise DatasetError(f"output {out_dir} is a file; pass a directory path")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise DatasetError(f"output directory {out_dir} is not empty; choose a new path or pass overwrite=True")
    tmp = out_dir.parent / f".{out_dir.name}.partial-{os.getpid()}"
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        for split in SPLITS:
            (tmp / "images" / split).mkdir(parents=True)
    except OSError as exc:
        raise DatasetError(f"cannot write under {out_dir.parent} ({exc.strerror}); choose a writable output directory") from exc
    return tmp


def _publish(tmp: Path, out_dir: Path) -> None:
    """Move the finished dataset into place (the old one, if any, is removed only after)."""
    old = None
    if out_dir.exists():
        old = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}"
        out_dir.rename(old)
    tmp.rename(out_dir)
    if old is not None:
        shutil.rmtree(old)


def generate(
    config: SynthConfig,
    out_dir: Path,
    *,
    progress: bool = True,
    workers: int | None = None,
    overwrite: bool = False,
) -> Path:
    """Generate the benchmark into ``out_dir`` (built in a temporary sibling, renamed at the end).

    Args:
        config: the benchmark settings (``SynthConfig()`` is the default 200-class set).
        out_dir: destination directory; must not exist or be empty unless ``overwrite``.
        progress: show a progress bar on the terminal.
        workers: processes rendering images (default: the cores available); output is
            identical for any value.
        overwrite: replace an existing non-empty ``out_dir``.

    Returns:
        ``out_dir``.

    Raises:
        ConfigError: ``num_classes`` outside what the glyph set supplies (message gives the range).
        DatasetError: ``out_dir`` is not writable or not empty.
    """
    if not isinstance(config, SynthConfig):
        raise ConfigError("generate() needs a SynthConfig; build one with SynthConfig(...)")
    out_dir = Path(out_dir)
    glyphs = class_glyphs(config)  # raises ConfigError for an impossible class count, before any I/O
    tmp = _prepare_dirs(out_dir, overwrite)
    _WORKER.clear()
    _init_worker([g.template for g in glyphs], load_backgrounds(), config, str(tmp))
    try:
        n_workers = max(1, workers if workers is not None else available_cores())
        results, overflow = _render_all(config, n_workers, progress)
        categories = _categories(glyphs, results["train"])
        _check_counts(results, config)
        counts = {}
        for split in SPLITS:
            data = _split_json(config, split, results[split], categories)
            counts[split] = {"images": len(data["images"]), "instances": len(data["annotations"])}
            _write_json(tmp / f"{split}.json", data)
        _write_json(tmp / "meta.json", _meta(config, glyphs, overflow, counts))
        _publish(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        _WORKER.clear()
    return out_dir

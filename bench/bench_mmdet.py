"""P1 and extraction at the size users run: mmdet's LVIS v1 R50-FPN Mask R-CNN (1,203 classes).

    python bench/bench_mmdet.py [--train-images 32] [--steps 3] [--heads lastfc,3fc_ft]

Builds, once (under runs/bench/mmdet/), the model from mmdet's own bundled config
``mask-rcnn_r50_fpn_sample1e-3_ms-1x_lvis-v1`` with random weights (no download; the numbers are
about time, not accuracy), saved as an mmengine checkpoint, and a long-tailed LVIS-format
dataset of textured images sized so the config's test pipeline resizes them to 1333x800, with
1,203 categories. Then:

1. extraction (``extract``, levels pooled+fc, 300 proposals per image): images/s, bytes per RoI
   of ``feat/pooled`` (12,544-d) and ``feat/fc`` (1,024-d), measured from the store's arrays;
2. P1: ``bench_online.bench_head`` per head — the same bi-level calibration from the cache and
   online through the frozen mmdet model, per-step times side by side;
3. the head's own forward + backward on a batch of the size the calibration steps drew, so a
   cached step can be compared with its compute alone (the rest is reading the store).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from types import SimpleNamespace

import _common as C  # noqa: E402  (adds the repo root to sys.path)
import numpy as np
import torch
from PIL import Image

from bench_online import bench_head
from cache_schema import open_store
from extract.writer import ExtractConfig, extract

CONFIG = "mask-rcnn_r50_fpn_sample1e-3_ms-1x_lvis-v1"
NUM_CLASSES = 1203
WORK = C.BENCH_OUT / "mmdet"


def build_checkpoint(path: Path) -> Path:
    if path.exists():
        return path
    from extract.detectors.mmdet_config import bundled_config_path, require_mmdet
    from extract.detectors.mmdet_adapter import _drop_pretrained

    require_mmdet()
    from mmdet.registry import MODELS
    from mmengine.config import Config

    cfg = Config.fromfile(str(bundled_config_path(CONFIG)))
    _drop_pretrained(cfg.model)
    torch.manual_seed(0)
    model = MODELS.build(cfg.model)
    model.init_weights()
    names = tuple(f"class_{k:04d}" for k in range(NUM_CLASSES))
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"meta": {"dataset_meta": {"classes": names}, "cfg": cfg.pretty_text},
                "state_dict": model.state_dict()}, path)
    return path


def build_data(root: Path, train_images: int, val_images: int = 4) -> Path:
    """LVIS-format dataset: 1216x800 textured images (1333x800 would not keep its ratio), 2–6
    boxes each, classes drawn from a power law over all 1,203 categories."""
    if (root / "val.json").exists():
        return root
    rng = np.random.default_rng(0)
    weights = 1.0 / np.arange(1, NUM_CLASSES + 1) ** 1.2
    cats = [{"id": k + 1, "name": f"class_{k:04d}", "frequency": "r", "synonyms": [], "def": "", "image_count": 0,
             "instance_count": 0} for k in range(NUM_CLASSES)]
    ann_id = 1
    for split, n in (("train", train_images), ("val", val_images)):
        images, anns = [], []
        (root / "images" / split).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            h, w = 800, 1216
            img = (rng.random((h // 8, w // 8, 3)) * 255).astype(np.uint8)
            name = f"images/{split}/{i:06d}.jpg"
            Image.fromarray(img).resize((w, h), Image.BILINEAR).save(root / name, quality=90)
            images.append({"id": i + 1, "file_name": name, "height": h, "width": w, "neg_category_ids": [],
                           "not_exhaustive_category_ids": []})
            for _ in range(int(rng.integers(2, 7))):
                x, y = rng.uniform(0, w - 200), rng.uniform(0, h - 200)
                bw, bh = rng.uniform(40, 200), rng.uniform(40, 200)
                c = int(rng.choice(NUM_CLASSES, p=weights / weights.sum())) + 1
                anns.append({"id": ann_id, "image_id": i + 1, "category_id": c, "bbox": [x, y, bw, bh],
                             "area": bw * bh, "segmentation": [[x, y, x + bw, y, x + bw, y + bh, x, y + bh]]})
                ann_id += 1
        (root / f"{split}.json").write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
    return root


def head_compute_ms(store: Path, head: str, rois: int, repeats: int = 5) -> float:
    """Median ms of the head's forward + backward + SGD step (the optimiser ``heads train`` uses)
    on ``rois`` random RoIs of its level: the compute a cached step cannot avoid."""
    from cache_schema.head_init import read_head_weights
    from heads.build import make_head_spec
    from heads.config import load_config
    from heads.models import build_head, level_for_head

    s = open_store(str(store))
    cfg = load_config(None, {"head.name": head})
    level = level_for_head(head)
    init = read_head_weights(s)
    spec = make_head_spec(cfg, feature_shape=tuple(s.meta.detector.levels[level]), num_classes=s.meta.num_classes,
                          init_state=init, init_from=None,
                          loss=SimpleNamespace(background_score="learned"))  # softmax CE, as calibration
    model = build_head(spec, init_state=init, seed=0)
    sch = cfg.schedule  # the optimiser heads train builds (momentum, weight decay)
    opt = torch.optim.SGD(model.parameters(), lr=sch.lr, momentum=sch.momentum, weight_decay=sch.weight_decay)
    x = torch.randn(rois, *s.meta.detector.levels[level])
    y = torch.randint(0, s.meta.num_classes + 1, (rois,))
    times = []
    for _ in range(repeats + 1):
        t0 = time.perf_counter()
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times[1:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--train-images", type=int, default=32)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--heads", default="lastfc,3fc_ft")
    ap.add_argument("--out", type=Path, default=C.BENCH_OUT / "bench_mmdet.md")
    a = ap.parse_args()
    torch.set_num_threads(1)
    ckpt = build_checkpoint(WORK / "mask_rcnn_r50_lvis_random.pth")
    data = build_data(WORK / "data", a.train_images)
    store = WORK / "store.zarr"
    t0 = time.perf_counter()
    report = extract(ckpt=ckpt, data=data, out=str(store), progress=False,
                     config=ExtractConfig(levels=("pooled", "fc"), rois_per_image=300, batch_size=1, device="cpu",
                                          threads=1, resume=True))
    wall = time.perf_counter() - t0
    s = open_store(str(store))
    split = s.split("train")
    rois = int(split.num_rois().sum())
    sizes = {lv: split.array(f"feat/{lv}").nbytes_stored() / max(rois, 1) for lv in ("pooled", "fc")}
    lines = [C.header("mmdet LVIS v1 R50-FPN Mask R-CNN (random init, 1,203 classes, 1333x800 inputs)", extra={
        "extraction": f"{report.images_written} images, {report.rois_written:,} RoIs in {wall:.0f} s "
                      f"({report.images_written / max(wall, 1e-9):.3f} images/s, 1 torch thread; 0 images = resumed)",
        "stored bytes per train RoI": ", ".join(f"{lv} {b / 1024:.1f} KiB" for lv, b in sizes.items())})]
    for head in a.heads.split(","):
        lines.append(bench_head(store=store, ckpt=ckpt, head=head, steps=a.steps, repeats=1, combines=()))
        rows = [json.loads(x) for x in (C.BENCH_OUT / "online" / head / "cache_0" / "log.jsonl").read_text().splitlines()]
        per_step = statistics.median(r["rois_per_step"] for r in rows if "rois_per_step" in r)
        secs = [r["seconds"] for r in rows if "loss" in r]
        step_ms = 1000 * (secs[-1] - secs[0]) / max(len(secs) - 1, 1)
        compute = head_compute_ms(store, head, int(per_step))
        lines.append(f"- {head}: cached step {step_ms:.0f} ms vs the head's own forward+backward+step on "
                     f"{int(per_step)} RoIs {compute:.0f} ms: **{step_ms / compute:.2f}x** (target <= 1.3x)")
    C.emit("\n\n".join(lines), a.out)


if __name__ == "__main__":
    main()

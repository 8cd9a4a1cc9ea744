"""The *after* half of the scale model (issue 13): schema 2 at LVIS v1 size, from a measured store.

    python bench/scale_after.py [--store runs/bench/stream_scale/small.zarr]

Reads a schema-2 store (default: the mmdet-sized synthetic store bench_stream_scale.py builds; any
extracted schema-2 store works) and computes, with every per-RoI figure measured on it:

- stored bytes per train RoI per array (padding included: bytes on disk / RoIs), next to raw;
- the LVIS v1 train split at the store's RoIs per image (all foreground + K background);
- objects: listed per 1,000 images on the store, and laid out for LVIS v1 train (100,170 images,
  stride 320, the commit block of the store) by the layout code itself;
- a streamed bi-level step (the sampler drawn on the store's labels): RoIs used, RoIs decoded by
  row reads (the inner chunks the used rows fall in) and by whole-image reads, and the decoded
  MiB/s a step rate needs.
"""

from __future__ import annotations

import argparse
import os
from collections import defaultdict
from pathlib import Path

import numpy as np

import _common as C  # noqa: E402  (adds the repo root to sys.path)

from cache_schema import open_store
from cache_schema.layout import split_layout
from heads.samplers import BilevelSampler
from heads.sources import RoiIndex

LVIS_TRAIN_IMAGES = 100_170
LVIS_STRIDE = 320  # 300 proposals + up to ~20 appended GT boxes, aligned to 16


def _sizes(split) -> tuple[dict[str, tuple[float, float]], int]:
    """array -> (raw bytes per RoI, stored bytes per RoI); and the RoIs held."""
    rois = int(split.num_rois()[split.done()].sum())
    out = {}
    for path, (dtype, trailing) in split.roi_array_paths().items():
        raw = int(np.prod(trailing, dtype=np.int64)) * np.dtype(dtype).itemsize
        out[path] = (float(raw), split.stored_nbytes(path) / rois)
    return out, rois


def _objects(path: Path) -> dict[str, int]:
    counts: dict[str, int] = defaultdict(int)
    for d, _, files in os.walk(path):
        counts[os.path.relpath(d, path).split("/c/")[0].split("/c")[0]] += len(files)
    return counts


def _step_reads(split, steps: int) -> tuple[float, float, float, float]:
    """Per step: (RoIs used, RoIs decoded by row reads, RoIs decoded by whole images, images)."""
    labels = split.load(level=None)
    index = RoiIndex.from_roiset(labels, num_classes=split.num_classes)
    sampler = BilevelSampler(index=index, class_info=split.store.classes, seed=0)
    inner = split.array("feat/pooled").chunks[0]
    used, rows_dec, whole, imgs = [], [], [], []
    for step in range(steps):
        rows = sampler.batch(step).rows
        blocks = index.blocks_of_rows(rows)
        store_rows = index.images[blocks] * split.stride + (rows - index.image_offsets[blocks])
        used.append(len(rows))
        rows_dec.append(len(np.unique(store_rows // inner)) * inner)
        uniq = np.unique(blocks)
        whole.append(int(np.diff(index.image_offsets)[uniq].sum()))
        imgs.append(len(uniq))
    return float(np.mean(used)), float(np.mean(rows_dec)), float(np.mean(whole)), float(np.mean(imgs))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store", type=Path, default=C.BENCH_OUT / "stream_scale" / "small.zarr")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--step-rates", default="2.5,23.5",
                    help="steps/s to size the read bandwidth for (3fc_ft at R50-FPN size on this CPU ~2.5, embedded 23.5)")
    args = ap.parse_args()
    store = open_store(args.store)
    split = store.split("train")
    sizes, rois = _sizes(split)
    per_image = rois / split.num_images
    lvis_rois = per_image * LVIS_TRAIN_IMAGES
    rows = [[p, f"{raw:,.0f}", f"{stored:,.0f}", f"{stored / raw:.2f}", f"{stored * lvis_rois / 2**30:,.1f}"]
            for p, (raw, stored) in sorted(sizes.items(), key=lambda kv: -kv[1][1])]
    total = sum(s for _, s in sizes.values())
    rows.append(["**all**", f"{sum(r for r, _ in sizes.values()):,.0f}", f"{total:,.0f}", "",
                 f"**{total * lvis_rois / 2**30:,.1f}**"])
    listed = _objects(Path(args.store) / "train")
    roi_objects = sum(n for k, n in listed.items() if k.startswith(("rois", "feat", "images")))
    layout = split_layout(num_images=LVIS_TRAIN_IMAGES, stride=LVIS_STRIDE, num_gt=1, num_classes=store.meta.num_classes,
                          levels=dict(store.meta.detector.levels), with_masks=False, mask_size=28,
                          image_block=split.commit_block, store_logits=split.store_logits)
    lvis_objects = sum(-(-spec.shape[0] // spec.object_rows) for spec in layout.values() if spec.kind in ("roi", "mark"))
    v1 = split_layout(num_images=LVIS_TRAIN_IMAGES, stride=LVIS_STRIDE, num_gt=1, num_classes=store.meta.num_classes,
                      levels=dict(store.meta.detector.levels), with_masks=False, mask_size=28, image_block=64, version=1)
    v1_objects = sum(-(-spec.shape[0] // spec.object_rows) for spec in v1.values() if spec.kind in ("roi", "mark"))
    used, dec_rows, dec_whole, imgs = _step_reads(split, args.steps)
    row_mib = sizes["feat/pooled"][0] / 2**20
    bw = [[f"{r:g}", f"{dec_rows * row_mib * r:,.0f}", f"{dec_whole * row_mib * r:,.0f}"]
          for r in (float(x) for x in args.step_rates.split(","))]
    text = "\n".join([
        C.header("Scale model, after: schema 2 at LVIS v1 size", extra={
            "store": f"{args.store} ({split.num_images:,} train images, {rois:,} RoIs = {per_image:.1f} per image, "
                     f"levels {dict(store.meta.detector.levels)}, {store.meta.num_classes:,} classes, logits "
                     f"{'stored' if split.store_logits else 'recomputed from fc'}, rows {split.row_order}-ordered, "
                     f"commit block {split.commit_block})"}),
        "\n#### bytes per train RoI (stored = bytes on disk / RoIs, padding included) and LVIS v1 train at "
        f"{per_image:.1f} RoIs per image\n",
        C.table(["array", "raw B/RoI", "stored B/RoI", "stored/raw", "LVIS v1 train GiB"], rows),
        "\n#### objects\n",
        f"- listed on this store: {roi_objects:,} RoI/mark objects for {split.num_images:,} images = "
        f"**{1000 * roi_objects / split.num_images:,.0f} per 1,000 images**",
        f"- laid out for LVIS v1 train (stride {LVIS_STRIDE}, block {split.commit_block}): {lvis_objects:,} objects "
        f"= {1000 * lvis_objects / LVIS_TRAIN_IMAGES:,.0f} per 1,000 images; schema 1 with the same arrays: "
        f"{v1_objects:,} = {1000 * v1_objects / LVIS_TRAIN_IMAGES:,.0f} per 1,000 images",
        f"\n#### a streamed bi-level step (16 classes x 1 image, bg:fg 1:1; sampler drawn {args.steps} steps on this "
        "store's labels)\n",
        f"- RoIs used {used:.0f} from {imgs:.1f} images; decoded by row reads (inner chunks of "
        f"{split.array('feat/pooled').chunks[0]} rows) {dec_rows:.0f} ({dec_rows / used:.1f}x); by whole-image reads "
        f"{dec_whole:.0f} ({dec_whole / used:.1f}x; schema 1 at all proposals: ~10x, docs/scale.md before)",
        "",
        C.table(["steps/s", "pooled MiB/s decoded (row reads)", "pooled MiB/s decoded (whole images)"], bw),
    ])
    C.emit(text, C.BENCH_OUT / "scale_after.md")


if __name__ == "__main__":
    main()

"""Store reads, schema 1 vs 2, direct reader vs zarr (issue 13): the figures behind ``rowio``.

    python bench/bench_store_read.py [--images 600] [--repeats 5]

Builds (once, under ``runs/bench/store_read/``) a synthetic train split with ``roicache cache
synth`` (embedded-detector sizes: fc 256, pooled 64x7x7; 200 LVIS-like classes; 16 background
RoIs per image) in schema 2, and the same rows written into a schema-1 layout (one object per image
per array). Then, side by side (interleaved, order rotated, medians):

- full load of a level (``SplitStore._read_array``): schema-2 direct reader, schema-2 through zarr
  (one slice per image, fetched concurrently: ``rowio.zarr_rows``), schema-2 through zarr's
  integer-array selection, and schema-1 direct (what the old chunk reader did);
- a streamed bi-level batch (the sampler drawn on the store's labels: 16 classes x 1 image, bg:fg
  1:1): the rows it uses (``read_rows``; label-sorted rows, inner chunks) vs whole images (what
  streaming read before, and all a schema-1 store allows);
- objects per 1,000 images and stored bytes per RoI of both layouts (listed, not computed).
"""

from __future__ import annotations

import argparse
import os
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np

import _common as C  # noqa: E402  (adds the repo root to sys.path)

from cache_schema import create_store, finalize, open_store
from cache_schema.rowio import zarr_rows
from extract.synth_store import SynthStoreConfig, synth_store
from heads.samplers import BilevelSampler
from heads.sources import RoiIndex

OUT = C.BENCH_OUT / "store_read"


def _build(images: int) -> tuple[Path, Path]:
    v2, v1 = OUT / f"v2_{images}.zarr", OUT / f"v1_{images}.zarr"
    if not (v2 / "zarr.json").exists() or not open_store(v2).is_complete:
        cfg = SynthStoreConfig(images=images, classes=200, levels=(("fc", (256,)), ("pooled", (64, 7, 7))))
        synth_store(str(v2), cfg, overwrite=True)
    if not (v1 / "zarr.json").exists() or not open_store(v1).is_complete:
        shutil.rmtree(v1, ignore_errors=True)
        src = open_store(v2)
        s = src.split("train")
        spec = replace(_spec(s), row_order="proposal", store_logits=True)
        dst = create_store(v1, meta=replace(src.meta, schema_version=1), classes=src.classes, splits=[spec])
        d = dst.split("train")
        paths = [p for p in d.roi_array_paths() if p != "rois/logits"]
        for a in range(0, s.num_images, 64):
            sel = np.arange(a, min(a + 64, s.num_images))
            counts = s.num_rois()[sel]
            cols = {p: s._read_array(p, sel, counts) for p in paths}
            cols["rois/logits"] = s.load(columns=("logits",), images=sel, level=None).logits.numpy()
            bounds = np.concatenate([[0], np.cumsum(counts)])
            d.write_block(int(a), [{p: v[bounds[j]:bounds[j + 1]] for p, v in cols.items()} for j in range(len(sel))])
        finalize(dst)
    return v1, v2


def _spec(s):
    from cache_schema.migrate import _spec as spec_of
    return spec_of(s, 1)


def _objects(path: Path) -> tuple[int, int]:
    files = [os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs]
    return len(files), sum(os.path.getsize(f) for f in files)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=600)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--batches", type=int, default=30)
    args = ap.parse_args()
    v1_path, v2_path = _build(args.images)
    v1, v2 = open_store(v1_path).split("train"), open_store(v2_path).split("train")
    sel, counts = v2.select()
    out_lines = []
    for level in ("pooled", "fc"):
        path = f"feat/{level}"
        rows = v2._rows(sel, counts)
        arr = v2.array(path)
        modes = {
            "v2 direct": lambda: v2._read_array(path, sel, counts),
            "v2 zarr slices": lambda: zarr_rows(arr, rows),
            "v2 zarr int-array": lambda: arr.get_orthogonal_selection((rows,)),
            "v1 direct": lambda: v1._read_array(path, sel, counts),
        }
        ref = modes["v2 direct"]()
        for name, fn in modes.items():
            assert np.array_equal(fn(), ref), name
        t = C.interleave(modes, repeats=args.repeats)
        mb = ref.nbytes / 1e6
        out_lines.append(f"\n#### full load of `{path}` ({len(ref):,} RoIs, {mb:.0f} MB decoded)\n")
        out_lines.append(C.table(["reader", "median s", "MB/s", "time / v2 direct"],
                                 [[n, C.fmt_s(t.median(n)), f"{mb / t.median(n):.0f}", f"{t.median_ratio(n, 'v2 direct'):.2f}"]
                                  for n in modes]))
    # Streamed bi-level batches: the rows used vs whole images.
    labels_only = v2.load(level=None)
    index = RoiIndex.from_roiset(labels_only, num_classes=v2.num_classes)
    sampler = BilevelSampler(index=index, class_info=open_store(v2_path).classes, seed=0)
    batches = [sampler.batch(s) for s in range(args.batches)]
    blocks = [index.blocks_of_rows(b.rows) for b in batches]
    used = sum(len(b.rows) for b in batches) / len(batches)
    whole = sum(int(np.diff(index.image_offsets)[np.unique(k)].sum()) for k in blocks) / len(batches)

    def rows_v2() -> None:
        for b, k in zip(batches, blocks):
            v2.read_rows(index.images[k], b.rows - index.image_offsets[k], level="pooled")

    def images_of(split):
        def run() -> None:
            for k in blocks:
                split.load(level="pooled", images=index.images[np.unique(k)])
        return run

    modes = {"v2 rows used": rows_v2, "v2 whole images": images_of(v2), "v1 whole images": images_of(v1)}
    t = C.interleave(modes, repeats=args.repeats)
    out_lines.append(f"\n#### streamed bi-level batches (`pooled`; {args.batches} batches: {used:.0f} RoIs used, "
                     f"{whole:.0f} RoIs in their images per batch)\n")
    out_lines.append(C.table(["read", "ms / batch", "time / v2 rows used"],
                             [[n, f"{1e3 * t.median(n) / args.batches:.1f}", f"{t.median_ratio(n, 'v2 rows used'):.2f}"]
                              for n in modes]))
    n1, b1 = _objects(v1_path / "train")
    n2, b2 = _objects(v2_path / "train")
    rois = int(counts.sum())
    out_lines.append("\n#### objects and bytes (train split, listed)\n")
    out_lines.append(C.table(["layout", "objects", "objects / 1,000 images", "stored bytes / RoI"],
                             [["schema 1", n1, f"{1000 * n1 / len(sel):,.0f}", f"{b1 / rois:,.0f}"],
                              ["schema 2", n2, f"{1000 * n2 / len(sel):,.0f}", f"{b2 / rois:,.0f}"]]))
    text = C.header("Store reads: schema 1 vs 2, direct reader vs zarr", extra={
        "store": f"`cache synth --images {args.images} --classes 200 --levels fc:256,pooled:64x7x7` (16 bg RoIs/image), "
                 f"{rois:,} train RoIs; schema-1 copy of the same rows",
        "load": C.load_line(t)}) + "\n".join(out_lines)
    C.emit(text, C.BENCH_OUT / "bench_store_read.md")


if __name__ == "__main__":
    main()

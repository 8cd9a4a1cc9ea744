"""The store at LVIS scale, computed from measured per-RoI sizes (issue 13, docs/scale.md).

    python bench/scale_model.py [--mmdet-store runs/bench/mmdet/store.zarr]
                                [--embedded-store runs/demo/cache.zarr] [--out runs/bench/scale_model.md]

Measured, from real stores (not typed in):
- bytes per RoI of every per-RoI array as stored (chunks incl. padding, after compression) and
  raw, per split: ``--mmdet-store`` is the mmdet LVIS v1 R50-FPN Mask R-CNN config at its real
  size (1,203 classes, 256x7x7 pooled, 1,024-d fc; ``bench/bench_mmdet.py`` writes it, random
  weights), ``--embedded-store`` the embedded detector's demo store;
- files per image (one chunk file per image per per-RoI array and mark), foreground fraction
  and RoIs per train image (from the embedded store: a random-init RPN finds no foreground).

Inputs that are facts, not measurements: LVIS v1 image and annotation counts (the published
dataset), the bi-level batch (SimCal: 16 classes x 1 image) and the per-image extraction and
in-memory step rates recorded in bench/RESULTS.md (named below with where they come from).

Computed: store size per split and level, objects per 1,000 images and per store, extraction
time, and the read bandwidth streaming calibration needs to run at the in-memory step rate — for
the layout as it is (schema 1) only; the v2 layout is not built yet.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import numpy as np

import _common as C  # noqa: E402  (adds the repo root to sys.path)

from cache_schema import open_store  # noqa: E402

#: LVIS v1 (the published annotation files): images and annotations per split.
LVIS_V1 = {"train": (100_170, 1_270_141), "val": (19_809, 244_707)}
#: mmdet test-time proposals per image of the LVIS configs (rpn max_per_img), the store's K base.
PROPOSALS = 300
#: Seconds per image of extraction with the mmdet R50-FPN LVIS model, 1 torch thread on this CPU
#: (bench/RESULTS.md, "mmdet LVIS v1 R50-FPN Mask R-CNN": 20 images in 157 s).
MMDET_S_PER_IMAGE = 157.0 / 20
#: Steps/s of in-memory calibration on the embedded demo store (bench/RESULTS.md P2 blocks).
IN_MEMORY_STEPS = {"pooled": 23.46, "fc": 260.45}


@dataclass(frozen=True)
class ArraySize:
    path: str
    raw: float      # bytes per valid RoI, uncompressed
    stored: float   # bytes per valid RoI as stored (compressed chunks incl. padding rows)


def measure(store_path: Path, split: str) -> tuple[list[ArraySize], dict]:
    store = open_store(str(store_path))
    sp = store.split(split)
    rois = int(sp.num_rois()[sp.done()].sum())
    sizes = []
    for path, (dtype, trailing) in sp.roi_array_paths().items():
        raw = np.dtype(dtype).itemsize * int(np.prod(trailing, dtype=np.int64))
        sizes.append(ArraySize(path=path, raw=float(raw), stored=sp.stored_nbytes(path) / rois))
    roiset = sp.load()
    labels = roiset.labels.numpy()
    fg_per_image = np.add.reduceat((labels < store.meta.num_classes).astype(np.int64),
                                   roiset.image_offsets.numpy()[:-1]) if len(labels) else np.zeros(0)
    facts = {"fg_per_image": float(fg_per_image.mean()) if len(fg_per_image) else 0.0,"images": sp.num_images, "rois": rois, "stride": sp.stride, "classes": store.meta.num_classes,
             "fg_fraction": float((labels < store.meta.num_classes).mean()), "files_per_image": len(sizes) + 2,
             "levels": {lv: tuple(sp.level_shape(lv)) for lv in sp.levels}}
    return sizes, facts


def bilevel_use(store_path: Path, steps: int = 200) -> tuple[float, float]:
    """(RoIs used per step, distinct images read per step) of SimCal's bi-level sampler (the
    project's own, default settings) drawn on the store's real train labels."""
    from heads.build import build_sampler
    from heads.config import SamplerConfig
    from heads.sources import RoiIndex

    store = open_store(str(store_path))
    index = RoiIndex.from_roiset(store.split("train").load(), num_classes=store.meta.num_classes)
    sampler = build_sampler(SamplerConfig(name="bilevel"), index=index, class_info=store.classes, seed=0)
    batches = [sampler.batch(step) for step in range(steps)]
    return float(np.mean([len(b.rows) for b in batches])), float(np.mean([len(b.images) for b in batches]))


def by_group(sizes: list[ArraySize]) -> dict[str, ArraySize]:
    """Per-RoI bytes of the feature levels one by one, the class logits, and everything else."""
    out: dict[str, ArraySize] = {}
    for s in sizes:
        key = s.path if s.path.startswith("feat/") or s.path == "rois/logits" else "other rois/*"
        old = out.get(key, ArraySize(path=key, raw=0.0, stored=0.0))
        out[key] = ArraySize(path=key, raw=old.raw + s.raw, stored=old.stored + s.stored)
    return out


def gib(x: float) -> str:
    return f"{x / 2**30:,.1f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mmdet-store", type=Path, default=C.BENCH_OUT / "mmdet" / "store.zarr")
    ap.add_argument("--embedded-store", type=Path, default=C.DEMO_STORE)
    ap.add_argument("--out", type=Path, default=C.BENCH_OUT / "scale_model.md")
    args = ap.parse_args()

    _, emb = measure(args.embedded_store, "train")
    use = bilevel_use(args.embedded_store)
    rois_per_image = {split: PROPOSALS + anns / images for split, (images, anns) in LVIS_V1.items()}
    lines = [C.header("The store at LVIS v1 scale (schema 1, as built)", extra={
        "mmdet store": f"{args.mmdet_store} (LVIS v1 R50-FPN Mask R-CNN config, 1,203 classes, random weights)",
        "embedded store": f"{args.embedded_store} ({emb['classes']} classes, trained)",
        "LVIS v1": ", ".join(f"{k} {v[0]:,} images / {v[1]:,} annotations" for k, v in LVIS_V1.items()),
        "RoIs per image": f"train {rois_per_image['train']:.1f} ({PROPOSALS} proposals + the image's GT boxes, "
                          f"appended on the train split only), val {PROPOSALS}"}), ""]
    for name, path in (("mmdet R50-FPN LVIS", args.mmdet_store), ("embedded", args.embedded_store)):
        sizes, facts = measure(path, "train")
        groups = by_group(sizes)
        scale_logits = 1204 / (facts["classes"] + 1)  # logits are C+1 wide: project to LVIS's classes
        rows, per_roi = [], {}
        for key, g in groups.items():
            raw, stored = g.raw, g.stored
            if key == "rois/logits":
                raw, stored = raw * scale_logits, stored * scale_logits
            per_roi[key] = stored
            rows.append([key, f"{raw:,.0f}", f"{stored:,.0f}", f"{stored / raw:.2f}"])
        lines += [f"### {name}: bytes per train RoI (levels {facts['levels']}, logits at C+1 = 1,204)", "",
                  C.table(["array", "raw B/RoI", "stored B/RoI", "stored/raw"], rows), ""]
        size_rows = []
        for split, (images, _) in LVIS_V1.items():
            n = images * (rois_per_image["train"] if split == "train" else PROPOSALS)
            size_rows.append([split, f"{n / 1e6:,.1f} M"] + [gib(n * per_roi[k]) for k in per_roi] +
                             [gib(n * sum(per_roi.values()))])
        lines += [C.table(["LVIS v1 split", "RoIs"] + [f"{k} GiB" for k in per_roi] + ["total GiB"], size_rows), ""]
        # `extract --train-bg-per-image K` keeps every foreground RoI and K background ones.
        fg = emb["fg_per_image"]
        full_train = LVIS_V1["train"][0] * rois_per_image["train"] * sum(per_roi.values())
        subs = [f"K = {k}: {gib(LVIS_V1['train'][0] * (fg + k) * sum(per_roi.values()))} GiB "
                f"({(fg + k) / rois_per_image['train']:.2f}x)" for k in (16, 64)]
        lines += [f"- train split with `--train-bg-per-image K` (foreground RoIs per train image {fg:.1f}, measured on "
                  f"the embedded store; rows only — the padding of schema 1's fixed-stride chunks is zeros, which "
                  f"compress well but are not free, not measured): {', '.join(subs)} instead of {gib(full_train)} GiB", ""]
        files = facts["files_per_image"]
        total_images = sum(v[0] for v in LVIS_V1.values())
        lines += [f"- objects (chunk files): {files} per image (one per per-RoI array, plus the num_rois and done "
                  f"marks) = {files * 1000:,} per 1,000 images, {files * total_images / 1e6:.2f} M for LVIS v1 "
                  "train+val", ""]
        if name.startswith("mmdet"):
            hours = MMDET_S_PER_IMAGE * total_images / 3600
            lines += [f"- extraction at the measured {MMDET_S_PER_IMAGE:.2f} s/image (1 CPU thread): {hours:,.0f} h "
                      f"for train+val ({hours / 24:,.1f} days); the detector's own compute, not the store, sets it", ""]
        k = rois_per_image["train"]
        used, images = use  # measured on the embedded store's labels (LVIS's class statistics differ)
        bw_rows = []
        for level in facts["levels"]:
            key = f"feat/{level}"
            read = images * k * per_roi[key]  # streaming decodes whole image chunks
            rate = IN_MEMORY_STEPS[level]
            bw_rows.append([level, f"{read / 2**20:,.2f}", f"{used * per_roi[key] / 2**20:,.3f}",
                            f"{read / (used * per_roi[key]):.1f}x", f"{rate:.1f}", f"{rate * read / 2**20:,.0f}"])
        lines += ["Streaming calibration (bi-level, 16 classes x 1 image, bg:fg 1:1; whole image chunks read): the "
                  f"sampler drawn {200} steps on the embedded store's train labels uses {used:.0f} RoIs from "
                  f"{images:.1f} images per step, so at {k:.0f} RoIs per LVIS image a step reads "
                  f"{images * k:,.0f} RoIs for {used:.0f} used.", "",
                  C.table(["level", "MiB read/step", "MiB used/step", "read amplification",
                           "in-memory steps/s (embedded, P2)", "MiB/s to match it"], bw_rows), ""]
    C.emit("\n".join(lines), args.out)


if __name__ == "__main__":
    main()

"""P3 extraction overhead, P5 bytes per stored RoI, and store read throughput.

    python bench/bench_extract.py [--store runs/demo/cache.zarr] [--quick] [--parts extract,bytes,read]

extract: the same N train images (batches of 4, 1 torch thread, images read from disk in every
  mode) through (a) extraction exactly as ``extract`` runs it (``extract.writer._run_split``:
  adapter.run + IoU matching + store writes, levels of the store), (b) the bare adapter
  (``adapter.run`` alone, no matching, no writes), (c) torchvision's own inference
  (``model.eval()(images)``: transform, backbone, RPN, box head, postprocess, mask head and mask
  pasting on the kept detections), (d) match+write: IoU matching + ``split.write_image`` alone,
  single-threaded, on adapter outputs computed once (what extraction adds to the detector).
  Modes interleaved, order rotated, median over repeats.
bytes: stored bytes per RoI of each feature level vs raw float16 (``inspect_store``), and why:
  exact zeros, byte-plane entropy of the float16 values, and the same chunks re-encoded with
  other Blosc settings.
read: RoIs/s of ``split.load(level=...)`` (whole level into RAM) vs bi-level-like random
  batches of 16 images (``split.load(images=...)``, what streaming training reads per step)
  and the ``image_block`` loop over the same images.
Writes only under runs/bench/.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import time
from pathlib import Path

import _common as C  # noqa: E402  (adds the repo root to sys.path)
import numpy as np
import torch
from numcodecs import Blosc
from PIL import Image

from cache_schema import inspect_store, open_store, open_for_resume
from cache_schema.runtime import configure_threads
from extract.detectors.adapter import TorchvisionAdapter
from extract.progress import ExtractProgress
from extract.sharding import Shard, batch_groups
from extract.writer import ExtractConfig, _BlockCommitter, _label_batch, _load_split, _run_split, extract


# --------------------------------------------------------------------------- P3: extraction
def _subset_dataset(data: Path, out: Path, n: int) -> Path:
    """``out/train.json`` holding the first ``n`` train images of ``data`` (all categories kept,
    so the class count matches the detector) and an ``images`` link to the real files."""
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    d = json.loads((data / "train.json").read_text())
    images = d["images"][:n]
    keep = {im["id"] for im in images}
    d["images"] = images
    d["annotations"] = [a for a in d["annotations"] if a["image_id"] in keep]
    (out / "train.json").write_text(json.dumps(d))
    (out / "images").symlink_to((data / "images").resolve(), target_is_directory=True)
    if (data / "meta.json").is_file():  # how the images were generated (the shipped detector checks it)
        shutil.copy(data / "meta.json", out / "meta.json")
    return out


def _read(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"), dtype=np.uint8)


def bench_extraction(store_path: Path, *, n: int, repeats: int, ckpt: Path | None = None,
                     data: Path | None = None, torchvision: bool = True) -> str:
    if ckpt is None or data is None:  # the detector, data and settings a real store was made with
        real = open_store(store_path)
        meta = real.meta
        ckpt = Path(meta.detector.checkpoint_path)
        data = Path(meta.dataset.splits["train"].annotation_path).parent
        levels, rois_per_image = tuple(real.split("train").levels), meta.extraction.rois_per_image
    else:
        levels, rois_per_image = ("pooled", "fc"), None
    configure_threads(1)
    work = C.BENCH_OUT / "extract"
    sub = _subset_dataset(data, work / "data", n)
    out = work / "store.zarr"
    config = ExtractConfig(splits=("train",), levels=levels, rois_per_image=rois_per_image,
                           batch_size=4, device="cpu", threads=1, overwrite=True)
    # Creates the store and fills it once (also the warm-up of the extract mode).
    extract(ckpt=ckpt, data=sub, out=str(out), config=config, progress=False)
    adapter = TorchvisionAdapter.from_checkpoint(ckpt, device="cpu")
    s = _load_split(sub, "train", adapter)
    rpi = config.rois_per_image or adapter.default_proposals
    store = open_for_resume(str(out), open_store(out).meta)
    groups = batch_groups(len(s.annset), config.batch_size, Shard(), block=store.split("train").commit_block)
    everything = np.arange(len(s.annset))

    def reset() -> None:  # untimed: clear the done marks so the next run rewrites every image
        store.invalidate(split="train", images=everything)

    def run_extract() -> None:
        _run_split(store, s, adapter, config, rpi, ExtractProgress(enabled=False))

    def run_adapter() -> None:
        for g in groups:
            gts = [s.gt.boxes[s.gt_rows_of_image[p]] for p in g]
            adapter.run([_read(s.annset.image_path(p)) for p in g], gt_boxes=gts, levels=levels,
                        max_proposals=rpi, with_masks=False)

    model = adapter.model.eval()

    def run_torchvision() -> None:
        with torch.inference_mode():
            for g in groups:
                ims = [torch.from_numpy(np.require(_read(s.annset.image_path(p)), requirements=["W"]))
                       .permute(2, 0, 1).float().div_(255.0) for p in g]
                model(ims)

    split = store.split("train")
    # The writes mode replays what extraction does after the detector (IoU matching, row order,
    # commit blocks) on adapter outputs computed once up front, single-threaded.
    cached_outputs = {}
    for g in groups:
        gts = [s.gt.boxes[s.gt_rows_of_image[p]] for p in g]
        for p, o in zip(g, adapter.run([_read(s.annset.image_path(p)) for p in g], gt_boxes=gts, levels=levels,
                                       max_proposals=rpi, with_masks=False)):
            cached_outputs[p] = o

    def run_writes() -> None:
        # What the writer thread does after the detector: matching, row selection and order, then
        # block commits (the same functions extraction calls).
        committer = _BlockCommitter(split)
        for g in groups:
            images = _label_batch(split, s, g, [cached_outputs[p] for p in g], config, adapter.num_classes, False,
                                  adapter.stage_fg_iou)
            committer.add(g, images)

    modes = {"extract": run_extract, "adapter": run_adapter, "torchvision": run_torchvision, "match+write": run_writes}
    if not torchvision:  # 8x slower than the rest: left out of long runs
        del modes["torchvision"]
    t = C.interleave(modes,
                     repeats=repeats, warmup=True, setup={"extract": reset, "match+write": reset})
    rois = int(split.num_rois()[split.done()].sum())
    rows = [[m, C.fmt_s(t.median(m)), f"{1000 * t.median(m) / n:.1f} ms", f"{n / t.median(m):.2f}",
             f"{1000 * statistics.median(t.cpu[m]) / n:.1f} ms"]
            for m in modes]
    overhead = (t.median("extract") - t.median("adapter")) / n
    hdr = C.header("P3 — extraction vs bare inference", extra={
        "what": f"first {n} train images of {data}, batches of 4, 1 torch thread, levels {','.join(levels)}, "
                f"{rpi} proposals/image (+GT boxes in extract/adapter), {rois:,} RoIs written per run",
        "repeats": f"{repeats} interleaved (order rotated), after one untimed warm-up each",
        "timing": C.load_line(t)})
    body = C.table(["mode", "median wall", "per image", "images/s", "CPU time per image (all threads)"], rows)
    pairs = [("extract", "adapter")] + ([("extract", "torchvision"), ("adapter", "torchvision")] if torchvision else [])
    ratios = C.table(["ratio (median of per-repeat ratios)", "value", "per-repeat"], [
        [f"{a} / {b}", f"{t.median_ratio(a, b):.3f}x", ", ".join(f"{r:.3f}" for r in t.ratios(a, b))] for a, b in pairs])
    hidden = 1 - overhead * n / t.median("match+write")
    return (f"{hdr}\n\n{body}\n\n{ratios}\n\nextract − adapter: {1000 * overhead:.1f} ms per image; matching + "
            f"writing alone (match+write mode, one thread) costs {1000 * t.median('match+write') / n:.1f} ms per image, "
            f"so {100 * hidden:.0f}% of it is hidden behind the detector in extract (extraction writes on a second "
            f"thread; that needs a free core, see the load average).")


# --------------------------------------------------------------------------- P5: bytes
def _entropy_bits(values: np.ndarray) -> float:
    counts = np.bincount(values.ravel(), minlength=256).astype(np.float64)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log2(p)).sum())


def _padded_chunks(split, level: str, positions: np.ndarray) -> list[np.ndarray]:
    """The chunks exactly as the store encodes them: K rows per image, padding rows zero."""
    shape = split.level_shape(level)
    out = []
    for p in positions:
        block = split.image_block(int(p), level=level).features.numpy()
        chunk = np.zeros((split.stride, *shape), dtype=np.float16)
        chunk[: len(block)] = block
        out.append(chunk)
    return out


CODECS = {
    "blosc zstd-1 shuffle (stored)": Blosc(cname="zstd", clevel=1, shuffle=Blosc.SHUFFLE),
    "blosc zstd-9 shuffle": Blosc(cname="zstd", clevel=9, shuffle=Blosc.SHUFFLE),
    "blosc zstd-1 bitshuffle": Blosc(cname="zstd", clevel=1, shuffle=Blosc.BITSHUFFLE),
    "blosc zstd-1 no shuffle": Blosc(cname="zstd", clevel=1, shuffle=Blosc.NOSHUFFLE),
    "blosc lz4-5 shuffle": Blosc(cname="lz4", clevel=5, shuffle=Blosc.SHUFFLE),
}


def bench_bytes(store_path: Path, *, sample: int) -> str:
    summary = inspect_store(store_path)
    store = open_store(store_path)
    rows = []
    for s in summary.splits:
        for lv in s.levels:
            if lv.stored_bytes_per_roi is None:
                continue
            rows.append([s.name, lv.name, str(list(lv.shape)), f"{lv.raw_bytes_per_roi:,.0f}",
                         f"{lv.stored_bytes_per_roi:,.0f}", f"{lv.stored_bytes_per_roi / lv.raw_bytes_per_roi:.3f}"])
    split = store.split("train")
    counts = split.num_rois()
    rng = np.random.default_rng(0)
    positions = np.sort(rng.choice(np.flatnonzero(split.done()), size=min(sample, int(split.done().sum())), replace=False))
    pad = 1 - counts[positions].sum() / (split.stride * len(positions))
    why, codec_rows = [], []
    for lv in split.levels:
        chunks = _padded_chunks(split, lv, positions)
        valid = np.concatenate([c[: counts[p]] for c, p in zip(chunks, positions)]).reshape(-1)
        u16 = valid.view(np.uint16)
        nz = u16[(u16 & 0x7FFF) != 0]
        lo, hi = (nz & 0xFF).astype(np.uint8), (nz >> 8).astype(np.uint8)
        h_lo, h_hi = _entropy_bits(lo), _entropy_bits(hi)
        zero = 1 - len(nz) / len(u16)
        neg = float((nz >> 15).mean()) if len(nz) else 0.0
        # order-0 bound per value: zeros cost ~0, non-zeros at most the two planes' entropies
        bound = (1 - zero) * (h_lo + h_hi) / 16
        why.append([lv, f"{100 * zero:.1f}%", f"{100 * neg:.1f}%", f"{h_hi:.2f}", f"{h_lo:.2f}", f"{bound:.3f}"])
        raw = sum(c.nbytes for c in chunks)
        for name, codec in CODECS.items():
            t0 = time.perf_counter()
            enc = [codec.encode(c) for c in chunks]
            t_enc = time.perf_counter() - t0
            t0 = time.perf_counter()
            for e in enc:
                codec.decode(e)
            t_dec = time.perf_counter() - t0
            size = sum(len(e) for e in enc)
            codec_rows.append([lv, name, f"{size / raw:.3f}", f"{raw / 2**20 / t_enc:.0f}", f"{raw / 2**20 / t_dec:.0f}"])
    hdr = C.header("P5 — bytes per stored RoI", extra={
        "store": f"{store_path} ({'complete' if summary.complete else 'INCOMPLETE'})",
        "sample for the analysis": f"{len(positions)} random train images (seed 0); padding rows are "
                                   f"{100 * pad:.1f}% of their chunks (stride K={split.stride})"})
    t1 = C.table(["split", "level", "shape", "raw float16 B/RoI", "stored B/RoI", "stored/raw"], rows)
    t2 = C.table(["level", "exact zeros", "negative (of non-zero)", "H(high byte) bits", "H(low byte) bits",
                  "order-0 bound (of raw)"], why)
    t3 = C.table(["level", "codec (same chunks incl. padding)", "size/raw", "encode MiB/s", "decode MiB/s"], codec_rows)
    return f"{hdr}\n\n{t1}\n\nWhy (valid rows of the sample, float16 bit patterns):\n\n{t2}\n\n{t3}"


# --------------------------------------------------------------------------- read throughput
def bench_read(store_path: Path, *, batches: int, repeats: int, levels: tuple[str, ...]) -> str:
    store = open_store(store_path)
    split = store.split("train")
    done = np.flatnonzero(split.done())
    counts = split.num_rois()
    rng = np.random.default_rng(0)
    draws = [np.sort(rng.choice(done, size=16, replace=False)) for _ in range(batches)]
    batch_rois = int(sum(counts[d].sum() for d in draws))
    total_rois = int(counts[done].sum())
    rows, loads = [], []
    for lv in levels:
        if lv not in split.levels:
            continue

        def whole(lv=lv) -> None:
            split.load(level=lv)

        def blocks(lv=lv) -> None:
            for d in draws:
                split.load(level=lv, images=d)

        def image_blocks(lv=lv) -> None:
            for d in draws:
                for p in d:
                    split.image_block(int(p), level=lv)

        t = C.interleave({"whole": whole, "blocks": blocks, "image_block": image_blocks}, repeats=repeats, warmup=False)
        loads += t.load
        w, b, ib = t.median("whole"), t.median("blocks"), t.median("image_block")
        rows.append([lv, "load(level) whole split", f"{total_rois:,}", C.fmt_s(w), f"{total_rois / w:,.0f}",
                     f"{split.nbytes(lv) / 2**20 / w:,.0f}", "1"])
        rows.append([lv, f"load(images=16 random) x{batches}", f"{batch_rois:,}", C.fmt_s(b), f"{batch_rois / b:,.0f}",
                     f"{batch_rois * split.nbytes(lv) / total_rois / 2**20 / b:,.0f}",
                     f"{statistics.median([(x / batch_rois) / (y / total_rois) for x, y in zip(t.seconds['blocks'], t.seconds['whole'])]):.2f}"])
        rows.append([lv, f"image_block loop, same images", f"{batch_rois:,}", C.fmt_s(ib), f"{batch_rois / ib:,.0f}",
                     f"{batch_rois * split.nbytes(lv) / total_rois / 2**20 / ib:,.0f}",
                     f"{statistics.median([(x / batch_rois) / (y / total_rois) for x, y in zip(t.seconds['image_block'], t.seconds['whole'])]):.2f}"])
    hdr = C.header("Store read throughput (train split)", extra={
        "what": f"{len(done)} train images, {total_rois:,} RoIs; {batches} seeded batches of 16 distinct random "
                f"images (sorted, as the streaming source asks); reader pool of {min(16, 2 * len(os.sched_getaffinity(0)))} "
                "threads; page cache warm after the first repeat",
        "repeats": f"{repeats} interleaved per level; load average (1 min) {min(loads):.2f}–{max(loads):.2f}"})
    return hdr + "\n\n" + C.table(["level", "read", "RoIs", "median wall", "RoIs/s", "MiB/s (decoded float16)",
                                   "time per RoI vs whole"], rows)


def bench_overlap(repeats: int) -> str:
    """How much a second thread's CPU work overlaps the detector's on this machine: a 1-thread
    torch conv2d loop and a Blosc-zstd loop (what the writer thread spends its time in, releasing
    the GIL), alone and together. Extraction hides its writes behind the detector only as far as
    this overlap allows."""
    import threading

    torch.set_num_threads(1)
    x, w = torch.randn(64, 256, 56, 56), torch.randn(64, 256, 3, 3)
    data = np.random.default_rng(0).standard_normal(8_000_000).astype(np.float16).view(np.uint8)
    codec = Blosc(cname="zstd", clevel=1, shuffle=Blosc.SHUFFLE)

    def conv() -> None:
        for _ in range(6):
            torch.nn.functional.conv2d(x, w, padding=1)

    def comp() -> None:
        for _ in range(200):
            codec.encode(data)

    def both() -> None:
        th = threading.Thread(target=comp)
        th.start()
        conv()
        th.join()

    t = C.interleave({"conv": conv, "blosc": comp, "together": both}, repeats=repeats)
    serial = t.median("conv") + t.median("blosc")
    hidden = (serial - t.median("together")) / min(t.median("conv"), t.median("blosc"))
    return "\n".join([
        C.header("Thread overlap on this machine (what P3's writer thread can hide)"),
        "",
        C.table(["run", "median s"], [[m, f"{t.median(m):.2f}"] for m in ("conv", "blosc", "together")]),
        "",
        f"- together / (conv + blosc): {t.median('together') / serial:.2f}; share of the shorter loop hidden: "
        f"**{100 * hidden:.0f}%** (2 cores that ran fully in parallel would hide ~100%); {C.load_line(t)}",
    ])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--store", type=Path, default=C.DEMO_STORE)
    ap.add_argument("--quick", action="store_true", help="few images and repeats (a smoke run)")
    ap.add_argument("--parts", default="extract,bytes,read")
    ap.add_argument("--images", type=int, default=48, help="extraction: train images per run")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--read-levels", default="fc,pooled")
    ap.add_argument("--ckpt", type=Path, default=None, help="extraction part: this detector (with --data) instead of the store's")
    ap.add_argument("--data", type=Path, default=None, help="extraction part: this dataset directory")
    ap.add_argument("--no-torchvision", action="store_true", help="extraction part: leave torchvision's own inference out")
    ap.add_argument("--out", type=Path, default=C.BENCH_OUT / "bench_extract.md")
    a = ap.parse_args()
    n, reps = (8, 2) if a.quick else (a.images, a.repeats)
    blocks = []
    parts = a.parts.split(",")
    if "overlap" in parts:
        blocks.append(bench_overlap(reps))
    if "extract" in parts:
        blocks.append(bench_extraction(a.store, n=n, repeats=reps, ckpt=a.ckpt, data=a.data,
                                       torchvision=not a.no_torchvision))
    if "bytes" in parts:
        blocks.append(bench_bytes(a.store, sample=8 if a.quick else 64))
    if "read" in parts:
        blocks.append(bench_read(a.store, batches=10 if a.quick else 100, repeats=2 if a.quick else 3,
                                 levels=tuple(a.read_levels.split(","))))
    C.emit("\n\n".join(blocks), a.out)


if __name__ == "__main__":
    main()

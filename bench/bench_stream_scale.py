"""P2 at scale: bi-level calibration streaming from a store larger than RAM vs in memory.

    python bench/bench_stream_scale.py [--big-images N] [--heads 3fc_ft,lastfc] [--repeats 3]

Two synthetic stores in the real layout (``roicache cache synth``: LVIS-like 1,203 classes, the mmdet
R50-FPN levels fc 1024 and pooled 256x7x7, 12.7 objects and 16 background RoIs per image), built
once under ``runs/bench/stream_scale/``:

- *big*: enough images that the store is larger than this machine's RAM (``--big-images``, default
  computed from the small store's bytes per image), so streamed reads come from the disk, not the
  page cache; its files are also dropped from the page cache (``posix_fadvise DONTNEED``) before
  each streaming trial;
- *small*: 400 images, loaded whole for the in-memory baseline (steps/s of an in-memory run does not
  depend on the store's size; RoIs per step are reported for both).

Each trial is a fresh ``train_from_store`` subprocess (bench_calibration.py's child: 1 torch thread,
bi-level sampler, seed 0); modes interleaved, medians over repeats. The figure is streaming /
in-memory steps/s per head (P2 target >= 0.8).
"""

from __future__ import annotations

import argparse
import os
import statistics
from pathlib import Path

import _common as C  # noqa: E402  (adds the repo root to sys.path)
from bench_calibration import _trial  # noqa: E402

OUT = C.BENCH_OUT / "stream_scale"
LEVELS = (("fc", (1024,)), ("pooled", (256, 7, 7)))


def _store_bytes(path: Path) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def _build(path: Path, images: int) -> Path:
    from cache_schema import open_store
    from extract.synth_store import SynthStoreConfig, synth_store

    try:
        if open_store(path).is_complete and open_store(path).split("train").num_images == images:
            return path
    except Exception:  # noqa: BLE001 - absent or half-written: build it again
        pass
    report = synth_store(str(path), SynthStoreConfig(images=images, levels=LEVELS), overwrite=path.exists())
    print(f"built {path}: {report.images} images, {report.stored_bytes / 2**30:.2f} GiB in {report.seconds:.0f} s "
          f"({report.stored_bytes / 2**20 / report.seconds:.0f} MiB/s)", flush=True)
    return path


def _drop_page_cache(path: Path) -> None:
    """Evict the store's files from the page cache, so the next reads go to the disk."""
    for d, _, files in os.walk(path):
        for f in files:
            fd = os.open(os.path.join(d, f), os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def _ram_bytes() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--big-images", type=int, default=None)
    ap.add_argument("--small-images", type=int, default=400)
    ap.add_argument("--heads", default="3fc_ft,lastfc")
    ap.add_argument("--steps", type=int, default=None, help="steps per trial (default: 40 for 3fc_ft, 300 for lastfc)")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    small = _build(OUT / "small.zarr", args.small_images)
    per_image = _store_bytes(small) / args.small_images
    big_images = args.big_images or int(1.1 * _ram_bytes() / per_image) + 1
    big = _build(OUT / "big.zarr", big_images)
    big_bytes, ram = _store_bytes(big), _ram_bytes()
    lines = []
    for head in args.heads.split(","):
        steps = args.steps or (40 if head.startswith("3fc") else 300)
        mem, stream = [], []
        for r in range(args.repeats):
            order = ("never", "always") if r % 2 == 0 else ("always", "never")
            for mode in order:
                if mode == "always":
                    _drop_page_cache(big)
                    stream.append(_trial(big, head, steps, "always", OUT / f"run_{head}_stream"))
                else:
                    mem.append(_trial(small, head, steps, "never", OUT / f"run_{head}_mem"))
        ratios = [s["steps_per_s"] / m["steps_per_s"] for m, s in zip(mem, stream)]
        rows = [[name, f"{statistics.median(t['steps_per_s'] for t in ts):.2f}",
                 f"{statistics.median(t['rois_per_step'] for t in ts):.0f}",
                 f"{statistics.median(t['setup_s'] for t in ts):.1f} s", f"{max(t['peak_rss_mib'] for t in ts):,.0f}"]
                for name, ts in ((f"in memory ({args.small_images} images)", mem), (f"streaming ({big_images:,} images)", stream))]
        lines += [f"\n#### {head} ({steps} steps per trial)\n",
                  C.table(["mode", "steps/s", "RoIs/step", "set-up", "peak RSS MiB"], rows),
                  f"\n- streaming / in-memory steps/s: **{statistics.median(ratios):.3f}** (per pair: "
                  f"{', '.join(f'{x:.3f}' for x in ratios)}; target >= 0.8)"]
    text = C.header("P2 at scale — streaming from a store larger than RAM vs in memory", extra={
        "stores": f"`cache synth` (1,203 classes, fc 1024 + pooled 256x7x7, 16 bg RoIs/image): big {big_images:,} "
                  f"images = {big_bytes / 2**30:.1f} GiB on disk vs {ram / 2**30:.1f} GiB RAM; small {args.small_images}",
        "what": "`train_from_store` stream=always (big, page cache dropped first) vs stream=never (small), bi-level, "
                "loss ce, seed 0, 1 torch thread, fresh subprocess each; streaming prefetches 2 batches on one thread",
    }) + "\n".join(lines)
    C.emit(text, C.BENCH_OUT / "bench_stream_scale.md")


if __name__ == "__main__":
    main()

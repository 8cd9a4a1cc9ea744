"""P4: cached evaluation vs full inference + evaluation of the same injected head.

    python bench/bench_eval.py [--store runs/demo/cache.zarr] [--quick] [--head RUN_DIR]
                               [--combine sel] [--T 300] [--limit N] [--repeats 2]

The head (``--head``, else one trained here: bi-level 3fc_ft, ``--head-steps`` steps, seed 0) is
injected into the store's detector (``serve.inject``, ``--combine``/``--T``). Then, side by side
(alternating, order rotated, 1 torch thread), on the same val images:

- ``cached``: ``heads.pipeline.evaluate_from_store`` as ``heads eval`` runs it (``auto``: the
  array evaluator with the store's mask overlaps when the store has them);
- ``cached-api``: the same with ``evaluator="lvis-api"`` (masks pasted, official LVIS API);
- ``full``: ``serve.evaluate.evaluate_detector``, the injected detector over the val images,
  official LVIS API.

With ``--limit N`` only the first N val images are used (the cached side then runs the same
library steps on them, since ``evaluate_from_store`` has no limit). One more instrumented pass of
the cached and full pipelines splits their time into stages.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("ROICACHE_THREADS", "1")  # evaluate_detector sets torch threads from this

import _common as C  # noqa: E402  (adds the repo root to sys.path)
import numpy as np  # noqa: E402
import torch  # noqa: E402

from cache_schema import open_store  # noqa: E402
from cache_schema.runtime import pick_device  # noqa: E402
from extract.datasets.lvis_json import load_annotations, resolve_split  # noqa: E402
from heads.combine import Combination  # noqa: E402
from heads.config import load_config  # noqa: E402
from heads.evaluation import evaluate_lvis, load_gt  # noqa: E402
from heads.evaluation.cached import detect_cached_arrays  # noqa: E402
from heads.evaluation.fast_inputs import det_arrays, evaluate_fast, gt_arrays, store_slots  # noqa: E402
from heads.pipeline import EVAL_COLUMNS, evaluate_from_store, load_head_for, score_rois, train_from_store  # noqa: E402
from serve.dual import DualHeadDetector  # noqa: E402
from serve.evaluate import evaluate_detector, image_count, run_inference  # noqa: E402
from serve.inject import inject  # noqa: E402


def _head(store: Path, head: Path | None, steps: int) -> Path:
    if head is not None:
        return head
    out = C.BENCH_OUT / "eval" / f"head_3fc_ft_{steps}"
    if not (out / "metrics.json").is_file():
        cfg = load_config(None, {"sampler.name": "bilevel", "head.name": "3fc_ft", "run.threads": 1, "run.seed": 0,
                                 "schedule.max_steps": steps, "eval.interval": 0, "run.checkpoint_interval": steps})
        train_from_store(cache=str(store), config=cfg, out_dir=out, progress=False)
    return out


def cached_steps(store_path: Path, head: Path, combine: str, T: float, limit: int | None,
                 stages: dict[str, float] | None = None):
    """``evaluate_from_store``'s fast-evaluator steps on the first ``limit`` val images (all when
    None), no files written; seconds per step into ``stages``."""
    stages = {} if stages is None else stages
    t = time.perf_counter()
    store = open_store(store_path)
    loaded = load_head_for(store, head)
    split = store.split("val")
    images = None if limit is None else np.arange(min(limit, split.num_images))
    cols = EVAL_COLUMNS + ("mask_area", "mask_inter")
    val = split.load(level=loaded.meta.get("level", loaded.spec.level), columns=cols, images=images)
    ids = [int(split.image_ids[p]) for p in val.images.numpy()]
    stages["read val RoIs (logits, boxes, mask overlaps) from the store"] = time.perf_counter() - t
    t = time.perf_counter()
    gt_table = split.gt()
    gt = gt_arrays(load_gt(Path(store.meta.dataset.splits["val"].annotation_path)), ids,
                   slots=store_slots(gt_table.image, gt_table.ann_id))
    stages["load val json, ground-truth arrays (GT RLE areas)"] = time.perf_counter() - t
    t = time.perf_counter()
    probs = score_rois(loaded, val.features, device=pick_device("cpu"))
    stages["score RoIs with the new head"] = time.perf_counter() - t
    t = time.perf_counter()
    dets = detect_cached_arrays(roiset=val, class_info=store.classes, cal_probs=probs,
                                combination=Combination(rule=combine, T=T), image_ids=split.image_ids,
                                image_sizes=split.image_sizes,
                                progress=False)
    stages["combine + detection assembly (NMS, top 300)"] = time.perf_counter() - t
    t = time.perf_counter()
    arrays = det_arrays(dets=dets, image_ids=ids, category_ids=store.classes.category_ids,
                        row_offsets=val.image_offsets[:-1].tolist(), mask_area=val.mask_area, mask_inter=val.mask_inter)
    metrics = evaluate_fast(gt=gt, dets=arrays)
    stages["array LVIS evaluation (segm + bbox)"] = time.perf_counter() - t
    return metrics


def breakdown(store_path: Path, ckpt: Path, head: Path, combine: str, T: float, limit: int | None) -> dict:
    """One instrumented pass of each pipeline: seconds per stage."""
    out: dict[str, dict[str, float]] = {"cached": {}, "full": {}}
    store = open_store(store_path)
    gt_json = Path(store.meta.dataset.splits["val"].annotation_path)
    cached_steps(store_path, head, combine, T, limit, out["cached"])
    json_path, root = resolve_split(Path(gt_json).parent, "val")
    annset = load_annotations(json_path, root)
    t = time.perf_counter()
    det = DualHeadDetector(path=ckpt, device=pick_device("cpu"))
    combination = det.with_default(rule=combine, T=T)
    out["full"]["load detector"] = time.perf_counter() - t
    t = time.perf_counter()
    results = run_inference(det, annset, combinations=(combination,), batch_size=4, progress=False, limit=limit)[0]
    out["full"]["inference + both heads + combine + detection assembly (NMS, masks of detected RoIs, RLE)"] = \
        time.perf_counter() - t
    n = image_count(annset, limit)
    t = time.perf_counter()
    evaluate_lvis(gt_json=load_gt(json_path), results=results, image_ids=[im.id for im in annset.images[:n]])
    out["full"]["LVIS API (segm + bbox)"] = time.perf_counter() - t
    return out


def _evaluator_note(metrics) -> str:
    notes = [n for n in getattr(metrics, "notes", ()) if n.startswith("evaluator:")]
    return notes[0][len("evaluator: "):] if notes else "fast (array evaluation)"


def _same(a, b) -> bool:
    return all(getattr(a, k).summary == getattr(b, k).summary and getattr(a, k).per_category == getattr(b, k).per_category
               for k in ("segm", "bbox"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--store", type=Path, default=C.DEMO_STORE)
    ap.add_argument("--head", type=Path, default=None)
    ap.add_argument("--head-steps", type=int, default=1000)
    ap.add_argument("--combine", default="sel")
    ap.add_argument("--T", type=float, default=300.0)
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--no-warmup", action="store_true", help="Skip the untimed first run of each pipeline.")
    ap.add_argument("--out", type=Path, default=C.BENCH_OUT / "bench_eval.md")
    a = ap.parse_args()
    torch.set_num_threads(1)
    repeats = 1 if a.quick else a.repeats
    store = open_store(a.store)
    data = Path(store.meta.dataset.splits["val"].annotation_path).parent
    head = _head(a.store, a.head, 30 if a.quick else a.head_steps)
    work = C.BENCH_OUT / "eval"
    injected = inject(ckpt=Path(store.meta.detector.checkpoint_path), head=head,
                      combination=Combination(rule=a.combine, T=a.T), out=work / f"detector_{a.combine}.pt")
    got: dict[str, object] = {}

    def cached() -> None:
        if a.limit is None:
            got["cached"] = evaluate_from_store(cache=str(a.store), head=head,
                                                combinations=(Combination(rule=a.combine, T=a.T),),
                                                out_dir=None, progress=False).rows[a.combine]
        else:
            got["cached"] = cached_steps(a.store, head, a.combine, a.T, a.limit)

    def cached_api() -> None:
        if a.limit is None:
            got["cached-api"] = evaluate_from_store(cache=str(a.store), head=head,
                                                    combinations=(Combination(rule=a.combine, T=a.T),),
                                                    out_dir=None, progress=False, evaluator="lvis-api").rows[a.combine]

    def full() -> None:
        run = evaluate_detector(ckpt=injected, data=data, out_dir=work / "full", combines=(a.combine,), T=a.T,
                                progress=False, limit=a.limit, batch_size=4)
        got["full"] = run.rows[a.combine]

    runs = {"cached": cached, "full": full} | ({"cached-api": cached_api} if a.limit is None else {})
    warmup = not (a.no_warmup or a.quick)
    t = C.interleave(runs, repeats=repeats, warmup=warmup)
    stages = breakdown(a.store, injected, head, a.combine, a.T, a.limit)
    n = store.split("val").num_images if a.limit is None else min(a.limit, store.split("val").num_images)
    ratio = t.median_ratio("full", "cached")
    hdr = C.header("P4 — cached vs full evaluation", extra={
        "what": f"head {head} injected with combine={a.combine}, T={a.T:g}; {n} val images "
                f"({'all' if a.limit is None else f'first {a.limit}'}); 1 torch thread; segm + bbox AP, max_dets 300; "
                f"cached evaluator: {_evaluator_note(got['cached'])}",
        "repeats": f"{repeats} interleaved (order rotated), {'after one untimed run of each' if warmup else 'no warm-up'}; "
                   f"{C.load_line(t)}"})
    body = C.table(["pipeline", "median wall", "per image"], [
        ["cached (`evaluate_from_store`)" if a.limit is None else "cached (its steps on the subset)",
         C.fmt_s(t.median("cached")), f"{1000 * t.median('cached') / n:.0f} ms"],
        ["full (`evaluate_detector`)", C.fmt_s(t.median("full")), f"{1000 * t.median('full') / n:.0f} ms"]]
        + ([["cached, `evaluator=\"lvis-api\"`", C.fmt_s(t.median("cached-api")),
             f"{1000 * t.median('cached-api') / n:.0f} ms"]] if "cached-api" in got else []))
    lines = [f"- full / cached wall time: **{ratio:.1f}x** (per repeat: "
             + ", ".join(f"{x:.1f}" for x in t.ratios("full", "cached")) + "; target >= 20x)"]
    if "cached-api" in got:
        lines.append(f"- full / cached with the LVIS API: {t.median_ratio('full', 'cached-api'):.1f}x; "
                     f"array evaluator vs LVIS API on the same cached detections: "
                     f"{'bit-identical' if _same(got['cached'], got['cached-api']) else 'DIFFERENT'} metrics")
    rows = []
    for name in ("AP", "APr", "APc", "APf", "AP1", "AP2", "AP3", "AP4"):
        for iou in ("segm", "bbox"):
            x, y = getattr(got["cached"], iou), getattr(got["full"], iou)
            if x is None or y is None or name not in x.summary:
                continue
            if x[name] < 0 and y[name] < 0:  # LVIS API's -1: no category with ground truth in this group
                continue
            rows.append([f"{iou} {name}", f"{100 * x[name]:.2f}", f"{100 * y[name]:.2f}", f"{100 * (x[name] - y[name]):+.3f}"])
    stage_rows = [[p, s, C.fmt_s(v)] for p in ("cached", "full") for s, v in stages[p].items()]
    text = (f"{hdr}\n\n{body}\n\n" + "\n".join(lines) + "\n\n"
            + C.table(["metric", "cached", "full", "cached − full (points)"], rows) + "\n\n"
            + "Stage times of one more instrumented pass of each (same images):\n\n"
            + C.table(["pipeline", "stage", "seconds"], stage_rows))
    C.emit(text, a.out)
    print(f"[bench] load average at end {os.getloadavg()[0]:.2f}", file=sys.stderr)


if __name__ == "__main__":
    main()

"""Where a detector training step goes, and what the `embedded` preset's changes buy.

    python bench/bench_detector_train.py [--data runs/demo/data] [--steps 6] [--repeats 2] [--profile]

One process, 1 torch thread, batch 2 (one rank of the 2-process DDP layout), the same images for
every variant. Variants differ from the default architecture in one setting each, then all of the
embedded preset's changes together; each is built with the same seed and trained ``--steps`` steps
per repeat, variants interleaved with the order rotated (the machine is shared), after one untimed
step each. Printed: median CPU s/step (the process's CPU time; with one thread it does not count
the time another process holds the core, so it stays comparable on a busy machine), median wall
s/step, and the CPU ratio to the default. ``--profile`` adds a torch.profiler
table (top ops by total CPU time) of the default variant: the breakdown docs/detector.md quotes.
"""

from __future__ import annotations

import argparse
import statistics
from dataclasses import replace

import _common as C  # noqa: E402  (adds the repo root to sys.path)


def _variants() -> dict[str, dict]:
    from extract.detectors.presets import get_preset

    return {
        "default": {},
        "box_batch 128->64": {"box_batch_size_per_image": 64},
        "rpn proposals 1000/500->600/300": {"rpn_pre_nms_top_n_train": 600, "rpn_post_nms_top_n_train": 300},
        "norm group->batch": {"norm": "batch"},
        "embedded preset": dict(get_preset("embedded").arch_changes),
    }


def _batches(data, steps: int, repeats: int):
    import torch

    from extract.datasets.lvis_json import load_annotations
    from extract.datasets.torch_dataset import DetectionDataset
    from extract.detectors.train import _to_torchvision_target

    ds = DetectionDataset(load_annotations(data / "train.json"), with_masks=True)
    out = []
    for i in range((steps * repeats + 1)):
        images, targets = [], []
        for j in (2 * i, 2 * i + 1):
            image, target = ds[j]
            images.append(torch.as_tensor(image))
            targets.append(_to_torchvision_target(target))
        out.append((images, targets))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(C.DEMO_DATA))
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    import time
    from pathlib import Path

    import torch

    from extract.detectors.arch import DetectorArch
    from extract.detectors.model import build_detector

    torch.set_num_threads(1)
    batches = _batches(Path(args.data), args.steps, args.repeats)
    models = {}
    for name, changes in _variants().items():
        torch.manual_seed(0)
        model = build_detector(replace(DetectorArch(num_classes=200), **changes)).train()
        models[name] = (model, torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9))

    def step(name: str, batch) -> tuple[float, float]:
        model, opt = models[name]
        t0, c0 = time.perf_counter(), time.process_time()
        loss = sum(model(*batch).values())
        opt.zero_grad()
        loss.backward()
        opt.step()
        return time.process_time() - c0, time.perf_counter() - t0

    for name in models:  # untimed: allocator, lazy init
        step(name, batches[0])
    per_step: dict[str, list[tuple[float, float]]] = {n: [] for n in models}
    names, load = list(models), []
    import os

    for r in range(args.repeats):
        load.append(os.getloadavg()[0])
        for name in names[r % len(names):] + names[:r % len(names)]:
            chunk = batches[1 + r * args.steps: 1 + (r + 1) * args.steps]
            per_step[name] += [step(name, b) for b in chunk]
    def cpu(n: str) -> float:
        return statistics.median(c for c, _ in per_step[n])

    rows = [[n, cpu(n), statistics.median(w for _, w in v), cpu(n) / cpu("default")] for n, v in per_step.items()]
    text = [C.header("Detector training step (1 process, 1 thread, batch 2, 200 classes, 256 px)",
                     extra={"repeats": f"{args.repeats} x {args.steps} steps per variant, interleaved",
                            "load": f"1-min load average during repeats {min(load):.2f}-{max(load):.2f}"}),
            "", C.table(["variant", "CPU s/step", "wall s/step", "CPU / default"], rows)]
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for b in batches[1: 1 + args.steps]:
                step("default", b)
        text += ["", "```", prof.key_averages().table(sort_by="cpu_time_total", row_limit=20), "```"]
    C.emit("\n".join(text), Path(args.out) if args.out else None)


if __name__ == "__main__":
    main()

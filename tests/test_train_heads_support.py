"""Tiny real data for the heads tests: a long-tailed toy train split as RoiSet + ClassInfo.

Each image holds 1-3 annotated classes drawn from a long-tailed distribution; each annotation
yields 1-2 foreground RoIs of its class and each image a few background RoIs. Features are a
class prototype plus noise, so a head can actually learn them.
"""

from __future__ import annotations

import numpy as np
import torch

from cache_schema.records import ClassInfo, RoiSet


def make_class_info(*, image_classes: list[set[int]], num_classes: int, instance_count: np.ndarray | None = None,
                    frequency: tuple[str, ...] | None = None) -> ClassInfo:
    """ClassInfo whose CSR lists, for each class, the images (positions) that contain it."""
    lists = [[i for i, cs in enumerate(image_classes) if c in cs] for c in range(num_classes)]
    counts = np.array([len(x) for x in lists], dtype=np.int64)
    inst = counts.copy() if instance_count is None else np.asarray(instance_count, dtype=np.int64)
    freq = frequency or tuple("r" if n <= 10 else "c" if n <= 100 else "f" for n in counts)
    return ClassInfo(names=tuple(f"class{c}" for c in range(num_classes)),
                     category_ids=tuple(range(1, num_classes + 1)), frequency=freq, instance_count=inst,
                     image_count=counts, csr_indptr=np.concatenate(([0], np.cumsum(counts))).astype(np.int64),
                     csr_images=np.array([i for x in lists for i in x], dtype=np.int64))


def make_world(*, seed: int = 0, num_images: int = 40, num_classes: int = 6, feature_shape=(4, 2, 2),
               bg_per_image: int = 4, noise: float = 0.5) -> tuple[RoiSet, ClassInfo, torch.Tensor]:
    """Returns ``(train RoiSet with float16 features, ClassInfo, class prototypes [C+1, D])``."""
    rng = np.random.default_rng(seed)
    d = int(np.prod(feature_shape))
    protos = rng.normal(0, 2.0, size=(num_classes + 1, d))
    p = 1.0 / np.arange(1, num_classes + 1) ** 1.5
    p /= p.sum()
    image_classes, labels, offsets = [], [], [0]
    inst = np.zeros(num_classes, dtype=np.int64)
    for _ in range(num_images):
        k = int(rng.integers(1, 4))
        cs = set(int(c) for c in rng.choice(num_classes, size=k, p=p))
        image_classes.append(cs)
        rows = []
        for c in sorted(cs):
            n = int(rng.integers(1, 3))
            inst[c] += 1
            rows += [c] * n
        rows += [num_classes] * int(rng.integers(1, bg_per_image + 1))
        labels += rows
        offsets.append(offsets[-1] + len(rows))
    labels_t = torch.tensor(labels, dtype=torch.int64)
    feats = protos[labels] + rng.normal(0, noise, size=(len(labels), d))
    n = len(labels)
    roiset = RoiSet(labels=labels_t, ious=torch.where(labels_t < num_classes, 0.7, 0.1).float(),
                    image_index=torch.repeat_interleave(torch.arange(num_images), torch.tensor(np.diff(offsets))),
                    image_offsets=torch.tensor(offsets, dtype=torch.int64), images=torch.arange(num_images),
                    features=torch.tensor(feats, dtype=torch.float16).reshape(n, *feature_shape))
    info = make_class_info(image_classes=image_classes, num_classes=num_classes, instance_count=inst)
    return roiset, info, torch.tensor(protos, dtype=torch.float32)


def detector_state(*, in_features: int, hidden: int, num_classes: int, seed: int = 0) -> dict:
    """A made-up detector box head in the agreed format (cls rows [0..C-1, background])."""
    g = torch.Generator().manual_seed(seed)
    return {"fc6.weight": torch.randn(hidden, in_features, generator=g) * 0.1, "fc6.bias": torch.zeros(hidden),
            "fc7.weight": torch.randn(hidden, hidden, generator=g) * 0.1, "fc7.bias": torch.zeros(hidden),
            "cls.weight": torch.randn(num_classes + 1, hidden, generator=g) * 0.01,
            "cls.bias": torch.zeros(num_classes + 1)}

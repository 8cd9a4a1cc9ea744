"""Online calibration: the SimCal recipe run the slow way, through the frozen detector.

Same sampler, head, loss, schedule and seed as ``heads train``; the only difference is where a
step's RoI features come from. Here every step runs the detector on the images the sampler drew
(backbone, RPN, RoIAlign, shared fcs), exactly what SimCal's calibration does; ``heads train``
reads the same RoIs from the store. The store still supplies the RoI *index* (which image holds
which labelled RoIs), so both runs draw identical batches and differ only by the store's float16
rounding of the features.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from cache_schema import Store, open_store
from cache_schema.errors import ConfigError, StoreMismatchError
from cache_schema.head_init import read_head_weights
from cache_schema.records import RoiSet
from cache_schema.runtime import configure_threads, pick_device, sha256_file
from extract.datasets.images import read_rgb
from extract.detectors.backends import load_adapter
from extract.detectors.base import DetectorAdapter
from extract.matching import match_rois, stored_rows
from heads.config import TrainConfig
from heads.models import level_for_head
from heads.pipeline import FROM_DETECTOR, store_identity
from heads.sources import StreamingRoiSource
from heads.train import TrainResult, train_head


class DetectorFetch:
    """``positions -> RoiSet``: runs the frozen detector on those train images, now, and keeps
    their RoIs as the store holds them (the same background subsample, the same row order)."""

    def __init__(self, *, adapter: DetectorAdapter, store: Store, level: str) -> None:
        self.adapter = adapter
        self.level = level
        split = store.split("train")
        self.settings = store.meta.extraction
        self.max_proposals = self.settings.rois_per_image
        self.sort_by_label = split.row_order == "label"
        source = store.meta.dataset.splits["train"]
        self.image_root = Path(source.image_root)
        self.file_names = split.file_names
        gt = split.gt()
        order = np.argsort(gt.image, kind="stable")
        self.gt_rows, self.gt_image = order, gt.image[order]
        self.gt_boxes, self.gt_labels = gt.boxes, gt.labels
        self.seconds_in_detector = 0.0

    def _stored(self, out, position: int, rows: np.ndarray) -> np.ndarray:
        """The detector's RoI features of one image, reduced and ordered as extraction stored them."""
        labels = match_rois(rois=out.boxes, gt_boxes=self.gt_boxes[rows], gt_labels=self.gt_labels[rows], gt_rows=rows,
                            num_classes=self.adapter.num_classes, fg_iou=self.settings.fg_iou).labels
        keep = stored_rows(labels, num_classes=self.adapter.num_classes, background=self.settings.train_bg_per_image,
                           seed=self.settings.seed, image=position, sort_by_label=self.sort_by_label)
        return out.features[self.level][keep]

    def __call__(self, positions: np.ndarray) -> RoiSet:
        positions = np.asarray(positions, dtype=np.int64)
        lo = np.searchsorted(self.gt_image, positions, side="left")
        hi = np.searchsorted(self.gt_image, positions, side="right")
        rows = [self.gt_rows[a:b] for a, b in zip(lo, hi)]
        gts = [self.gt_boxes[r] for r in rows]
        t0 = time.perf_counter()
        outs = self.adapter.run([read_rgb(self.image_root / self.file_names[int(p)]) for p in positions], gt_boxes=gts, levels=(self.level,),
                                max_proposals=self.max_proposals, with_masks=False)
        self.seconds_in_detector += time.perf_counter() - t0
        kept = [self._stored(o, int(p), r) for o, p, r in zip(outs, positions, rows)]
        counts = np.array([len(k) for k in kept], dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(counts)])
        feats = torch.from_numpy(np.concatenate(kept)).float()
        n = int(offsets[-1])
        # Labels come from the store's index (the sampler already chose rows by them); these
        # placeholder columns only carry the row grouping the source checks.
        return RoiSet(labels=torch.zeros(n, dtype=torch.int64), ious=torch.zeros(n),
                      image_index=torch.from_numpy(np.repeat(positions, counts)),
                      image_offsets=torch.from_numpy(offsets), images=torch.from_numpy(positions), features=feats)


def calibrate_online(*, ckpt: Path, cache: str, config: TrainConfig, out_dir: Path, progress: bool = True,
                     device: str | None = None, detector_config: str | None = None) -> TrainResult:
    """Train the head ``config`` names with features computed by the detector at every step
    (``detector_config``: an mmdet config, as for ``extract --config``)."""
    configure_threads(config.run.threads or None)
    store = open_store(cache)
    if sha256_file(ckpt) != store.meta.detector.checkpoint_sha256:
        raise StoreMismatchError(f"store {store.path} was extracted with another checkpoint than {ckpt}; "
                                 "use the detector the store was built from")
    if config.head.stage != 0:
        raise ConfigError(f"online calibration runs stage-0 heads only; head.stage = {config.head.stage} needs the "
                          "cached stage RoIs — train it from the store with `heads train --stage`")
    level = level_for_head(config.head.name)
    adapter = load_adapter(ckpt, device=pick_device(device or config.run.device), config=detector_config)
    fetch = DetectorFetch(adapter=adapter, store=store, level=level)
    split = store.split("train")
    source = StreamingRoiSource(index_roiset=split.load(level=None), fetch_images=fetch,
                                num_classes=store.meta.num_classes, feature_shape=tuple(adapter.levels[level]))
    init_state = read_head_weights(store) if config.head.name in FROM_DETECTOR else None
    meta = {"store": store_identity(store), "store_path": store.path, "level": level, "online": True,
            "instance_count": [int(v) for v in store.classes.instance_count]}
    result = train_head(config=config, source=source, class_info=store.classes, init_state=init_state,
                        out_dir=out_dir, val=None, device=device, progress=progress,
                        init_from=store.meta.detector.checkpoint_sha256, meta=meta)
    (Path(out_dir) / "online_timing.txt").write_text(f"seconds_in_detector {fetch.seconds_in_detector:.3f}\n")
    return result

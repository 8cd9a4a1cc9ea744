"""Tiny real mmdetection models and images for tests (helpers, not tests).

The models come from mmdet's OWN bundled configs (``mmdet/.mim/configs``), shrunk so that one
CPU forward takes a fraction of a second: ResNet-18 backbone, 32-channel FPN, 64-wide shared
fcs, a handful of classes, a small test scale and small proposal budgets. Weights are a seeded
random init (no download), with the score layers perturbed so that objectness and class scores
actually vary between boxes. Checkpoints are written in mmengine's layout, as ``Runner`` does.

mmdet, mmengine and mmcv are imported lazily, so this module imports without them; callers
skip with ``pytest.importorskip("mmdet")``. Building a model needs mmcv's ops, so
:func:`save_mmdet_checkpoint` installs roicache's stand-in ops first when mmcv-lite is all there is.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

if TYPE_CHECKING:
    from mmengine import Config

#: kind -> config file relative to mmdet's bundled ``configs`` directory.
MMDET_CONFIGS: dict[str, str] = {
    "mask_rcnn": "lvis/mask-rcnn_r50_fpn_sample1e-3_ms-1x_lvis-v1.py",
    "faster_rcnn": "faster_rcnn/faster-rcnn_r50_fpn_1x_coco.py",
    "cascade_mask_rcnn": "cascade_rcnn/cascade-mask-rcnn_r50_fpn_1x_coco.py",
    "htc": "htc/htc-without-semantic_r50_fpn_1x_coco.py",
    "retinanet": "retinanet/retinanet_r50_fpn_1x_coco.py",
}

FPN_CHANNELS = 32  # FPN width; every RPN/RoI/dense head input follows it
FC_CHANNELS = 64  # shared fc width of the box heads
TEST_SCALE = (128, 96)  # test-time Resize scale (long side, short side), keep_ratio
_R18_CHANNELS = [64, 128, 256, 512]  # ResNet-18 stage outputs (BasicBlock, expansion 1)
_HEAD_WIDTH_KEYS = ("in_channels", "feat_channels", "out_channels", "conv_out_channels")
# Score layers (perturbed strongly: scores must differ) and box-delta layers (gently: boxes
# should move a little, not fly off the image), by module name suffix across mmdet heads.
_SCORE_LAYERS = ("fc_cls", "rpn_cls", "retina_cls", "conv_logits")
_DELTA_LAYERS = ("fc_reg", "rpn_reg", "retina_reg")
_TOWERS = ("cls_convs", "reg_convs")  # RetinaNet's stacked head convs (``*.cls_convs.N.conv``)


def mmdet_config_dir() -> Path:
    """mmdet's bundled ``configs`` directory (inside the installed package)."""
    import mmdet

    return Path(mmdet.__file__).parent / ".mim" / "configs"


def _dicts(node: Any) -> Iterator[Any]:
    """Every dict-like node of a config tree (ConfigDict / dict), depth first, lists included."""
    if isinstance(node, dict):
        yield node
        for value in node.values():
            yield from _dicts(value)
    elif isinstance(node, (list, tuple)):
        for value in node:
            yield from _dicts(value)


def _innermost_datasets(dataset_cfg: Any) -> Iterator[Any]:
    """The real dataset configs under dataset wrappers (ClassBalancedDataset, ConcatDataset)."""
    if "dataset" in dataset_cfg:
        yield from _innermost_datasets(dataset_cfg.dataset)
    elif "datasets" in dataset_cfg:
        for sub in dataset_cfg.datasets:
            yield from _innermost_datasets(sub)
    else:
        yield dataset_cfg


def tiny_mmdet_config(kind: str = "mask_rcnn", num_classes: int = 5,
                      class_names: Sequence[str] | None = None) -> Config:
    """A shrunk copy of one of mmdet's bundled configs.

    Args:
        kind: ``"mask_rcnn"`` (LVIS v1 Mask R-CNN), ``"faster_rcnn"``, ``"cascade_mask_rcnn"``,
            ``"htc"`` (without the semantic branch, as on LVIS) or ``"retinanet"`` (all R50-FPN configs in mmdet, turned into R18 ones).
        num_classes: set in every bbox/mask/dense head (each cascade stage included).
        class_names: the datasets' ``metainfo.classes``; default ``class_0 .. class_{C-1}``.

    Returns:
        ``mmengine.Config``; ``cfg.model`` builds with ``mmdet.registry.MODELS``.
    """
    from mmengine import Config

    if kind not in MMDET_CONFIGS:
        raise ValueError(f"unknown kind {kind!r}; choose one of {sorted(MMDET_CONFIGS)}")
    names = tuple(class_names) if class_names is not None else tuple(
        f"class_{i}" for i in range(num_classes))
    if len(names) != num_classes:
        raise ValueError(f"{len(names)} class names for num_classes={num_classes}")
    palette = [tuple(int(c) for c in rng_colour) for rng_colour in
               np.random.default_rng(num_classes).integers(0, 256, size=(num_classes, 3))]
    cfg = Config.fromfile(str(mmdet_config_dir() / MMDET_CONFIGS[kind]))
    model = cfg.model

    model.backbone.update(depth=18, init_cfg=None)
    model.neck.update(in_channels=list(_R18_CHANNELS), out_channels=FPN_CHANNELS)
    for section in ("rpn_head", "roi_head", "bbox_head"):  # bbox_head: one-stage (RetinaNet)
        for node in _dicts(model.get(section)):
            for key in _HEAD_WIDTH_KEYS:
                if node.get(key) == 256:  # the R50-FPN width everywhere in these configs
                    node[key] = FPN_CHANNELS
            if "fc_out_channels" in node:
                node["fc_out_channels"] = FC_CHANNELS
            if "num_classes" in node:
                node["num_classes"] = num_classes
    for node in _dicts(model):  # no pretrained weights anywhere: tests never download
        if isinstance(node.get("init_cfg"), dict) and node["init_cfg"].get("type") == "Pretrained":
            node["init_cfg"] = None

    test_cfg = model.test_cfg
    if "rpn" in test_cfg:  # two-stage
        test_cfg.rpn.update(nms_pre=100, max_per_img=50)
        test_cfg.rcnn.update(max_per_img=50)
    else:  # one-stage: the dense head's own budget
        test_cfg.update(nms_pre=100, max_per_img=50)

    for loader in ("train_dataloader", "val_dataloader", "test_dataloader"):
        if cfg.get(loader) is None:
            continue
        for dataset in _innermost_datasets(cfg[loader].dataset):
            # A palette too: init_detector otherwise warns that it falls back to random colours.
            dataset["metainfo"] = dict(classes=names, palette=palette)
            for step in dataset.get("pipeline", []):
                if step.get("type") == "Resize" and loader != "train_dataloader":
                    step["scale"] = TEST_SCALE
    for step in cfg.get("test_pipeline", []):
        if step.get("type") == "Resize":
            step["scale"] = TEST_SCALE
    return cfg


def _perturb_heads(model: torch.nn.Module, seed: int) -> None:
    """Make a random-init detector's scores and proposals differ from box to box.

    mmdet initialises its head convs and classifiers with std 0.01 (zero bias), so on random
    features the RPN / RetinaNet towers output almost nothing and every box gets nearly the
    same logits: ties everywhere, proposals in arbitrary order. So: head towers get a He init
    (activations keep their scale), score layers get noise at the fan-in scale (logits differ
    by O(1)), box-delta layers a tenth of that (boxes move a little, not off the image).
    """
    generator = torch.Generator().manual_seed(seed + 7919)  # independent of the init stream

    def noise(shape: torch.Size, std: float) -> torch.Tensor:
        return torch.randn(shape, generator=generator) * std

    with torch.no_grad():
        for name, module in model.named_modules():
            parts = name.split(".")
            weight = getattr(module, "weight", None)
            if not isinstance(weight, torch.Tensor) or weight.dim() < 2:
                continue  # norms and containers
            fan_in = weight[0].numel()
            tower = parts[-1] == "rpn_conv" or (len(parts) > 2 and parts[-3] in _TOWERS)
            if tower:
                weight.copy_(noise(weight.shape, (2.0 / fan_in) ** 0.5))
            elif parts[-1] in _SCORE_LAYERS + _DELTA_LAYERS:
                gain = 3.0 if parts[-1] in _SCORE_LAYERS else 0.3
                weight.add_(noise(weight.shape, gain / fan_in ** 0.5))
                if module.bias is not None:
                    if parts[-1] in _SCORE_LAYERS:
                        # RetinaNet starts its sigmoid classifier at a 1% prior (bias -4.6),
                        # which keeps every random-feature score under the 0.05 threshold.
                        module.bias.zero_()
                    module.bias.add_(noise(module.bias.shape, gain * 0.2))


def save_mmdet_checkpoint(path: str | Path, cfg: Config, *, seed: int = 0,
                          classes: tuple[str, ...], with_config_text: bool = True) -> Path:
    """Build ``cfg.model``, init it from ``seed`` and save it as an mmengine checkpoint.

    The file mirrors what ``mmengine.runner.Runner.save_checkpoint`` writes (minus optimizer,
    scheduler and message-hub state, which inference never reads): ``{"meta": {...,
    "dataset_meta": {"classes": classes}, "cfg": pretty config text}, "state_dict": {...}}``.

    Args:
        path: output ``.pth`` file (parent directories are created).
        cfg: an ``mmengine.Config`` such as :func:`tiny_mmdet_config` returns.
        seed: seeds the weight init and the head perturbation; same seed, same weights.
        classes: class names stored as ``meta.dataset_meta.classes`` (not checked against
            ``num_classes``, so tests can also write inconsistent checkpoints).
        with_config_text: store ``meta.cfg``; ``False`` mimics checkpoints without a config.

    Returns:
        ``path`` as a :class:`Path`.
    """
    import mmdet
    import mmengine
    from mmengine.logging import MMLogger
    from mmdet.utils import register_all_modules

    from extract.detectors.mmcv_ops import install_standin_ops

    install_standin_ops()
    register_all_modules()
    from mmdet.registry import MODELS

    # init_weights() logs one INFO record per parameter (hundreds of lines) on mmengine's
    # current logger; tests only want the weights. fork_rng: seeding leaves callers' RNG alone.
    logger = MMLogger.get_current_instance()
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = MODELS.build(cfg.model)
            model.init_weights()
    finally:
        logger.setLevel(level)
    _perturb_heads(model, seed)
    meta: dict[str, Any] = {
        "dataset_meta": {"classes": tuple(classes)},
        "seed": seed,
        "experiment_name": "roicache_tiny_mmdet",
        "mmengine_version": mmengine.__version__,
        "mmdet_version": mmdet.__version__,
    }
    if with_config_text:
        meta["cfg"] = cfg.pretty_text
    state_dict = {key: value.detach().cpu() for key, value in model.state_dict().items()}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"meta": meta, "state_dict": state_dict}, path)
    return path


def tiny_images(dir: str | Path, n: int = 4, seed: int = 0,
                size: tuple[int, int] = (96, 128), suffix: str = ".jpg") -> list[Path]:
    """Write ``n`` small structured RGB images: coloured rectangles and ellipses on noise.

    Args:
        dir: output directory (created). n: number of images. seed: content seed.
        size: ``(height, width)`` in pixels. suffix: ``".jpg"`` or ``".png"`` (lossless).

    Returns:
        The image paths ``img_000<suffix>``, ... in order.
    """
    from PIL import Image, ImageDraw

    out = Path(dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    height, width = size
    paths = []
    for index in range(n):
        # Smooth-ish noisy background (low-res noise upsampled) so features are not constant.
        base = rng.integers(40, 200, size=(height // 8 + 1, width // 8 + 1, 3), dtype=np.uint8)
        background = np.kron(base, np.ones((8, 8, 1), dtype=np.uint8))[:height, :width]
        noise = rng.normal(0, 12, size=(height, width, 3))
        image = Image.fromarray(np.clip(background + noise, 0, 255).astype(np.uint8))
        draw = ImageDraw.Draw(image)
        for shape in range(int(rng.integers(2, 5))):
            x1, y1 = int(rng.integers(0, width * 2 // 3)), int(rng.integers(0, height * 2 // 3))
            x2 = min(width - 1, x1 + int(rng.integers(12, width // 2)))
            y2 = min(height - 1, y1 + int(rng.integers(12, height // 2)))
            colour = tuple(int(c) for c in rng.integers(0, 256, size=3))
            (draw.rectangle if shape % 2 == 0 else draw.ellipse)([x1, y1, x2, y2], fill=colour)
        path = out / f"img_{index:03d}{suffix}"
        image.save(path)
        paths.append(path)
    return paths


def class_names_of(data: str | Path) -> tuple[str, ...]:
    """Class names of a dataset directory's ``val.json``, in category-id order (what a checkpoint
    trained on it records)."""
    import json

    cats = json.loads((Path(data) / "val.json").read_text())["categories"]
    return tuple(c["name"] for c in sorted(cats, key=lambda c: c["id"]))


def val_image_paths(data: str | Path, n: int) -> list[Path]:
    """The first ``n`` val image files of a dataset directory."""
    import json

    val = json.loads((Path(data) / "val.json").read_text())
    return [Path(data) / im["file_name"] for im in val["images"][:n]]

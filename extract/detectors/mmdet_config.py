"""mmdetection checkpoints: recognise them, find their config, check the model is one roicache reads.

Imports of mmdet/mmengine happen inside the functions: the ``mmdet`` extra is optional, and
``roicache`` without it must still recognise an mmdet checkpoint and say how to install the extra.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from cache_schema.errors import CheckpointError, ConfigError

#: RoI heads with one box head (Faster / Mask R-CNN) — what the adapter reads.
SINGLE_STAGE_ROI_HEADS = ("StandardRoIHead",)
#: Multi-stage RoI heads (one classifier per stage).
CASCADE_ROI_HEADS = ("CascadeRoIHead", "HybridTaskCascadeRoIHead", "SCNetRoIHead")
#: Cascades whose box branch roicache reads (SCNet's feature-relay box head is not a Shared2FC one).
SUPPORTED_CASCADES = ("CascadeRoIHead", "HybridTaskCascadeRoIHead")
#: Box heads whose classifier reads the shared fcs' output directly (fc → cls is one layer).
SHARED_FC_BBOX_HEADS = ("Shared2FCBBoxHead", "ConvFCBBoxHead")


def is_mmdet_checkpoint(payload: object) -> bool:
    """An mmengine / mmdet checkpoint: a dict with a ``state_dict`` of a detector's parts and no
    roicache ``format`` tag."""
    if not isinstance(payload, dict) or "format" in payload or not isinstance(payload.get("state_dict"), dict):
        return False
    return any(str(k).startswith(("backbone.", "roi_head.", "rpn_head.", "bbox_head.", "module.backbone."))
               for k in payload["state_dict"])


def require_mmdet(*, ops: bool = True) -> None:
    """Import mmdet or fail with how to install it; with ``ops``, also make mmcv's ops importable
    (the stand-in, announced once) and register mmdet's modules — what building a model needs."""
    try:
        import mmengine  # noqa: F401
        import mmdet  # noqa: F401
    except ImportError as exc:
        raise ConfigError(f"this is an mmdetection checkpoint but mmdet is not installed ({exc}); "
                          "install the extra: pip install 'roicache[mmdet]'") from None
    if not ops:
        return
    from extract.detectors.mmcv_ops import install_standin_ops

    install_standin_ops()
    from mmdet.utils import register_all_modules

    register_all_modules(init_default_scope=True)


def bundled_config_path(name: str) -> Path | None:
    """The path of mmdet's own bundled config ``name`` (with or without ``.py``), if it exists."""
    import mmdet

    root = Path(mmdet.__file__).parent / ".mim" / "configs"
    stem = name[:-3] if name.endswith(".py") else name
    hits = sorted(root.rglob(f"{stem}.py"))
    return hits[0] if hits else None


def resolve_config(payload: dict, config: str | None, *, path: Path) -> tuple[Any, str]:
    """The model's mmengine ``Config`` and where it came from.

    Order: ``config`` as a file, then as a bundled mmdet config name; without ``config``, the
    config text the checkpoint carries (mmengine ``meta.cfg``, mmdet 2.x ``meta.config``).
    """
    from mmengine.config import Config

    if config is not None:
        if Path(config).is_file():
            return _parse(lambda: Config.fromfile(config), config), f"file:{config}"
        bundled = bundled_config_path(config)
        if bundled is None:
            raise ConfigError(f"--config {config!r} is neither a file nor a config bundled with mmdet "
                              "(e.g. mask-rcnn_r50_fpn_sample1e-3_ms-1x_lvis-v1); check the name or the path")
        return _parse(lambda: Config.fromfile(str(bundled)), config), f"mmdet:{bundled.stem}"
    meta = payload.get("meta") or {}
    text = meta.get("cfg") or meta.get("config")
    if not isinstance(text, str) or not text.strip():
        raise ConfigError(f"{path} carries no config; pass --config with the model's config file or a bundled "
                          "mmdet config name")
    return _parse(lambda: Config.fromstring(text, file_format=".py"), f"{path} meta"), "checkpoint"


def _parse(load, where: str):
    try:
        return load()
    except Exception as exc:  # noqa: BLE001 - mmengine raises many types for bad config text
        raise ConfigError(f"config {where} cannot be read ({type(exc).__name__}: {str(exc).splitlines()[0][:160]}); "
                          "give a valid mmdet config") from None


def check_two_stage(cfg: Any) -> None:
    """Refuse, with one line, a config that is not mmdet 3's or a model whose classifier is not
    one shared-fc box head."""
    if not isinstance(cfg.get("model"), dict) or "type" not in cfg.model:
        raise ConfigError("the config defines no model (model=dict(type=...)); pass the model's mmdet config with --config")
    if "test_dataloader" not in cfg:
        raise ConfigError("the config has no test_dataloader (an mmdet 2.x config?); pass --config with the mmdet 3 "
                          "config of this model, e.g. one bundled with mmdet such as "
                          "mask-rcnn_r50_fpn_sample1e-3_ms-1x_lvis-v1")
    model = cfg.model
    roi_head = model.get("roi_head")
    if roi_head is None or model.get("rpn_head") is None:
        raise ConfigError(f"{model.get('type')} is a one-stage detector: it has no second-stage RoI classifier "
                          "to cache; use a two-stage model (Faster / Mask R-CNN)")
    kind = roi_head.get("type")
    if kind in CASCADE_ROI_HEADS:
        _check_cascade(roi_head, model)
        return
    if kind not in SINGLE_STAGE_ROI_HEADS:
        raise ConfigError(f"RoI head {kind} is not supported; roicache reads {', '.join(SINGLE_STAGE_ROI_HEADS)}")
    bbox = roi_head.get("bbox_head", {})
    if bbox.get("type") not in SHARED_FC_BBOX_HEADS:
        raise ConfigError(f"box head {bbox.get('type')} is not supported; roicache reads "
                          f"{', '.join(SHARED_FC_BBOX_HEADS)} (fc features feeding fc_cls directly)")


def _check_cascade(roi_head: Any, model: Any) -> None:
    """A cascade whose stage RoIs do not depend on its classifiers: class-agnostic refinement
    (every stage's RoIs then descend row by row from the proposals, so cached stage logits can be
    averaged with a retrained stage's, exactly as the model does)."""
    kind = roi_head.get("type")
    if kind not in SUPPORTED_CASCADES:
        raise ConfigError(f"{kind} is not supported; roicache reads the cascades {', '.join(SUPPORTED_CASCADES)}")
    heads = roi_head.get("bbox_head")
    heads = list(heads) if isinstance(heads, (list, tuple)) else [heads] * int(roi_head.get("num_stages", 1))
    bad = [h.get("type") for h in heads if h.get("type") not in SHARED_FC_BBOX_HEADS]
    if bad:
        raise ConfigError(f"cascade box head(s) {bad} are not supported; every stage must be one of "
                          f"{', '.join(SHARED_FC_BBOX_HEADS)}")
    if not all(h.get("reg_class_agnostic", False) for h in heads):
        raise ConfigError("this cascade regresses boxes class-specifically, so each stage's RoIs depend on the previous "
                          "classifier; roicache reads cascades with reg_class_agnostic=True in every stage")
    rcnn = (model.get("train_cfg") or {}).get("rcnn")
    if not isinstance(rcnn, (list, tuple)) or len(rcnn) != len(heads):
        raise ConfigError("the cascade config has no train_cfg.rcnn entry per stage; roicache labels each stage's RoIs "
                          "at its assigner's pos_iou_thr — pass the model's full training config with --config")


def stage_fg_iou(cfg: Any) -> tuple[float, ...]:
    """Each cascade stage's foreground IoU (its training assigner's ``pos_iou_thr``); ``()`` for
    a single-stage RoI head."""
    if cfg.model.roi_head.get("type") not in CASCADE_ROI_HEADS:
        return ()
    return tuple(float(stage.assigner.pos_iou_thr) for stage in cfg.model.train_cfg.rcnn)


def class_names(payload: dict) -> tuple[str, ...] | None:
    """Class names the checkpoint records (mmengine ``dataset_meta.classes``, 2.x ``CLASSES``)."""
    meta = payload.get("meta") or {}
    names = (meta.get("dataset_meta") or {}).get("classes") or meta.get("CLASSES")
    return None if names is None else tuple(str(n) for n in names)


#: Where ``serve inject`` puts a calibrated head inside an mmdet checkpoint (for mmdet's own
#: dual-head box head); roicache reads that head from the checkpoint's calibration record instead.
INJECTED_PREFIX = "roi_head.bbox_head.calibrated."
_INJECTED = re.compile(r"^roi_head\.bbox_head\.(\d+\.)?calibrated\.")


def injected_prefix(stage: int | None) -> str:
    """:data:`INJECTED_PREFIX` of a single box head (``None``), or of cascade stage ``stage``."""
    return INJECTED_PREFIX if stage is None else f"roi_head.bbox_head.{int(stage)}.calibrated."


def state_dict_of(payload: dict) -> dict:
    """The model weights, with a DataParallel ``module.`` prefix removed (as mmengine does) and
    injected calibrated heads left out (the base model is what the adapter builds)."""
    state = {(k[7:] if k.startswith("module.") else k): v for k, v in payload["state_dict"].items()}
    return {k: v for k, v in state.items() if not _INJECTED.match(k)}


def build_model(cfg: Any, *, source: str):
    """The model the config describes; a config mmdet cannot build is refused in one line."""
    from mmdet.registry import MODELS

    try:
        return MODELS.build(cfg.model)
    except Exception as exc:  # noqa: BLE001 - registry and module constructors raise many types
        detail = " ".join(str(exc).split())[:200]
        raise ConfigError(f"config ({source}) does not build an mmdet model ({type(exc).__name__}: {detail}); "
                          "pass the model's mmdet 3 config with --config") from None


def load_weights(model, payload: dict, *, source: str, path: Path) -> None:
    """Load the checkpoint's weights strictly: a config that does not match is refused."""
    import torch

    state = state_dict_of(payload)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        text = " ".join(str(exc).split())
        detail = text[text.find("Missing") if "Missing" in text else 0:][:220]
        raise CheckpointError(f"config ({source}) does not match checkpoint {path}: {detail}; "
                              "pass the config the checkpoint was trained with (--config)") from None
    if not all(torch.is_tensor(v) for v in state.values()):
        raise CheckpointError(f"{path}: state_dict holds non-tensor values; re-save the checkpoint")

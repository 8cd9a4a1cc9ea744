"""Stand-in for mmcv's compiled extension ``mmcv._ext`` when only mmcv-lite is installed.

mmcv-lite ships mmcv's Python code without the compiled ``mmcv._ext``, so ``import mmcv.ops``
(and therefore ``mmdet.models`` / ``mmdet.apis``) fails. Every op module in mmcv loads the
extension with ``ext_loader.load_ext('_ext', names)``, i.e. ``importlib.import_module('mmcv._ext')``
followed by ``hasattr`` for each name. Two-stage inference only calls RoIAlign and NMS, both of
which torchvision provides, so :func:`install_standin_ops` registers a module object under
``sys.modules['mmcv._ext']`` that implements those two with torchvision and answers every other
name with a callable raising :class:`CheckpointError` — imports succeed, and a model that really
needs another compiled op fails with a one-line message only when that op runs.

Nothing on disk is touched; a real compiled ``mmcv._ext`` always wins.
"""

from __future__ import annotations

import importlib.machinery
import logging
import struct
import sys
import types
from collections.abc import Callable
from typing import NoReturn

import torch
import torchvision.ops

from cache_schema.errors import CheckpointError

_MODULE = "mmcv._ext"
_MARKER = "__roicache_standin__"  # set on our module object, so we recognise it on later calls
_LOG = logging.getLogger("roicache")


def _unavailable(name: str) -> Callable[..., NoReturn]:
    """A callable standing in for compiled op ``name``; it raises when (and only when) called."""

    def op(*args: object, **kwargs: object) -> NoReturn:
        raise CheckpointError(
            f"this model needs mmcv's compiled op '{name}', which mmcv-lite lacks; install full "
            "mmcv (pip install mmcv==2.1.0 built for your torch) or choose a model built from "
            "RoIAlign/NMS only")

    op.__name__ = op.__qualname__ = name
    return op


def _roi_align_forward(input: torch.Tensor, rois: torch.Tensor, output: torch.Tensor,
                       argmax_y: torch.Tensor, argmax_x: torch.Tensor, *, aligned_height: int,
                       aligned_width: int, spatial_scale: float, sampling_ratio: int,
                       pool_mode: int, aligned: bool) -> None:
    """mmcv's ``roi_align_forward``: RoIAlign of ``rois`` on ``input``, written into ``output``.

    Args:
        input: float ``[N, C, H, W]`` feature map.
        rois: float ``[K, 5]`` rows ``(batch_index, x1, y1, x2, y2)`` in input-image pixels.
        output: float ``[K, C, aligned_height, aligned_width]``, filled in place.
        argmax_y, argmax_x: only used by max pooling (unsupported); left untouched.
        spatial_scale: feature-map pixels per input pixel (1 / stride).
        sampling_ratio: bilinear samples per bin side; ``0`` = adaptive ``ceil(roi_size / bins)``.
        pool_mode: ``1`` average (supported), ``0`` max (raises :class:`CheckpointError`).
        aligned: ``True`` shifts boxes by -0.5 px (pixel-centre model, detectron2 convention).
    """
    if pool_mode != 1:  # mmcv encodes 'max' as 0, 'avg' as 1; torchvision only averages
        _unavailable("roi_align_forward (max pooling)")()
    # torchvision shares mmcv's RoIAlign sampling and bin rules (both descend from detectron2),
    # but spells "adaptive" as a non-positive ratio, and requires rois in the input's dtype.
    result = torchvision.ops.roi_align(
        input, rois.to(input.dtype), output_size=(aligned_height, aligned_width),
        spatial_scale=spatial_scale, sampling_ratio=sampling_ratio if sampling_ratio > 0 else -1,
        aligned=bool(aligned))
    output.copy_(result)


def _nms(bboxes: torch.Tensor, scores: torch.Tensor, *, iou_threshold: float,
         offset: int = 0) -> torch.Tensor:
    """mmcv's ``nms``: greedy NMS.

    ``bboxes`` float ``[N, 4]`` xyxy, ``scores`` float ``[N]``; ``offset`` 0 (box width
    ``x2 - x1``) or 1 (mmcv's legacy ``x2 - x1 + 1``). Returns int64 ``[M]`` kept indices,
    highest score first.
    """
    if offset not in (0, 1):
        raise CheckpointError(f"mmcv nms offset must be 0 or 1, got {offset!r}")
    if offset == 1:
        # Widening every box by 1 px at x2/y2 gives exactly the legacy areas and intersections
        # ((x2 + 1) - x1 and min(x2, x2') + 1 - max(x1, x1')), so plain NMS on them is equivalent.
        bboxes = bboxes.clone()
        bboxes[:, 2:] += 1
    # mmcv's kernel takes the threshold as a C float and suppresses when IoU > threshold; pass
    # torchvision (which takes a double) the same float32 value so IoUs exactly at the threshold,
    # common with integer boxes, are kept exactly as mmcv keeps them.
    threshold = struct.unpack("f", struct.pack("f", float(iou_threshold)))[0]
    return torchvision.ops.nms(bboxes, scores.to(bboxes.dtype), threshold)


def _module_getattr(name: str) -> Callable[..., NoReturn]:
    """Module-level ``__getattr__`` (PEP 562): every unknown op name is an :func:`_unavailable`.

    Dunder names raise ``AttributeError`` so that importlib, pickle and inspect, which probe
    ``__path__``, ``__file__``, ``__wrapped__``... see an ordinary (non-package) module.
    """
    if name.startswith("__") and name.endswith("__"):
        raise AttributeError(f"module {_MODULE!r} has no attribute {name!r}")
    return _unavailable(name)


def _build_module() -> types.ModuleType:
    module = types.ModuleType(_MODULE, "roicache stand-in for mmcv's compiled ops (torchvision)")
    # A spec without a loader: importlib.util.find_spec() needs a non-None __spec__ for modules
    # in sys.modules, and mmengine's mmcv_full_available() (find_loader) then correctly says False.
    module.__spec__ = importlib.machinery.ModuleSpec(_MODULE, None)
    module.__dict__.update({
        _MARKER: True,
        "roi_align_forward": _roi_align_forward,
        "nms": _nms,
        # mmcv.utils.collect_env() calls these; answering keeps env reports from crashing.
        "get_compiler_version": lambda: "n/a (mmcv-lite; roicache torchvision stand-in)",
        "get_compiling_cuda_version": lambda: "n/a (mmcv-lite; roicache torchvision stand-in)",
        "__getattr__": _module_getattr,
    })
    return module


def standin_active() -> bool:
    """Whether ``mmcv._ext`` is currently roicache's stand-in (not mmcv's compiled extension)."""
    return getattr(sys.modules.get(_MODULE), _MARKER, False) is True


def install_standin_ops() -> bool:
    """Make ``mmcv.ops`` importable without the compiled extension; idempotent.

    Returns:
        ``True`` when the stand-in is in use (installed now or earlier), ``False`` when mmcv's
        real compiled ops import and are left untouched, or when mmcv itself is not installed
        (then there is nothing to stand in for, and importing mmdet reports that itself).
    """
    if standin_active():
        return True
    try:
        import mmcv
    except ImportError:
        return False
    try:
        importlib.import_module(_MODULE)
        return False
    except (ImportError, OSError) as error:
        # mmcv-lite (no extension) or an extension built for another torch/CUDA (ImportError /
        # OSError): either way the compiled ops are unusable and the stand-in is the fallback.
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
    module = _build_module()
    sys.modules[_MODULE] = module
    mmcv._ext = module  # what a real ``import mmcv._ext`` would have set on the package
    _LOG.warning("mmcv's compiled ops are missing (mmcv-lite): using torchvision's RoIAlign and "
                 "NMS in their place (%s)", reason)
    return True

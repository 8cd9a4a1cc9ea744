"""Which backend reads a detector checkpoint: one registry, chosen by the checkpoint's format.

Extraction, online calibration, injection and full evaluation all load detectors through
:func:`load_adapter` (or :func:`backend_of` for checkpoint surgery), so a new framework is one new
module registered in :data:`BACKENDS` — nothing else changes. Each backend class offers:

- ``accepts(payload) -> bool``: the loaded checkpoint is in its format;
- ``from_payload(payload, *, path, device, config) -> DetectorAdapter``;
- ``categories_of(payload)`` and ``replace_classifier(payload, *, weight, bias) -> payload``:
  what ``serve inject`` needs, without building the model.
"""

from __future__ import annotations

import logging
import pickle
import warnings
from pathlib import Path
from typing import Any

import torch

from cache_schema.errors import CheckpointError, DatasetError
from extract.detectors.adapter import TorchvisionAdapter
from extract.detectors.base import DetectorAdapter
from extract.detectors.mmdet_adapter import MmdetAdapter

#: backend name -> class; order matters only for formats two backends could both claim (none).
BACKENDS: dict[str, type] = {"torchvision": TorchvisionAdapter, "mmdet": MmdetAdapter}

_log = logging.getLogger("roicache")

#: Modules whose pickled objects an mmengine training checkpoint carries besides tensors.
TRUSTED_PICKLE_MODULES = ("mmengine.", "numpy.")


def read_checkpoint(path: str | Path) -> dict:
    """The contents of a detector checkpoint file, as a dict; one-line errors for bad files.

    roicache's own files load with ``weights_only=True``. mmengine training checkpoints also
    pickle a few Python objects (message hub, numpy scalars); those — and only those — are loaded
    in full, as mmengine itself does: load checkpoints you trust.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"detector checkpoint {path} does not exist; check the path")
    if not path.is_file():
        raise CheckpointError(f"detector checkpoint {path} is not a file; give the checkpoint file, not a directory")
    try:
        with warnings.catch_warnings():  # torch's warnings would print before our one-line error
            warnings.simplefilter("ignore")
            payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "Unsupported global" not in str(exc):  # not a refused Python object: a damaged file
            raise _unreadable(path, exc) from None
        # Only what mmengine's training checkpoints pickle (its message hub, numpy scalars)
        # justifies a full load; any other pickled object is refused, not executed.
        if not any(name in str(exc) for name in TRUSTED_PICKLE_MODULES):
            raise CheckpointError(f"detector checkpoint {path} holds pickled Python objects other than tensors; "
                                  "roicache reads roicache and mmengine checkpoints — re-save it with plain tensors") from None
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                payload = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as exc2:  # noqa: BLE001 - torch raises many types for bad files
            raise _unreadable(path, exc2) from None
        _log.info("%s holds mmengine objects besides tensors; loaded it in full, as mmengine does", path)
    except Exception as exc:  # noqa: BLE001
        raise _unreadable(path, exc) from None
    if not isinstance(payload, dict):
        raise CheckpointError(f"{path} holds a {type(payload).__name__}, not a detector checkpoint dict; "
                              "give a roicache detector or mmdetection checkpoint")
    return payload


def _unreadable(path: Path, exc: Exception) -> CheckpointError:
    return CheckpointError(f"detector checkpoint {path} is not a readable torch checkpoint ({type(exc).__name__}: "
                           "truncated or corrupt); re-copy it or train it again")


def backend_of(payload: Any, path: str | Path) -> type:
    """The backend class whose format ``payload`` (read from ``path``) is in."""
    for cls in BACKENDS.values():
        if cls.accepts(payload):
            return cls
    raise CheckpointError(f"{path} is neither a roicache detector checkpoint nor an mmdetection (mmengine) "
                          f"checkpoint; supported backends: {', '.join(BACKENDS)}")


def load_adapter(path: str | Path, *, device: str | torch.device = "cpu", config: str | None = None,
                 payload: dict | None = None) -> DetectorAdapter:
    """The frozen detector in ``path`` behind the :class:`DetectorAdapter` boundary.

    Args:
        config: mmdetection only — a config file or a bundled mmdet config name (default: the
            config text saved in the checkpoint).
        payload: the checkpoint's contents when already read (it is not read twice).
    """
    payload = read_checkpoint(path) if payload is None else payload
    return backend_of(payload, path).from_payload(payload, path=Path(path), device=device, config=config)


def check_class_table(categories: tuple[dict, ...], annset, json_path: Path) -> None:
    """The detector's ``categories`` are the annotation file's (an ``AnnotationSet``): by json id
    where the checkpoint records ids, by name (in category-id order) where it records only names
    (mmdet's dataset_meta)."""
    if any(c["id"] is None for c in categories):
        names = tuple(str(c["name"]) for c in annset.categories)
        theirs = tuple(c["name"] for c in categories)
        if len(theirs) != len(names):
            raise DatasetError(f"{json_path} has {len(names)} categories but the detector {len(theirs)}; "
                               "use the annotation file the detector was trained on")
        if theirs != names:
            k = next(i for i, (a, b) in enumerate(zip(theirs, names)) if a != b)
            raise DatasetError(f"{json_path}: class {k} is {names[k]!r} but the checkpoint's is {theirs[k]!r}; "
                               "use the annotation file the detector was trained on")
        return
    ckpt_ids = tuple(int(c["id"]) for c in categories)
    if ckpt_ids and ckpt_ids != annset.cat_ids:
        raise DatasetError(f"{json_path}: category ids differ from the ones the detector was trained on; use the matching annotation file")

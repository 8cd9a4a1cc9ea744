"""Detector checkpoints: the ``roicache.detector`` file format, written atomically, read safely.

Format (a ``torch.save``d dict, loadable with ``weights_only=True``)::

    {"format": "roicache.detector", "format_version": 1,
     "arch": DetectorArch.to_dict(), "categories": [{"id": int, "name": str}, ...],
     "state_dict": {name: tensor}, "meta": {JSON-like training config, seed, steps, ...}}

``categories[k]`` is contiguous class ``k`` (ascending json category id); torchvision label
``k + 1`` inside the model.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cache_schema.errors import CheckpointError, ConfigError
from cache_schema.runtime import sha256_file
from extract.detectors.arch import DetectorArch
from extract.detectors.model import build_detector

FORMAT = "roicache.detector"
FORMAT_VERSION = 1
_KEYS = ("format", "format_version", "arch", "categories", "state_dict", "meta")


@dataclass(frozen=True, kw_only=True)
class LoadedDetector:
    """A detector read from a checkpoint.

    Attributes:
        model: the torchvision ``MaskRCNN``, in eval mode, on the requested device.
        arch: its architecture.
        categories: ``C`` dicts ``{"id": int, "name": str}``; index ``k`` is class ``k``.
        meta: the training record saved with it.
        sha256: hex sha256 of the checkpoint file's bytes (what a store records).
        path: the file it came from.
    """

    model: nn.Module
    arch: DetectorArch
    categories: tuple[dict, ...]
    meta: dict
    sha256: str
    path: Path

    def __post_init__(self) -> None:
        if len(self.categories) != self.arch.num_classes:
            raise CheckpointError(
                f"checkpoint {self.path}: {len(self.categories)} categories for "
                f"{self.arch.num_classes} classes; re-save it with one category per class"
            )


def _clean_categories(categories: list[dict], num_classes: int) -> list[dict[str, Any]]:
    if len(categories) != num_classes:
        raise ConfigError(
            f"save_detector: {len(categories)} categories for num_classes={num_classes}; give one per class"
        )
    out = []
    for k, cat in enumerate(categories):
        if not isinstance(cat, dict) or "id" not in cat or "name" not in cat:
            raise ConfigError(f"save_detector: category {k} must be a dict with 'id' and 'name'")
        out.append({"id": int(cat["id"]), "name": str(cat["name"])})
    ids = [c["id"] for c in out]
    if ids != sorted(set(ids)):
        raise ConfigError("save_detector: category ids must be unique and ascending (class k = k-th smallest id)")
    return out


def atomic_torch_save(obj: Any, path: Path) -> None:
    """``torch.save`` to a temporary file next to ``path``, fsync, then rename over ``path``.

    Why: a crash mid-write must never leave a file that looks like a finished checkpoint.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_detector(
    path: str | os.PathLike[str],
    *,
    model: nn.Module,
    arch: DetectorArch,
    categories: list[dict],
    meta: dict,
) -> Path:
    """Write ``model``'s weights with ``arch``, ``categories`` and ``meta`` to ``path`` atomically.

    ``model`` may be wrapped (DDP): its ``.module`` is saved. ``meta`` must be JSON-serialisable
    (it is stored as plain values so ``weights_only`` loading accepts it). Returns the path.
    """
    path = Path(path)
    inner = getattr(model, "module", model)
    try:
        meta_plain = json.loads(json.dumps(meta))
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"save_detector: meta is not JSON-serialisable ({exc}); pass plain values") from None
    state = {k: v.detach().cpu().clone() for k, v in inner.state_dict().items()}
    payload = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "arch": arch.to_dict(),
        "categories": _clean_categories(list(categories), arch.num_classes),
        "state_dict": state,
        "meta": meta_plain,
    }
    atomic_torch_save(payload, path)
    return path


def read_torch_file(path: Path, *, what: str) -> Any:
    """``torch.load(weights_only=True)`` with every failure turned into one-line CheckpointError."""
    if not path.exists():
        raise CheckpointError(f"{what} {path} does not exist; check the path")
    if not path.is_file():
        raise CheckpointError(f"{what} {path} is not a file; give the checkpoint file, not a directory")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises many types for bad files
        # torch's own messages for a bad file are long and mostly about weights_only; the type
        # of the failure is what tells truncated (EOFError, RuntimeError) from foreign pickles.
        raise CheckpointError(
            f"{what} {path} is not a readable torch checkpoint ({type(exc).__name__}: truncated, corrupt, "
            "or not saved with plain tensors); "
            "re-copy it or train it again"
        ) from None


def is_roicache_detector(payload: Any) -> bool:
    """``payload`` (a loaded checkpoint) is in the ``roicache.detector`` format."""
    return isinstance(payload, dict) and payload.get("format") == FORMAT


def load_detector(path: str | os.PathLike[str], *, device: str | torch.device = "cpu",
                  payload: dict | None = None) -> LoadedDetector:
    """Read a ``roicache.detector`` checkpoint and rebuild its model (eval mode, on ``device``).
    ``payload``: the file's contents when the caller has already read them (read once).

    Raises:
        CheckpointError: missing file, not a torch file, truncated, not this format (or a newer
            version), bad arch, or weights that do not fit the arch.
    """
    path = Path(path)
    if payload is None:
        payload = read_torch_file(path, what="detector checkpoint")
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        found = payload.get("format") if isinstance(payload, dict) else type(payload).__name__
        raise CheckpointError(
            f"{path} is not a roicache detector checkpoint (format={found!r}); give a file written by "
            "`roicache detector train` or save_detector"
        )
    if payload.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: detector checkpoint format_version {payload.get('format_version')!r} is not "
            f"{FORMAT_VERSION}; use the roicache version that wrote it"
        )
    missing = [k for k in _KEYS if k not in payload]
    if missing:
        raise CheckpointError(f"{path}: detector checkpoint lacks {missing}; it is incomplete, re-save it")
    try:
        arch = DetectorArch.from_dict(payload["arch"])
    except ConfigError as exc:
        raise CheckpointError(f"{path}: bad arch record ({exc})") from None
    model = build_detector(arch)
    try:
        model.load_state_dict(payload["state_dict"], strict=True)
    except (RuntimeError, TypeError, AttributeError) as exc:
        first = str(exc).strip().splitlines()
        detail = " ".join(line.strip() for line in first[:3])[:200]
        raise CheckpointError(
            f"{path}: weights do not match the recorded arch ({detail}); the file was edited or is "
            "from another model"
        ) from None
    model.to(device).eval()
    return LoadedDetector(
        model=model,
        arch=arch,
        categories=tuple(payload["categories"]),
        meta=payload["meta"] if isinstance(payload["meta"], dict) else {},
        sha256=sha256_file(path),
        path=path,
    )

"""The mmdetection backend of :class:`~extract.detectors.base.DetectorAdapter` (work in progress)."""

from __future__ import annotations

from pathlib import Path

import torch

from cache_schema.errors import CheckpointError


def is_mmdet_checkpoint(payload: object) -> bool:
    """An mmengine / mmdet checkpoint: a dict with a ``state_dict`` of a two-part detector and
    no roicache ``format`` tag."""
    if not isinstance(payload, dict) or "format" in payload or not isinstance(payload.get("state_dict"), dict):
        return False
    return any(k.startswith(("backbone.", "roi_head.", "rpn_head.", "bbox_head.")) for k in payload["state_dict"])


class MmdetAdapter:
    backend = "mmdet"

    @classmethod
    def accepts(cls, payload: object) -> bool:
        return is_mmdet_checkpoint(payload)

    @classmethod
    def from_payload(cls, payload: dict, *, path: Path, device: str | torch.device = "cpu",
                     config: str | None = None) -> "MmdetAdapter":
        raise CheckpointError("mmdet backend not implemented yet")

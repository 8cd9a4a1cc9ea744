"""Resumable training state (``out_dir/last.pt``) and atomic small-file writes.

``last.pt`` holds the head's weights, the optimizer (momentum buffers), the schedule position,
the sampler's identity, the FASA state when enabled, and the step. Samplers and the loss's random draws are counter-based on
``(seed, step)`` (see :mod:`heads.samplers`), so the step *is* their RNG state: a resumed run
replays exactly the batches and draws the uninterrupted run would have made.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
from torch import nn

from cache_schema.errors import CheckpointError, ConfigError

STATE_FORMAT = "roicache.head-train-state"
STATE_VERSION = 1


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temp name + fsync + rename, so a crash leaves the old file
    or the new one, never half of one. The temp name is unique per writer: two sweep jobs scoring
    trials of one head may write the same file at once (the last rename wins, both whole)."""
    with tempfile.NamedTemporaryFile(dir=path.parent, prefix=path.name + ".", suffix=".tmp", delete=False) as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(f.name, path)


def write_json_atomic(path: Path, obj) -> None:
    write_atomic(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def save_training_state(path: Path, *, head: nn.Module, optimizer: torch.optim.Optimizer, step: int,
                        lr: float, sampler_state: dict, identity: dict, fasa: dict | None = None) -> None:
    """Atomically write the state after ``step`` completed steps."""
    payload = {
        "format": STATE_FORMAT, "format_version": STATE_VERSION, "step": int(step),
        "model": {k: v.detach().cpu() for k, v in head.state_dict().items()},
        "optimizer": optimizer.state_dict(),
        "scheduler": {"step": int(step), "lr": float(lr)},
        "sampler": json.dumps(sampler_state, sort_keys=True),
        "identity": json.dumps(identity, sort_keys=True),
        "fasa": fasa,
    }
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(payload, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_training_state(path: Path, *, identity: dict, sampler_state: dict) -> dict:
    """Read ``last.pt`` and check it belongs to this run (same settings and sampler)."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means a bad file
        raise CheckpointError(f"{path} cannot be read ({type(e).__name__}); delete it to start the run over") from e
    if not isinstance(payload, dict) or payload.get("format") != STATE_FORMAT:
        raise CheckpointError(f"{path} is not a head training state; delete it or choose another output folder")
    if payload.get("format_version") != STATE_VERSION:
        raise CheckpointError(f"{path} has state version {payload.get('format_version')}, expected {STATE_VERSION}")
    if json.loads(payload["identity"]) != identity:
        raise ConfigError(f"{path.parent} holds a run with other settings (sampler/loss/head/schedule/seed); "
                          f"use a new output folder or delete {path.name} to start over")
    if json.loads(payload["sampler"]) != sampler_state:
        raise ConfigError(f"{path.parent} was trained with another sampler state; use a new output folder")
    return payload

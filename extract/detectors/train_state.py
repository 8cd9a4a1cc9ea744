"""The resume file ``out_dir/last.pt`` of detector training: what it holds and how it is checked.

Format (``weights_only``-loadable)::

    {"format": "roicache.detector_train_state", "format_version": 1, "step": int,
     "model": state_dict, "optimizer": state_dict, "config": DetectorTrainConfig.to_dict(),
     "arch": DetectorArch.to_dict(), "categories": [...], "losses": [float per step],
     "rng": {"scheme": "seed-per-step", "seed": int}, "train_seconds": float}

The learning rate is a pure function of the step (no scheduler object to restore) and every
random draw of a step is seeded from ``(seed, step, rank)``, so ``step`` is the whole RNG state.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from torch import nn

from cache_schema.errors import CheckpointError, ConfigError
from extract.detectors.arch import DetectorArch
from extract.detectors.checkpoint import atomic_torch_save, read_torch_file
from extract.detectors.train_config import TRAJECTORY_FIELDS, DetectorTrainConfig

STATE_FORMAT = "roicache.detector_train_state"
STATE_VERSION = 1


@dataclass(frozen=True, kw_only=True)
class TrainState:
    """A training run's state after ``step`` optimizer steps (see the module docstring)."""

    step: int
    model: dict
    optimizer: dict
    config: dict
    arch: dict
    categories: list
    losses: list
    train_seconds: float

    def __post_init__(self) -> None:
        if self.step < 0 or len(self.losses) != self.step:
            raise CheckpointError(
                f"training state: step {self.step} with {len(self.losses)} recorded losses; "
                "the file is inconsistent, delete last.pt to restart"
            )


def save_train_state(path: Path, *, state: TrainState, seed: int) -> None:
    """Write ``state`` atomically (temp file + rename) so a crash never leaves a torn resume file."""
    payload = {
        "format": STATE_FORMAT,
        "format_version": STATE_VERSION,
        "step": state.step,
        "model": state.model,
        "optimizer": state.optimizer,
        "config": state.config,
        "arch": state.arch,
        "categories": state.categories,
        "losses": [float(x) for x in state.losses],
        "rng": {"scheme": "seed-per-step", "seed": seed},
        "train_seconds": float(state.train_seconds),
    }
    atomic_torch_save(payload, path)


def load_train_state(path: Path) -> TrainState:
    """Read ``last.pt``; a missing, corrupt or foreign file is a one-line :class:`CheckpointError`."""
    payload = read_torch_file(path, what="training state")
    if not isinstance(payload, dict) or payload.get("format") != STATE_FORMAT:
        raise CheckpointError(
            f"{path} is not a roicache training state; delete it or choose another output directory"
        )
    if payload.get("format_version") != STATE_VERSION:
        raise CheckpointError(f"{path}: training state version {payload.get('format_version')!r} unsupported")
    try:
        return TrainState(
            step=int(payload["step"]),
            model=payload["model"],
            optimizer=payload["optimizer"],
            config=payload["config"],
            arch=payload["arch"],
            categories=list(payload["categories"]),
            losses=list(payload["losses"]),
            train_seconds=float(payload.get("train_seconds", 0.0)),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: training state lacks or mangles {exc}; delete it to restart") from None


def check_resumable(
    state: TrainState, *, path: Path, config: DetectorTrainConfig, arch: DetectorArch, categories: list[dict]
) -> None:
    """Refuse to resume a run whose trajectory settings, arch or classes differ from this one's."""
    old = state.config
    for name in TRAJECTORY_FIELDS:
        new_value = config.to_dict()[name]
        if old.get(name) != new_value:
            raise ConfigError(
                f"{path} was written with {name}={old.get(name)!r}, now {new_value!r}; use the same "
                "settings to resume, or a new output directory (or delete last.pt) to start over"
            )
    if state.arch != arch.to_dict():
        raise ConfigError(
            f"{path} was written for another detector arch; use a new output directory or delete last.pt"
        )
    if [c["id"] for c in state.categories] != [c["id"] for c in categories]:
        raise ConfigError(
            f"{path} was written for other categories (another dataset?); use a new output directory"
        )


def restore_into(state: TrainState, *, model: nn.Module, optimizer, path: Path) -> None:
    """Load the saved weights and optimizer state into freshly built ``model`` / ``optimizer``."""
    try:
        model.load_state_dict(state.model, strict=True)
        optimizer.load_state_dict(state.optimizer)
    except (RuntimeError, ValueError, KeyError) as exc:
        detail = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{path}: saved weights do not fit the model ({detail}); delete last.pt") from None

"""Which images a shard owns, and in which fixed batches it runs them.

Batches are fixed groups of ``batch_size`` consecutive images of a split, and a shard owns whole
groups. Why: CPU kernels may round differently when a batch holds other images, so a store must
not depend on how the work was split or resumed — the same image is always computed in the same
batch, whether one process or ``n`` fill the store, and whether it ran through or was resumed.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from cache_schema.errors import ConfigError


@dataclass(frozen=True, kw_only=True)
class Shard:
    """Shard ``index`` of ``count`` (0-based)."""

    index: int = 0
    count: int = 1

    def __post_init__(self) -> None:
        if self.count < 1 or not 0 <= self.index < self.count:
            raise ConfigError(f"--shard {self.index}/{self.count} is invalid: use i/n with 0 <= i < n")

    @classmethod
    def parse(cls, text: str | None) -> "Shard":
        """``"i/n"``; ``None`` → the ``torchrun`` rank/world size if set, else ``0/1``."""
        if text is None:
            rank, world = os.environ.get("RANK"), os.environ.get("WORLD_SIZE")
            if rank is not None and world is not None:
                return cls(index=int(rank), count=int(world))
            return cls()
        m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
        if not m:
            raise ConfigError(f"--shard {text!r} is not of the form i/n (e.g. 0/4)")
        return cls(index=int(m.group(1)), count=int(m.group(2)))


def batch_groups(num_images: int, batch_size: int, shard: Shard) -> list[list[int]]:
    """The fixed image batches of a split that ``shard`` owns, in order.

    Groups are ``[g*B, (g+1)*B)``; group ``g`` belongs to shard ``g % n``.
    """
    if batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {batch_size}")
    groups = []
    for g, start in enumerate(range(0, num_images, batch_size)):
        if g % shard.count == shard.index:
            groups.append(list(range(start, min(start + batch_size, num_images))))
    return groups

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


def batch_groups(num_images: int, batch_size: int, shard: Shard, *, block: int | None = None) -> list[list[int]]:
    """The fixed image batches of a split that ``shard`` owns, in order.

    The split is cut into commit blocks of ``block`` images (``None``: one block per batch, the
    schema-1 layout); block ``b`` belongs to shard ``b % n`` — a shard writes whole blocks, so two
    shards never write the same object — and each block into consecutive batches of
    ``batch_size`` (the last one of a block may be shorter).
    """
    if batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {batch_size}")
    block = batch_size if block is None else int(block)
    if block < 1:
        raise ConfigError(f"the commit block must hold >= 1 image, got {block}")
    groups = []
    for b, start in enumerate(range(0, num_images, block)):
        if b % shard.count != shard.index:
            continue
        stop = min(start + block, num_images)
        groups.extend(list(range(a, min(a + batch_size, stop))) for a in range(start, stop, batch_size))
    return groups


def commit_block(batch_size: int, images: int = 32) -> int:
    """Images per commit block of a new store: about ``images``, a multiple of ``batch_size`` so
    that no batch straddles two blocks."""
    return batch_size * max(1, round(images / batch_size))

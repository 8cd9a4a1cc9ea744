"""Runtime choices shared by every package: which device, how many threads, file hashes."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch


def available_cores() -> int:
    """Cores this process may actually run on (the affinity mask, not the machine's count)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - non-Linux
        return max(1, os.cpu_count() or 1)


def configure_threads(threads: int | None = None) -> int:
    """Set torch's intra-op threads to ``threads`` or to the cores available; returns the count.

    Why: torch defaults to the machine's core count, and on a loaded 2-core box oversubscribed
    threads ran 2-7x slower than one thread each. ``ROICACHE_THREADS`` overrides.
    """
    env = os.environ.get("ROICACHE_THREADS")
    n = threads or (int(env) if env else available_cores())
    torch.set_num_threads(max(1, n))
    return max(1, n)


def pick_device(requested: str | None = None) -> torch.device:
    """``cuda`` when present, else ``cpu``; an explicit request wins (``"cpu"``, ``"cuda:1"``)."""
    if requested and requested != "auto":
        return torch.device(requested)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def sha256_file(path: str | os.PathLike[str], chunk_bytes: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        while block := f.read(chunk_bytes):
            h.update(block)
    return h.hexdigest()

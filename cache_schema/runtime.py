"""Runtime choices shared by every package: which device, how many threads, file hashes."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch

from cache_schema.errors import ConfigError


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


def available_memory_bytes() -> int:
    """``MemAvailable`` of /proc/meminfo in bytes (8 GiB where it cannot be read)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:  # pragma: no cover - not Linux
        pass
    return 8 << 30


def pick_device(requested: str | None = None) -> torch.device:
    """``cuda`` when present, else ``cpu``; an explicit request wins (``"cpu"``, ``"cuda:1"``)
    when this machine has it — otherwise one-line :class:`ConfigError` before any work."""
    if not requested or requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(requested)
    except (RuntimeError, ValueError):
        raise ConfigError(f"--device {requested!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"--device {requested!r}: roicache runs on cpu or cuda; use auto, cpu, cuda or cuda:N")
    if device.type == "cuda":
        count = torch.cuda.device_count()
        if count == 0:
            raise ConfigError(f"--device {requested!r} but this machine has no CUDA GPU; use --device cpu (or auto)")
        if device.index is not None and device.index >= count:
            raise ConfigError(f"--device {requested!r} but this machine has {count} CUDA GPU(s); use cuda:0..cuda:{count - 1}")
    return device


def sha256_file(path: str | os.PathLike[str], chunk_bytes: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        while block := f.read(chunk_bytes):
            h.update(block)
    return h.hexdigest()


def check_output(path: str | os.PathLike[str], *, kind: str, flag: str = "--out", overwrite: bool = False,
                 marker: str | None = None) -> Path:
    """Refuse, before any work, an output location that cannot be written as ``kind``.

    ``kind="dir"``: ``path`` may exist as a directory (runs resume there), not as a file.
    ``kind="file"``: an existing file is refused unless ``overwrite`` (no silent overwrite); a
    directory is refused. Either way no ancestor may be a file, and the nearest existing
    ancestor must be writable. Nothing is created. ``marker``: a file a previous run of the same
    command leaves in the directory (``eval_summary.json``); found there, the directory is refused
    unless ``overwrite``, since its results would be replaced.
    """
    path = Path(path)
    if kind == "dir" and marker is not None and not overwrite and (path / marker).is_file():
        raise ConfigError(f"{flag} {path} already holds results ({marker}); pass --overwrite to replace them, "
                          "or choose another directory")
    if path.exists():
        if kind == "dir" and not path.is_dir():
            raise ConfigError(f"{flag} {path} is an existing file; give a directory path")
        if kind == "file" and path.is_dir():
            raise ConfigError(f"{flag} {path} is a directory; give a file path")
        if kind == "file" and not overwrite:
            raise ConfigError(f"{flag} {path} exists; pass --overwrite to replace it, or choose another path")
    parent = path if path.is_dir() else path.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise ConfigError(f"{flag} {path}: {parent} is a file, not a directory; choose another path")
    if not os.access(parent, os.W_OK):
        raise ConfigError(f"{flag} {path}: {parent} is not writable; choose another path")
    return path

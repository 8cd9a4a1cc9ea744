"""Find a store's input files again — from another directory, or after the store moved.

A store records each split's annotation file by content (sha256) and by path: as given, absolute
(``annotation_path``, a hint) and relative to the store (``annotation_relpath``). A reader asks
:func:`resolve_annotation`, which accepts a candidate only when its bytes hash to the recorded
sha256, trying in order: the file the user names (``--annotations val=PATH``), the path relative
to the store's current location, the recorded absolute path. So a store moved together with its
dataset, or read from any working directory, still finds its json; a moved json is named once.
"""

from __future__ import annotations

import os
from pathlib import Path

from cache_schema.errors import ConfigError, StoreMismatchError
from cache_schema.runtime import sha256_file


def relative_to_store(path: str | os.PathLike, store_location: str) -> str | None:
    """``path`` relative to a local store's directory (``None`` for a store behind a URL)."""
    if "://" in store_location:
        return None
    return os.path.relpath(Path(path).resolve(), Path(store_location).resolve())


def parse_annotations(items: list[str] | None) -> dict[str, Path]:
    """``["val=PATH", ...]`` (the CLIs' ``--annotations``) → ``{"val": Path}``."""
    out: dict[str, Path] = {}
    for item in items or ():
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise ConfigError(f"--annotations {item!r} must be SPLIT=PATH, e.g. val=lvis_v1_val.json")
        out[name.strip()] = Path(path.strip())
    return out


def resolve_annotation(store, split: str, override: str | os.PathLike | None = None) -> Path:
    """The annotation file ``split`` of ``store`` was extracted from (content-checked)."""
    source = store.meta.dataset.splits[split]
    want = source.annotation_sha256
    if override is not None:
        path = Path(override)
        if not path.is_file():
            raise ConfigError(f"--annotations {split}={path}: no such file")
        if sha256_file(path) != want:
            raise StoreMismatchError(f"--annotations {split}={path} is not the file store {store.path} was extracted "
                                     f"from (sha256 {want[:12]}…); give that file")
        return path
    candidates = []
    if source.annotation_relpath and "://" not in store.path:
        candidates.append(Path(store.path) / source.annotation_relpath)
    candidates.append(Path(source.annotation_path))
    for path in candidates:
        if path.is_file() and sha256_file(path) == want:
            return path
    tried = ", ".join(str(p) for p in dict.fromkeys(candidates))
    raise ConfigError(f"the {split} annotation file of store {store.path} is not at {tried} (or was changed); "
                      f"pass it with --annotations {split}=PATH")

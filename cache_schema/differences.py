"""What differs between the metadata a store records and the one a resumed extraction would
write: ``extract --resume`` continues a store only when nothing that matters differs."""

from __future__ import annotations

from typing import Any

from cache_schema.meta import StoreMeta

_IGNORED_ON_RESUME = ("detector.checkpoint_path", "extraction.created")


def _flatten(prefix: str, value: Any, out: dict[str, Any]) -> None:
    if isinstance(value, dict) and value:
        for k, v in value.items():
            _flatten(f"{prefix}.{k}" if prefix else str(k), v, out)
    else:
        out[prefix] = value


def meta_differences(recorded: StoreMeta, wanted: StoreMeta) -> list[str]:
    """Fields (dotted paths) where ``wanted`` differs from ``recorded``, as ``"path: a != b"`` lines.

    Ignored: the checkpoint path, annotation paths, image roots and the creation time — a store
    may be resumed on another machine where the same files live elsewhere.
    """
    a: dict[str, Any] = {}
    b: dict[str, Any] = {}
    _flatten("", recorded.to_dict(), a)
    _flatten("", wanted.to_dict(), b)

    def ignored(key: str) -> bool:
        return key in _IGNORED_ON_RESUME or key.endswith((".annotation_path", ".annotation_relpath", ".image_root"))

    diffs = []
    for key in sorted(set(a) | set(b)):
        if not ignored(key) and a.get(key) != b.get(key):
            diffs.append(f"{key}: {_short(a.get(key))} != {_short(b.get(key))}")
    return diffs


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 24 else text[:21] + "..."

"""The detector shipped with roicache: the embedded benchmark's converged Mask R-CNN.

``extract/detectors/shipped/embedded.pt`` is a ``roicache.detector`` checkpoint with float16
weights (the model is rebuilt in float32; ``load_state_dict`` casts). Its manifest
``embedded.json`` records the file's sha256 and size, the recipe that trained it, the synthetic
benchmark's generator version and config it was trained on, and its val evaluation, so that:

- :func:`shipped_checkpoint` hands out the file only when its bytes are the recorded ones
  (a truncated or edited copy is refused with one line);
- :func:`check_data_matches` refuses to extract with it on data from another generator version or
  config — its class table and statistics are those of one benchmark.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path


from cache_schema.errors import CheckpointError, DatasetError
from cache_schema.runtime import sha256_file
from extract.detectors.checkpoint import FORMAT, atomic_torch_save, read_torch_file

SHIPPED_DIR = Path(__file__).resolve().parent / "shipped"
DEFAULT_NAME = "embedded"


@dataclass(frozen=True, kw_only=True)
class ShippedDetector:
    """A shipped checkpoint's manifest.

    Attributes:
        name: manifest stem (``embedded``).
        file: the checkpoint's path.
        sha256 / size: the checkpoint file's expected bytes (hex digest, bytes).
        generator: the synthetic benchmark generator version it was trained on.
        data_config: that benchmark's ``SynthConfig.to_dict()`` (includes its seed).
        recipe: preset name and the training config actually run (``DetectorTrainConfig.to_dict``).
        training: steps, epochs, wall time, images/s of the run; ``val_log``: per-snapshot val AP.
        val: the final checkpoint's full-val evaluation of this float16 file (``orig`` head):
            summary name -> AP in [0, 1], per IoU type (``segm``, ``bbox``).
    """

    name: str
    file: Path
    sha256: str
    size: int
    generator: str
    data_config: dict
    recipe: dict
    training: dict
    val_log: list
    val: dict

    @classmethod
    def read(cls, name: str = DEFAULT_NAME) -> "ShippedDetector":
        path = SHIPPED_DIR / f"{name}.json"
        try:
            record = json.loads(path.read_text())
            return cls(name=name, file=SHIPPED_DIR / record["file"], **{k: record[k] for k in _FIELDS})
        except FileNotFoundError:
            raise CheckpointError(f"no shipped detector {name!r} ({path} is missing); reinstall roicache") from None
        except (ValueError, KeyError, TypeError) as exc:
            raise CheckpointError(f"shipped detector manifest {path} is damaged ({exc}); restore it with git checkout") from None


_FIELDS = ("sha256", "size", "generator", "data_config", "recipe", "training", "val_log", "val")


def shipped_checkpoint(name: str = DEFAULT_NAME) -> Path:
    """Path of the shipped checkpoint ``name``, after checking its size and sha256 against the manifest."""
    record = ShippedDetector.read(name)
    if not record.file.is_file():
        raise CheckpointError(f"shipped detector {record.file} is missing; restore it with git checkout or reinstall roicache")
    size = record.file.stat().st_size
    if size != record.size or sha256_file(record.file) != record.sha256:
        raise CheckpointError(
            f"shipped detector {record.file} is damaged ({size} bytes, sha256 differs from its manifest); "
            "restore it with `git checkout -- extract/detectors/shipped` or reinstall roicache"
        )
    return record.file


def shipped_record_of(ckpt: Path) -> ShippedDetector | None:
    """The manifest of the shipped detector whose bytes ``ckpt`` holds, or ``None``."""
    ckpt = Path(ckpt)
    for manifest in sorted(SHIPPED_DIR.glob("*.json")):
        record = ShippedDetector.read(manifest.stem)
        if ckpt.is_file() and ckpt.stat().st_size == record.size and sha256_file(ckpt) == record.sha256:
            return record
    return None


def check_data_matches(ckpt: Path, data: Path) -> None:
    """Refuse (one-line :class:`DatasetError`) a shipped checkpoint on data it was not trained for.

    ``data`` is a dataset directory or an annotation json; the benchmark's ``meta.json`` next to it
    records the generator version and config. Other checkpoints pass unchecked.
    """
    record = shipped_record_of(ckpt)
    if record is None:
        return
    root = Path(data) if Path(data).is_dir() else Path(data).parent
    meta_path = root / "meta.json"
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError):
        raise DatasetError(
            f"the shipped detector only fits the embedded benchmark ({record.generator}), and {root} has no "
            "readable meta.json saying how it was generated; run `roicache data synth` with the default "
            "config, or train a detector on this data (`roicache detector train`)"
        ) from None
    if meta.get("generator") != record.generator:
        raise DatasetError(
            f"{root} was generated by {meta.get('generator')!r}, the shipped detector was trained on "
            f"{record.generator!r} data; regenerate it with this roicache or train a detector on it"
        )
    theirs = meta.get("config", {})
    diff = sorted(k for k in set(theirs) | set(record.data_config) if theirs.get(k) != record.data_config.get(k))
    if diff:
        shown = ", ".join(f"{k}={theirs.get(k)!r} (shipped: {record.data_config.get(k)!r})" for k in diff[:4])
        raise DatasetError(
            f"{root} was generated with another benchmark config than the shipped detector's: {shown}; "
            "regenerate it with the default config or train a detector on it (`roicache detector train`)"
        )


def write_shipped(src: Path, *, name: str, data: Path, recipe: dict, training: dict, val_log: list) -> Path:
    """Write ``src`` (a trained ``roicache.detector`` file) as shipped checkpoint ``name`` with
    float16 weights and a manifest without ``val`` yet (:func:`record_val` adds it); returns its path."""
    payload = read_torch_file(Path(src), what="detector checkpoint")
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{src} is not a roicache detector checkpoint")
    # float16 halves the file (the repo carries it); activations stay float32 at load time.
    payload["state_dict"] = {k: v.half() if v.is_floating_point() else v for k, v in payload["state_dict"].items()}
    payload["meta"] = {**payload["meta"], "shipped": name, "weights_dtype": "float16"}
    meta = json.loads((Path(data) / "meta.json").read_text())
    out = SHIPPED_DIR / f"{name}.pt"
    atomic_torch_save(payload, out)
    manifest = {"file": out.name, "sha256": sha256_file(out), "size": out.stat().st_size,
                "generator": meta["generator"], "data_config": meta["config"], "recipe": recipe,
                "training": training, "val_log": val_log, "val": {}}
    (SHIPPED_DIR / f"{name}.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return out


def record_val(name: str, val: dict) -> None:
    """Store the shipped file's own val evaluation (``{"segm": {...}, "bbox": {...}}``) in its manifest."""
    path = SHIPPED_DIR / f"{name}.json"
    manifest = json.loads(path.read_text())
    manifest["val"] = val
    path.write_text(json.dumps(manifest, indent=1) + "\n")


__all__ = ["ShippedDetector", "check_data_matches", "record_val", "shipped_checkpoint", "write_shipped"]

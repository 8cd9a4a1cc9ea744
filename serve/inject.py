"""Checkpoint surgery: put a head trained from the cache back into the detector checkpoint.

Two outputs:
- dual-head (``--combine sel`` and the other rules): the original checkpoint plus a
  ``"calibration"`` record holding the new head (spec + weights), the combination
  (:class:`heads.combine.Combination`: rule, T, boundary, thr, scale_ratio) and the training
  instance counts. roicache's loader (:mod:`serve.dual`) rebuilds the
  detector and scores every RoI with both heads.
- ``--combine replace``: a checkpoint in the backend's plain layout whose classifier *is* the
  new head, loadable without roicache (torchvision: stock ``MaskRCNN``,
  :func:`extract.detectors.plain.build_plain_torchvision`; mmdet: ``init_detector``). Only a head
  that replaces the classifier layer alone (``lastfc``) can do this: the others change the shared
  fcs the box regressor also reads.

The checkpoint's backend (chosen by its format, :mod:`extract.detectors.backends`) does the
surgery; this module only decides what goes in.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from cache_schema.errors import CheckpointError, ConfigError
from cache_schema.runtime import check_output, sha256_file
from extract.datasets.lvis_json import class_statistics, load_annotations
from extract.detectors.backends import backend_of, read_checkpoint
from extract.detectors.checkpoint import atomic_torch_save
from heads.combine import RULES, Combination, recorded_combination
from heads.losses import GUMBEL_LOSSES
from heads.models import HeadSpec, load_head

CALIBRATION_KEY = "calibration"
REPLACEABLE_HEADS = ("lastfc",)
#: ``--combine replace``: not a rule, a plain checkpoint whose classifier is the new head.
REPLACE = "replace"


@dataclass(frozen=True, kw_only=True)
class CalibratedHead:
    """One trained head of an injected checkpoint.

    Attributes:
        stage: the cascade stage whose classifier it retrains (0 for a single-stage detector).
        spec: the head's :class:`heads.models.HeadSpec`; ``state_dict``: its weights.
        head_meta: the head's provenance (store identity, config, seed, level, stage).
    """

    stage: int
    spec: HeadSpec
    state_dict: dict
    head_meta: dict

    def to_payload(self) -> dict:
        return {"stage": self.stage, "spec": self.spec.to_dict(), "state_dict": self.state_dict,
                "head_meta": self.head_meta}

    @classmethod
    def from_payload(cls, d: dict) -> "CalibratedHead":
        return cls(stage=int(d.get("stage", 0)), spec=HeadSpec.from_dict(d["spec"]), state_dict=d["state_dict"],
                   head_meta=d.get("head_meta", {}))


@dataclass(frozen=True, kw_only=True)
class Calibration:
    """The calibration record of an injected checkpoint.

    Attributes:
        combination: the rule and its settings the checkpoint runs by default.
        instance_count: ``C`` training instance counts (from the heads' store).
        heads: the trained heads, one per retrained stage (one stage-0 head for a single-stage
            detector; a cascade's stages without one keep the detector's classifier).
    """

    combination: Combination
    instance_count: tuple[int, ...]
    heads: tuple[CalibratedHead, ...]

    def __post_init__(self) -> None:
        if not isinstance(self.combination, Combination):
            raise ConfigError(f"calibration: combination must be a heads.combine.Combination, got {self.combination!r}")
        stages = [h.stage for h in self.heads]
        if not stages or len(set(stages)) != len(stages) or min(stages) < 0:
            raise CheckpointError(f"calibration record: heads of stages {stages}; one head per stage is required")
        if any(len(self.instance_count) != h.spec.num_classes for h in self.heads):
            raise CheckpointError("calibration record: instance counts and head classes differ; re-inject")

    @property
    def by_stage(self) -> dict[int, CalibratedHead]:
        return {h.stage: h for h in self.heads}

    def to_payload(self) -> dict:
        """The checkpoint's ``calibration`` entry: one stage-0 head in the flat layout earlier
        roicache versions wrote (and read), several in a ``heads`` list."""
        out = {"combination": self.combination.to_dict(), "instance_count": list(self.instance_count)}
        if len(self.heads) == 1 and self.heads[0].stage == 0:
            return {**out, **{k: v for k, v in self.heads[0].to_payload().items() if k != "stage"}}
        return {**out, "heads": [h.to_payload() for h in self.heads]}

    @classmethod
    def from_payload(cls, d: dict) -> "Calibration":
        """The record :meth:`to_payload` wrote, or one of an older roicache (see
        :func:`combination_of_record`); anything malformed is a :class:`CheckpointError`."""
        try:
            heads = tuple(CalibratedHead.from_payload(h) for h in d["heads"]) if "heads" in d else \
                (CalibratedHead.from_payload(d),)
            return cls(combination=combination_of_record(d), instance_count=tuple(int(v) for v in d["instance_count"]),
                       heads=heads)
        except (KeyError, TypeError, ValueError, ConfigError) as exc:
            raise CheckpointError(f"calibration record is malformed ({type(exc).__name__}: {exc}); re-inject the head") from None


def combination_of_record(d: dict) -> Combination:
    """The combination of a calibration record (checkpoint payload or mmdet config): the
    ``"combination"`` dict, or — records written before it — the top-level ``combine``, ``T``
    (number or ``"inf"``) and ``boundary`` keys, thr and scale_ratio then at their defaults."""
    if "combination" in d:
        return Combination.from_dict(d["combination"], where="calibration record")
    return Combination(rule=d["combine"], T=float(d["T"]), boundary=d["boundary"])


def injection_combination(*, head: Path, combine: str | None = None, **changes) -> Combination | Literal["replace"]:
    """What ``serve inject`` stores: ``replace``, or the head run's recorded ``[combine]`` with
    ``combine`` (a rule) and the ``changes`` given (T, boundary, thr, scale_ratio; None = recorded)."""
    if combine == REPLACE:
        return REPLACE
    if combine is not None and combine not in RULES:
        raise ConfigError(f"unknown combine scheme {combine!r}; choose from {', '.join(RULES)} or {REPLACE}")
    return recorded_combination(load_head(_head_path(head))[2]).override(rule=combine, **changes)


def _head_path(head: Path) -> Path:
    head = Path(head)
    return head / "head.pt" if head.is_dir() else head


def _check_head_fits(categories: tuple[dict, ...], ckpt: Path, head_meta: dict, spec: HeadSpec, head_path: Path) -> None:
    """Refuse a head trained from a store of another detector or class set."""
    store = head_meta.get("store") or {}
    sha = sha256_file(ckpt)
    if store.get("detector_sha256") not in (sha, None) or (spec.init_from not in (None, sha) and not store):
        raise CheckpointError(
            f"head {head_path} was trained on RoIs of another detector (sha256 {str(store.get('detector_sha256'))[:12]}…, "
            f"this checkpoint {sha[:12]}…); train it on a store extracted with {ckpt}"
        )
    # mmdet checkpoints record class names only (id None); their store was checked by name at extraction.
    ids = [None if c["id"] is None else int(c["id"]) for c in categories]
    if store.get("category_ids") is not None and None not in ids and list(store["category_ids"]) != ids:
        raise CheckpointError(f"head {head_path} was trained for another class set than {ckpt}; use a head from this detector's store")
    if spec.num_classes != len(ids):
        raise CheckpointError(f"head {head_path} has {spec.num_classes} classes, detector {ckpt} has {len(ids)}")


def _instance_counts(head_meta: dict, num_classes: int) -> tuple[int, ...]:
    counts = head_meta.get("instance_count")
    if counts is not None and len(counts) == num_classes:
        return tuple(int(v) for v in counts)
    train_json = (head_meta.get("store") or {}).get("train_annotation_path")
    if train_json and Path(train_json).is_file():
        return tuple(int(v) for v in class_statistics(load_annotations(Path(train_json))).instance_count)
    raise CheckpointError("the head does not record the training instance counts dual-head inference needs; "
                          "retrain it with this roicache version")


def _head_paths(head: Path | Sequence[Path]) -> tuple[Path, ...]:
    paths = (Path(head),) if isinstance(head, (str, Path)) else tuple(Path(h) for h in head)
    if not paths:
        raise ConfigError("give the head to inject with --head (once per retrained cascade stage)")
    return tuple(_head_path(p) for p in paths)


def _load_heads(paths: tuple[Path, ...], categories: tuple[dict, ...], ckpt: Path) -> list[tuple]:
    """(path, module, spec, meta, stage) of each head, checked to fit ``ckpt`` and to retrain
    distinct stages of one detector; a cascade averages stage logits, so softmax heads only."""
    loaded = []
    for path in paths:
        module, spec, meta = load_head(path)
        _check_head_fits(categories, ckpt, meta, spec, path)
        loaded.append((path, module, spec, meta, int(meta.get("stage", 0))))
    stages = [h[4] for h in loaded]
    if len(set(stages)) != len(stages):
        raise ConfigError(f"the heads retrain stages {stages}; give one head per cascade stage")
    cascade = max(int(h[3].get("num_stages", 1)) for h in loaded) > 1
    if cascade:
        for path, _, spec, _, _ in loaded:
            if spec.name != "ncm" and spec.loss in GUMBEL_LOSSES:
                raise CheckpointError(f"head {path} scores with a {spec.loss} activation; a cascade averages softmax "
                                      "logits over stages, so retrain its stage with a softmax loss")
    elif len(loaded) > 1:
        raise ConfigError(f"{len(loaded)} heads for a single-stage detector; inject one")
    return loaded


def inject(*, ckpt: Path, head: Path | Sequence[Path], out: Path,
           combination: Combination | Literal["replace"] | None = None, config: str | None = None,
           overwrite: bool = False) -> Path:
    """Write ``out``: ``ckpt`` with ``head`` injected under ``combination`` (``None``: the head
    run's recorded ``[combine]``) or, for :data:`REPLACE`, as the detector's classifier. A
    cascade takes one head per retrained stage (each records its stage); stages without one keep
    the detector's classifier.

    For an mmdet checkpoint and a dual-head rule, also ``out`` with suffix ``.py``: the model's
    config (``config``, else the checkpoint's own) running the rule inside mmdet
    (:mod:`serve.mmdet_dual`)."""
    ckpt, out = Path(ckpt), Path(out)
    paths = _head_paths(head)
    if combination is None:
        combination = injection_combination(head=paths[0])
    if combination != REPLACE and not isinstance(combination, Combination):
        raise ConfigError(f"combination must be a heads.combine.Combination or {REPLACE!r}, got {combination!r}")
    if out.resolve() == ckpt.resolve():
        raise ConfigError("--out must differ from --ckpt; the original checkpoint is kept untouched")
    check_output(out, kind="file", overwrite=overwrite)
    payload = read_checkpoint(ckpt)
    backend = backend_of(payload, ckpt)
    if CALIBRATION_KEY in payload:
        raise CheckpointError(f"{ckpt} already carries a calibrated head; inject into the original checkpoint")
    loaded = _load_heads(paths, backend.categories_of(payload), ckpt)
    if combination == REPLACE:
        new = payload
        for _, module, spec, _, stage in loaded:
            _check_replaceable(spec)
            new = backend.replace_classifier(new, weight=module.cls.weight, bias=module.cls.bias, stage=stage)
    else:
        first = loaded[0]
        calib = Calibration(combination=combination, instance_count=_instance_counts(first[3], first[2].num_classes),
                            heads=tuple(CalibratedHead(stage=stage, spec=spec, head_meta=meta,
                                                       state_dict={k: v.detach().cpu().clone()
                                                                   for k, v in module.state_dict().items()})
                                        for _, module, spec, meta, stage in loaded))
        new = {**payload, CALIBRATION_KEY: calib.to_payload()}
        if backend.backend == "mmdet":
            from extract.detectors.mmdet_config import require_mmdet, resolve_config

            require_mmdet()
            from serve.mmdet_dual import export_dual

            cfg, _ = resolve_config(payload, config, path=ckpt)
            new = export_dual(payload=new, calibration=calib, cfg=cfg, config_out=out.with_suffix(".py"))
    record = None if combination == REPLACE else combination.to_dict()
    new["meta"] = {**payload.get("meta", {}), "injected": {
        "head": str(paths[0]), "head_sha256": sha256_file(paths[0]),
        "heads": [{"path": str(p), "sha256": sha256_file(p), "stage": h[4]} for p, h in zip(paths, loaded)],
        "combine": REPLACE if record is None else record["rule"], "combination": record,
        "source_checkpoint_sha256": sha256_file(ckpt)}}
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_torch_save(new, out)
    return out


def _check_replaceable(spec: HeadSpec) -> None:
    """Only a softmax head that replaces the classifier layer alone can become a plain checkpoint."""
    if spec.name not in REPLACEABLE_HEADS:
        raise CheckpointError(
            f"--combine replace needs a head that replaces only the classifier layer ({', '.join(REPLACEABLE_HEADS)}); "
            f"{spec.name} changes the shared fcs the box regressor also reads — inject it with --combine sel instead"
        )
    if spec.loss in ("gumbel", "gol"):
        raise CheckpointError(f"--combine replace writes a softmax classifier; a {spec.loss}-trained head needs "
                              "roicache's scoring — inject it with --combine cal-only")


def read_calibration(payload: dict) -> Calibration | None:
    """The calibration record of a loaded checkpoint payload, or ``None`` for a plain detector."""
    record = payload.get(CALIBRATION_KEY)
    return None if record is None else Calibration.from_payload(record)

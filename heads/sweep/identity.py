"""Content addresses of a sweep's heads and trials.

A *train id* names one trained head: sha256 of the canonical JSON of what shapes its weights —
:func:`heads.config.training_identity` (sampler, loss, head, schedule, fasa, seed; plus the
``[eval]`` section when FASA is on, since FASA adapts from the val loss of ``eval.max_rois``
RoIs; plus ``eval.snapshots``, the heads its directory keeps) — and of the store it is trained
on (:func:`store_fingerprint`). A *trial id* adds what shapes the scores after training: the
``[combine]`` record and the evaluation settings (AP bins, evaluator). Trials that differ only in
post-training settings therefore share one head.

Ids are the first 16 hex digits (64 bits) of the digest: file names stay short and a collision
among a sweep's few hundred trials is out of reach.
"""

from __future__ import annotations

import hashlib
import json
import re

from cache_schema import Store
from cache_schema.errors import SchemaError
from heads.config import TrainConfig, config_to_dict, training_identity
from heads.pipeline import store_identity

ID_LENGTH = 16
_ID = re.compile(rf"^[0-9a-f]{{{ID_LENGTH}}}$")


def canonical_json(obj) -> str:
    """Sorted keys, no whitespace: equal records give equal text (the input of the digests).
    Non-finite floats must already be strings (``Combination.to_dict`` writes ``"inf"``)."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False)


def digest(obj) -> str:
    """First :data:`ID_LENGTH` hex digits of the sha256 of ``canonical_json(obj)``."""
    return hashlib.sha256(canonical_json(obj).encode()).hexdigest()[:ID_LENGTH]


def check_id(name: str, value: str) -> None:
    """Refuse ``value`` unless it looks like an id of this module (``name`` says which id)."""
    if not isinstance(value, str) or not _ID.match(value):
        raise SchemaError(f"{name} {value!r} is not a {ID_LENGTH}-digit hex id; the sweep directory is damaged, "
                          "rerun the sweep with --overwrite")


def _split_state(store: Store, name: str) -> dict:
    split = store.split(name)
    done = split.done()
    return {"images": int(split.num_images), "done": int(done.sum()), "rois": int(split.num_rois()[done].sum())}


def store_fingerprint(store: Store) -> dict:
    """What a result depends on about the store (plain JSON types): :func:`heads.pipeline.store_identity`
    (detector, classes, train annotations), the extraction settings with their creation time (so
    a re-extracted store is another store even with equal counts) and, per split, the image count,
    the finished images and their RoIs (so a store whose extraction went on is another store)."""
    extraction = store.meta.extraction.to_dict()
    return {"identity": store_identity(store), "extraction": extraction,
            "splits": {name: _split_state(store, name) for name in store.splits}}


def train_key(config: TrainConfig) -> dict:
    """The settings of ``config`` that shape the trained head's weights (store aside)."""
    key = {"training": training_identity(config)}
    if config.fasa.enabled:  # FASA's sampling adapts from the val loss on eval.max_rois RoIs
        key["eval"] = config_to_dict(config)["eval"]
    elif config.eval.snapshots:  # not the weights, but what the head directory keeps (plots read it)
        key["snapshots"] = list(config.eval.snapshots)
    return key


def score_key(config: TrainConfig, *, bins: str, evaluator: str) -> dict:
    """What shapes a trained head's scores: the ``[combine]`` record and the evaluation settings."""
    return {"combine": config.combine.to_dict(), "bins": bins, "evaluator": evaluator}


def trial_key(config: TrainConfig, *, bins: str, evaluator: str) -> dict:
    """:func:`train_key` plus :func:`score_key` (store aside): equal keys are the same trial."""
    return {**train_key(config), **score_key(config, bins=bins, evaluator=evaluator)}


def train_id(config: TrainConfig, fingerprint: dict) -> str:
    """The head's content address (directory name under ``DIR/heads``)."""
    return digest({"train": train_key(config), "store": fingerprint})


def trial_id(config: TrainConfig, head_id: str, *, bins: str, evaluator: str) -> str:
    """The trial's content address (file name under ``DIR/results``): its head's :func:`train_id`
    (``head_id``) plus :func:`score_key`."""
    return digest({"train_id": head_id, **score_key(config, bins=bins, evaluator=evaluator)})


__all__ = ["canonical_json", "digest", "check_id", "store_fingerprint", "train_key", "score_key", "trial_key", "train_id",
           "trial_id"]

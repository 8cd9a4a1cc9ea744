"""The detector's own classification head, copied into the store (group ``detector_head/``).

Why in the store: heads initialised from the detector (``3fc_ft``, ``last2fc``, ``lastfc``) must
train on any box that can read the store, without the detector checkpoint. Names are the
detector-neutral ones heads use: ``fc6.*``, ``fc7.*`` (the two shared fcs) and ``cls.*`` (the
classifier, rows in store order: classes ``0..C-1`` then background). A detector whose box
regression is class-specific also leaves its regressor here (``reg.*`` and the ``box_regression``
attribute; :class:`cache_schema.postprocess.BoxRegression`). A cascade's later stages keep
theirs in ``detector_head/stage<k>/``.
"""

from __future__ import annotations

import numpy as np

from cache_schema.errors import SchemaError
from cache_schema.postprocess import REG_KEYS, BoxRegression

GROUP = "detector_head"
HEAD_KEYS = ("fc6.weight", "fc6.bias", "fc7.weight", "fc7.bias", "cls.weight", "cls.bias")


def _group_path(stage: int) -> str:
    return GROUP if stage == 0 else f"{GROUP}/stage{int(stage)}"


def _root(target):
    """The root zarr group of ``target``: a Store (opened r+) or the root group itself (what
    ``create_store(extras=...)`` hands over while the store is being created)."""
    return getattr(target, "group", target)


def write_head_weights(store, state: dict[str, np.ndarray], *, stage: int = 0) -> None:
    """Write ``state`` (float32 arrays keyed by :data:`HEAD_KEYS`) of cascade stage ``stage`` (0
    for a single-stage detector) into ``store`` (a Store opened r+, or its root group)."""
    missing = [k for k in HEAD_KEYS if k not in state]
    if missing:
        raise SchemaError(f"detector head weights lack {missing}; the adapter must export {list(HEAD_KEYS)}")
    group = _root(store).require_group(_group_path(stage))
    for key in HEAD_KEYS:
        value = np.ascontiguousarray(state[key], dtype=np.float32)
        arr = group.create_array(name=key, shape=value.shape, chunks=value.shape, dtype=np.float32, overwrite=True)
        arr[...] = value


def read_head_weights(store, *, stage: int = 0) -> dict[str, np.ndarray]:
    """The detector head (of cascade stage ``stage``) copied at extraction; ``SchemaError`` when
    the store has none."""
    try:
        group = store.group[_group_path(stage)]
        return {key: np.asarray(group[key][...]) for key in HEAD_KEYS}
    except (KeyError, FileNotFoundError):
        raise SchemaError(
            f"store {store.path} holds no detector head weights; re-extract it with this roicache "
            "version, or choose a randomly initialised head (2fc_rand, 3fc_rand)"
        ) from None


def write_box_regression(store, reg: BoxRegression) -> None:
    """Write ``reg`` into ``store``'s ``detector_head/`` group (a Store opened r+, or its root group)."""
    group = _root(store).require_group(GROUP)
    for key, value in zip(REG_KEYS, (reg.weight, reg.bias)):
        arr = group.create_array(name=key, shape=value.shape, chunks=value.shape, dtype=np.float32, overwrite=True)
        arr[...] = value
    group.attrs["box_regression"] = reg.coder_dict()


def read_box_regression(store) -> BoxRegression | None:
    """The class-specific box regressor of the store's detector, or ``None`` when its regression
    is class-agnostic (then ``rois/reg_boxes`` is every class's box)."""
    try:
        group = store.group[GROUP]
        coder = dict(group.attrs["box_regression"])
        weight, bias = (np.asarray(group[key][...]) for key in REG_KEYS)
    except (KeyError, FileNotFoundError):
        return None
    return BoxRegression(weight=weight, bias=bias, **coder)

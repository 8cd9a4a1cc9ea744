"""The detector's own classification head, copied into the store (group ``detector_head/``).

Why in the store: heads initialised from the detector (``3fc_ft``, ``last2fc``, ``lastfc``) must
train on any box that can read the store, without the detector checkpoint. Names are the
detector-neutral ones heads use: ``fc6.*``, ``fc7.*`` (the two shared fcs) and ``cls.*`` (the
classifier, rows in store order: classes ``0..C-1`` then background).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cache_schema.errors import SchemaError

GROUP = "detector_head"
HEAD_KEYS = ("fc6.weight", "fc6.bias", "fc7.weight", "fc7.bias", "cls.weight", "cls.bias")


def write_head_weights(store, state: dict[str, np.ndarray]) -> None:
    """Write ``state`` (float32 arrays keyed by :data:`HEAD_KEYS`) into ``store`` (opened r+)."""
    missing = [k for k in HEAD_KEYS if k not in state]
    if missing:
        raise SchemaError(f"detector head weights lack {missing}; the adapter must export {list(HEAD_KEYS)}")
    group = store.group.require_group(GROUP)
    for key in HEAD_KEYS:
        value = np.ascontiguousarray(state[key], dtype=np.float32)
        arr = group.create_array(name=key, shape=value.shape, chunks=value.shape, dtype=np.float32, overwrite=True)
        arr[...] = value


def read_head_weights(store) -> dict[str, np.ndarray]:
    """The detector head copied at extraction; ``SchemaError`` when the store has none."""
    try:
        group = store.group[GROUP]
        return {key: np.asarray(group[key][...]) for key in HEAD_KEYS}
    except (KeyError, FileNotFoundError):
        raise SchemaError(
            f"store {store.path} holds no detector head weights; re-extract it with this roicache "
            "version, or choose a randomly initialised head (2fc_rand, 3fc_rand)"
        ) from None


# ---------------------------------------------------------------------------------------------
# Class-specific box regression (mmdetection's Shared2FCBBoxHead with reg_class_agnostic=False).
# A detector whose box regression is class-specific gives every (RoI, class) pair its own box.
# Storing those would cost 16·C bytes per RoI (19 KB at LVIS's 1,203 classes), so the store keeps
# the frozen regression layer instead, and cached evaluation recomputes the box of any pair from
# the RoI's stored ``fc`` feature — the same arithmetic the detector does.
REG_KEYS = ("reg.weight", "reg.bias")
CODERS = ("delta_xywh",)


@dataclass(frozen=True, kw_only=True)
class BoxRegression:
    """The frozen class-specific box regressor and its delta coder.

    Attributes:
        weight: float32 ``[4C, D]`` (rows ``4k..4k+3`` are class ``k``'s dx, dy, dw, dh).
        bias: float32 ``[4C]``.
        coder: ``"delta_xywh"`` (mmdet's ``DeltaXYWHBBoxCoder``): ``x = px + pw·dx``,
            ``w = pw·exp(dw)`` with deltas de-normalised as ``d·std + mean`` and ``dw, dh``
            clamped to ``±|log(wh_ratio_clip)|``, centre/size in mmdet's ``x2 - x1`` convention;
            the decoded box is clipped to the image.
        means, stds: the coder's 4 target means and standard deviations.
        wh_ratio_clip: the coder's ``wh_ratio_clip`` (mmdet default 16/1000).
    """

    weight: np.ndarray
    bias: np.ndarray
    coder: str = "delta_xywh"
    means: tuple[float, ...] = (0.0, 0.0, 0.0, 0.0)
    stds: tuple[float, ...] = (0.1, 0.1, 0.2, 0.2)
    wh_ratio_clip: float = 16 / 1000

    def __post_init__(self) -> None:
        if self.coder not in CODERS:
            raise SchemaError(f"box coder {self.coder!r} is not supported; supported: {', '.join(CODERS)}")
        w, b = np.asarray(self.weight), np.asarray(self.bias)
        if w.ndim != 2 or w.shape[0] % 4 or b.shape != (w.shape[0],):
            raise SchemaError(f"box regression weight {w.shape} / bias {b.shape} must be [4C, D] / [4C]")
        if len(self.means) != 4 or len(self.stds) != 4 or not 0.0 < self.wh_ratio_clip < 1.0:
            raise SchemaError("box coder needs 4 means, 4 stds and 0 < wh_ratio_clip < 1")
        object.__setattr__(self, "weight", np.ascontiguousarray(w, dtype=np.float32))
        object.__setattr__(self, "bias", np.ascontiguousarray(b, dtype=np.float32))
        object.__setattr__(self, "means", tuple(float(v) for v in self.means))
        object.__setattr__(self, "stds", tuple(float(v) for v in self.stds))

    @property
    def num_classes(self) -> int:
        return self.weight.shape[0] // 4

    def coder_dict(self) -> dict:
        return {"coder": self.coder, "means": list(self.means), "stds": list(self.stds),
                "wh_ratio_clip": float(self.wh_ratio_clip)}


def write_box_regression(store, reg: BoxRegression) -> None:
    """Write ``reg`` into ``store``'s ``detector_head/`` group (opened r+)."""
    group = store.group.require_group(GROUP)
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

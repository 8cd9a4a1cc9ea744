"""Class-specific boxes: each (RoI, class) box decoded from the RoI's ``fc`` feature and the
detector's frozen box regressor (:class:`cache_schema.head_init.BoxRegression`).

For a detector whose box regression is class-specific (mmdetection's ``Shared2FCBBoxHead`` with
``reg_class_agnostic=False``) the store keeps the regression layer, not ``C`` boxes per RoI. The box
of RoI ``r`` under class ``k`` is::

    d = fc[r] @ weight[4k:4k+4].T + bias[4k:4k+4]                  # dx, dy, dw, dh
    box = delta_xywh(proposal[r], d), clipped to [0, width] x [0, height]

with mmdet's ``delta2bbox`` arithmetic, step for step (:func:`delta_xywh_decode`). mmdet decodes in
the resized input frame and then divides by the scale factor; per-axis scaling commutes with every
step, so decoding the original-frame proposals (the store's ``rois/boxes``) gives the same boxes up
to float rounding (and to clipping at the original rather than the rounded resized size).

Decoding is per pair and on demand (:class:`ClassBoxes`): detection assembly asks only for the
candidates it looks at, never for all ``R x C`` boxes (19 MB per image at LVIS's 1,203 classes).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from cache_schema.errors import ConfigError
from cache_schema.postprocess import BoxRegression

#: Bytes of the ``[P, 4, D]`` float32 temporary one chunk of pairs may take.
_CHUNK_BYTES = 16 << 20


def delta_xywh_decode(*, proposals: torch.Tensor, deltas: torch.Tensor, means: tuple[float, ...],
                      stds: tuple[float, ...], wh_ratio_clip: float) -> torch.Tensor:
    """mmdet's ``delta2bbox`` (``DeltaXYWHBBoxCoder``, no centre clamp) without the clipping.

    Args:
        proposals: float32 ``[P, 4]`` xyxy boxes the deltas refine.
        deltas: float32 ``[P, 4]`` normalised (dx, dy, dw, dh).
        means, stds: the coder's 4 target means / standard deviations.
        wh_ratio_clip: ``dw, dh`` are clamped to ``±|log(wh_ratio_clip)|``.
    Returns:
        float32 ``[P, 4]`` xyxy boxes (same frame as ``proposals``).
    """
    denorm = deltas * deltas.new_tensor(stds) + deltas.new_tensor(means)
    dxy, dwh = denorm[:, :2], denorm[:, 2:]
    pxy = (proposals[:, :2] + proposals[:, 2:]) * 0.5
    pwh = proposals[:, 2:] - proposals[:, :2]  # mmdet: x2 - x1, no +1
    max_ratio = float(np.abs(np.log(wh_ratio_clip)))
    dwh = dwh.clamp(min=-max_ratio, max=max_ratio)
    gxy = pxy + pwh * dxy
    gwh = pwh * dwh.exp()
    return torch.cat([gxy - gwh * 0.5, gxy + gwh * 0.5], dim=-1)


def clip_to_image(boxes: torch.Tensor, image_size: tuple[int, int] | torch.Tensor) -> torch.Tensor:
    """``boxes`` float32 ``[..., 4]`` xyxy clamped to ``[0, width] x [0, height]``; ``image_size``
    is (height, width), or int ``[..., 2]`` per box (broadcast against ``boxes[..., 0]``)."""
    hw = torch.as_tensor(image_size, dtype=boxes.dtype)
    h, w = hw[..., 0:1], hw[..., 1:2]
    x = torch.minimum(boxes[..., 0::2].clamp(min=0), w)
    y = torch.minimum(boxes[..., 1::2].clamp(min=0), h)
    return torch.stack([x[..., 0], y[..., 0], x[..., 1], y[..., 1]], dim=-1)


class BoxDecoder:
    """A :class:`BoxRegression` as torch tensors, decoding (RoI, class) pairs.

    Attributes:
        weight: float32 ``[C, 4, D]``; bias: float32 ``[C, 4]``; num_classes ``C``; dim ``D``.
    """

    def __init__(self, reg: BoxRegression) -> None:
        self.reg = reg
        self.num_classes, self.dim = reg.num_classes, int(reg.weight.shape[1])
        self.weight = torch.from_numpy(reg.weight).view(self.num_classes, 4, self.dim)
        self.bias = torch.from_numpy(reg.bias).view(self.num_classes, 4)

    def check_features(self, fc: torch.Tensor, what: str = "fc") -> None:
        if fc.ndim != 2 or fc.shape[1] != self.dim:
            raise ConfigError(f"{what} has shape {tuple(fc.shape)}; the box regressor reads [N, {self.dim}] fc features "
                              "(load the store's 'fc' level)")

    def pair_deltas(self, fc: torch.Tensor, rows: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        """float32 ``[P, 4]`` deltas of pairs ``(rows[p], classes[p])`` of ``fc`` ``[R, D]``.

        Each pair is an elementwise product summed over ``D``, in chunks: the value of a pair
        does not depend on which other pairs are decoded with it (so a box is the same whichever
        candidate window asked for it)."""
        out = torch.empty((rows.shape[0], 4), dtype=torch.float32)
        step = max(1, _CHUNK_BYTES // (16 * self.dim))
        for a in range(0, rows.shape[0], step):
            r, k = rows[a:a + step], classes[a:a + step]
            out[a:a + step] = (self.weight[k] * fc[r].float()[:, None, :]).sum(-1) + self.bias[k]
        return out

    def pair_boxes(self, *, fc: torch.Tensor, proposals: torch.Tensor, rows: torch.Tensor,
                   classes: torch.Tensor) -> torch.Tensor:
        """float32 ``[P, 4]`` unclipped boxes of pairs ``(rows[p], classes[p])``."""
        deltas = self.pair_deltas(fc, rows, classes)
        reg = self.reg
        return delta_xywh_decode(proposals=proposals[rows].float(), deltas=deltas, means=reg.means, stds=reg.stds,
                                 wh_ratio_clip=reg.wh_ratio_clip)


def decode_class_boxes(*, fc: torch.Tensor, proposals: torch.Tensor, image_size: tuple[int, int] | torch.Tensor | None,
                       reg: BoxRegression | BoxDecoder, rows: torch.Tensor | None = None,
                       classes: torch.Tensor | None = None) -> torch.Tensor:
    """Class-specific boxes, float32, xyxy, in the frame of ``proposals``.

    Args:
        fc: float16/32 ``[R, D]`` the RoIs' ``fc`` features (the regressor's input).
        proposals: float32 ``[R, 4]`` the RoIs' proposal boxes (store ``rois/boxes``), xyxy.
        image_size: (height, width) of the image (all RoIs), int ``[R, 2]`` per RoI, or None
            (no clipping).
        reg: the store's regressor (or a :class:`BoxDecoder` built from it once).
        rows, classes: int64 ``[P]`` pairs to decode; both None: every pair.
    Returns:
        ``[P, 4]`` for the pairs, or ``[R, C, 4]`` for every pair (row-major: RoI, then class).
    """
    dec = reg if isinstance(reg, BoxDecoder) else BoxDecoder(reg)
    dec.check_features(fc)
    if proposals.shape != (fc.shape[0], 4):
        raise ConfigError(f"proposals has shape {tuple(proposals.shape)}; expected [{fc.shape[0]}, 4] xyxy, one per fc row")
    if (rows is None) != (classes is None):
        raise ConfigError("decode_class_boxes: give rows and classes together (the pairs), or neither (every pair)")
    every = rows is None
    if every:
        r, c = fc.shape[0], dec.num_classes
        rows = torch.arange(r).repeat_interleave(c)
        classes = torch.arange(c).repeat(r)
    rows, classes = torch.as_tensor(rows, dtype=torch.int64), torch.as_tensor(classes, dtype=torch.int64)
    if rows.shape != classes.shape or rows.ndim != 1:
        raise ConfigError(f"rows {tuple(rows.shape)} and classes {tuple(classes.shape)} must be equal-length int vectors")
    boxes = dec.pair_boxes(fc=fc, proposals=proposals, rows=rows, classes=classes)
    if image_size is not None:
        size = torch.as_tensor(image_size)
        boxes = clip_to_image(boxes, size[rows] if size.ndim == 2 else size)
    return boxes.view(fc.shape[0], dec.num_classes, 4) if every else boxes


@dataclass(frozen=True, eq=False, kw_only=True)
class ClassBoxes:
    """One image's class-specific boxes, decoded on demand (what detection assembly takes in
    place of a ``[R, C, 4]`` tensor).

    Attributes:
        decoder: the store's regressor; fc: ``[R, D]`` the image's RoI features;
        proposals: float32 ``[R, 4]`` the image's proposal boxes, xyxy, original-image pixels.
    """

    decoder: BoxDecoder
    fc: torch.Tensor
    proposals: torch.Tensor

    def __post_init__(self) -> None:
        self.decoder.check_features(self.fc)
        if self.proposals.shape != (self.fc.shape[0], 4):
            raise ConfigError(f"proposals has shape {tuple(self.proposals.shape)}; expected [{self.fc.shape[0]}, 4]")

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(R, C, 4)``, the shape of the tensor this stands for."""
        return (int(self.fc.shape[0]), self.decoder.num_classes, 4)

    def boxes_of(self, rows: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        """float32 ``[P, 4]`` unclipped boxes of the pairs."""
        return self.decoder.pair_boxes(fc=self.fc, proposals=self.proposals, rows=rows, classes=classes)

    def never_inverted(self) -> bool:
        """Every decoded box has ``x2 >= x1`` and ``y2 >= y1`` (so clipped sizes are >= 0): the
        width is ``pw * exp(dw)`` with the proposal's ``pw``, so it holds when every proposal does."""
        p = self.proposals
        return bool(((p[:, 2] >= p[:, 0]) & (p[:, 3] >= p[:, 1])).all()) and bool(torch.isfinite(self.fc).all())


@dataclass(frozen=True, eq=False, kw_only=True)
class DenseClassBoxes:
    """Class-specific boxes already materialised: float ``[R, C, 4]`` xyxy."""

    boxes: torch.Tensor

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.boxes.shape)  # type: ignore[return-value]

    def boxes_of(self, rows: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        return self.boxes[rows, classes].float()

    def never_inverted(self) -> bool:
        b = self.boxes
        return bool(((b[..., 2] >= b[..., 0]) & (b[..., 3] >= b[..., 1])).all())


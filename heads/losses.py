"""Classification losses for RoI heads (DESIGN.md §3; SimCal supp. G.3; GOL supplement).

Every loss reads logits float32 ``[N, C+1]`` (classes ``0..C-1``, background last) and int64
labels ``[N]`` in ``0..C``. The math lives in pure functions; the classes in :data:`LOSSES` only
bind per-class constants (computed once from :class:`~cache_schema.records.ClassInfo`) and add
the two hooks the rest of the code needs:

- ``scores(logits) -> probs [N, C+1]`` — softmax for softmax-type losses, Gumbel η for
  ``gumbel``/``gol`` (see :func:`gumbel_scores` for the background column);
- ``init_classifier(linear, num_classes)`` — the classifier initialisation the loss needs (only
  Gumbel-type losses change anything).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from cache_schema.errors import ConfigError
from cache_schema.records import ClassInfo

# ----------------------------------------------------------------------------- pure functions


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean softmax cross entropy over RoIs (SimCal eq. 1)."""
    return F.cross_entropy(logits, labels)


def reweighted_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, *, class_weights: torch.Tensor) -> torch.Tensor:
    """``mean_i( -w_{y_i} log p_{y_i} )``; ``class_weights`` float32 ``[C+1]``. Averaged over RoIs
    (not over the weights' sum) so the weights scale the loss as the paper writes it."""
    return (class_weights[labels] * F.cross_entropy(logits, labels, reduction="none")).mean()


def focal_loss(logits: torch.Tensor, labels: torch.Tensor, *, gamma: float, alpha: float) -> torch.Tensor:
    """Softmax focal loss over C+1 classes: ``mean_i( -alpha (1 - p_t)^gamma log p_t )``."""
    log_pt = F.log_softmax(logits, dim=1).gather(1, labels[:, None]).squeeze(1)
    return (-alpha * (1.0 - log_pt.exp()).pow(gamma) * log_pt).mean()


def margin_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, *, margins: torch.Tensor) -> torch.Tensor:
    """Class-aware margin (LDAM): ``-log e^{y_z - Δ_z} / (e^{y_z - Δ_z} + Σ_{c≠z} e^{y_c})``;
    ``margins`` float32 ``[C+1]`` (background 0)."""
    shifted = logits - F.one_hot(labels, logits.shape[1]).to(logits.dtype) * margins[labels][:, None]
    return F.cross_entropy(shifted, labels)


def gumbel_activation(logits: torch.Tensor, *, sigma: float = 1.0) -> torch.Tensor:
    """η(q) = exp(-exp(-q/σ)), elementwise (no clipping: inference)."""
    return torch.exp(-torch.exp(-logits / sigma))


def gumbel_elementwise_bce(logits: torch.Tensor, targets: torch.Tensor, *, sigma: float,
                           clip: tuple[float, float]) -> torch.Tensor:
    """Binary CE of η(q) against 0/1 ``targets``, elementwise, q clipped to ``clip`` first.

    Exact forms instead of ``log(η)``: ``-log η = exp(-q/σ)`` and
    ``-log(1-η) = -log(-expm1(-exp(-q/σ)))`` stay finite over the whole clip range.
    """
    z = logits.clamp(clip[0], clip[1]) / sigma
    e = torch.exp(-z)
    neg = -torch.log(-torch.expm1(-e))
    return targets * e + (1.0 - targets) * neg


def _binary_targets(labels: torch.Tensor, width: int, dtype: torch.dtype) -> torch.Tensor:
    return F.one_hot(labels, width).to(dtype)


def gumbel_loss(logits: torch.Tensor, labels: torch.Tensor, *, sigma: float = 1.0,
                clip: tuple[float, float] = (-4.0, 10.0), train_background: bool = True,
                weights: torch.Tensor | None = None) -> torch.Tensor:
    """Gumbel binary CE summed over classes, averaged over RoIs (GOL eq. 4 with w = 1).

    ``train_background=True`` also fits the background column as an "is background" binary
    output; ``False`` (the GOL code, which has no background channel) leaves it out, so a
    background RoI is all-negative over the C classes. ``weights`` ``[N, C+1]`` multiply the
    elementwise terms (DropLoss).
    """
    c1 = logits.shape[1]
    per = gumbel_elementwise_bce(logits, _binary_targets(labels, c1, logits.dtype), sigma=sigma, clip=clip)
    if weights is not None:
        per = per * weights
    if not train_background:
        per = per[:, : c1 - 1]
    return per.sum() / max(1, logits.shape[0])


def droploss_weights(labels: torch.Tensor, *, tail: torch.Tensor, generator: torch.Generator | None,
                     background_mode: str = "code", frequent: torch.Tensor | None = None) -> torch.Tensor:
    """DropLoss weights w ``[N, C+1]`` (GOL supp. eq. 5-6), background column always 1.

    - foreground RoI: ``w_j = 1 - T(j)(1 - y_j)`` — negatives of tail classes dropped;
    - background RoI: tail-class negatives kept with probability μ = share of the batch's
      foreground RoIs whose class is tail (``background_mode="code"``, the DropLoss/GOL code;
      other classes always kept). ``"paper"`` also draws non-tail classes, with
      μ = share of foreground RoIs whose class is ``frequent`` (eq. 6). A batch without foreground
      keeps everything (the code's NaN ratio behaves so).
    ``tail`` / ``frequent``: bool ``[C]``.
    """
    n, c = labels.shape[0], tail.shape[0]
    fg = labels < c
    w = torch.ones(n, c + 1, device=labels.device)
    t = tail.to(w.dtype)
    y = F.one_hot(labels, c + 1)[:, :c].to(w.dtype)
    w[fg, :c] = 1.0 - t[None, :] * (1.0 - y[fg])
    n_bg, n_fg = int((~fg).sum()), int(fg.sum())
    if n_bg == 0 or n_fg == 0:
        return w
    mu_tail = tail[labels[fg]].float().mean()
    mu = torch.where(tail, mu_tail, torch.ones((), device=labels.device))
    if background_mode == "paper":
        if frequent is None:
            raise ConfigError("gol background_mode='paper' needs the frequent-class mask")
        mu = torch.where(tail, mu_tail, frequent[labels[fg]].float().mean())
    u = torch.rand(n_bg, c, generator=generator, device=labels.device)
    w[~fg, :c] = (u < mu[None, :]).to(w.dtype)
    return w


def gol_loss(logits: torch.Tensor, labels: torch.Tensor, *, tail: torch.Tensor, generator: torch.Generator | None,
             sigma: float = 1.0, clip: tuple[float, float] = (-4.0, 10.0), train_background: bool = True,
             background_mode: str = "code", frequent: torch.Tensor | None = None,
             clamp_max: float = 0.0) -> torch.Tensor:
    """Gumbel Optimised Loss: Gumbel binary CE with DropLoss weights; the reduced loss clamped to
    ``[0, clamp_max]`` when ``clamp_max > 0`` (GOL code uses 20; paper: no clamp)."""
    w = droploss_weights(labels, tail=tail, generator=generator, background_mode=background_mode, frequent=frequent)
    loss = gumbel_loss(logits, labels, sigma=sigma, clip=clip, train_background=train_background, weights=w)
    return loss.clamp(0.0, clamp_max) if clamp_max > 0 else loss


def gumbel_scores(logits: torch.Tensor, *, sigma: float = 1.0, background: str = "learned") -> torch.Tensor:
    """Probabilities ``[N, C+1]`` of a Gumbel head: η per class column. Background column:
    ``"learned"`` — η of the trained background output; ``"product"`` — Π_j (1 - η_j), the
    probability that no class fires when the C outputs are read as independent binaries (for
    heads trained with ``train_background=False``, whose background output is untrained)."""
    eta = gumbel_activation(logits, sigma=sigma)
    if background == "learned":
        return eta
    if background == "product":
        bg = torch.exp(torch.log1p(-eta[:, :-1].clamp(max=1 - 1e-7)).sum(1, keepdim=True))
        return torch.cat([eta[:, :-1], bg], dim=1)
    raise ConfigError(f"unknown background score {background!r}; valid: learned, product")


def softmax_scores(logits: torch.Tensor) -> torch.Tensor:
    return F.softmax(logits, dim=1)


def gumbel_init(linear: torch.nn.Linear, num_classes: int) -> None:
    """GOL init: W = 0.001, b = -log(log(C+1)) (C classes + background outputs), so the initial
    total gradient is ≈ 0 (GOL supp. eq. 2)."""
    with torch.no_grad():
        linear.weight.fill_(0.001)
        linear.bias.fill_(-math.log(math.log(num_classes + 1)))


# ----------------------------------------------------------------------------- plug-in classes


class _SoftmaxLoss:
    activation = "softmax"
    background_score = "learned"

    def scores(self, logits: torch.Tensor) -> torch.Tensor:
        return softmax_scores(logits)

    def init_classifier(self, linear: torch.nn.Linear, num_classes: int) -> bool:
        """Softmax losses keep the head's own init; returns whether anything changed."""
        return False

    def to(self, device: torch.device | str) -> "_SoftmaxLoss":
        for k, v in vars(self).items():
            if isinstance(v, torch.Tensor):
                setattr(self, k, v.to(device))
        return self


class CrossEntropy(_SoftmaxLoss):
    name = "ce"

    def __init__(self, *, class_info: ClassInfo) -> None:
        del class_info

    def __call__(self, logits, labels, *, generator=None):
        return cross_entropy(logits, labels)


class Reweighted(_SoftmaxLoss):
    """w_j = clamp(N / N_j, lo, hi); background weight separate (SimCal: N=100, [0.1, 10], bg 1)."""

    name = "reweight"

    def __init__(self, *, class_info: ClassInfo, base: float = 100.0, min_weight: float = 0.1,
                 max_weight: float = 10.0, background_weight: float = 1.0) -> None:
        counts = class_info.instance_count.astype(np.float64)
        w = np.clip(base / np.maximum(counts, 1e-12), min_weight, max_weight)
        self.class_weights = torch.tensor(np.append(w, background_weight), dtype=torch.float32)

    def __call__(self, logits, labels, *, generator=None):
        return reweighted_cross_entropy(logits, labels, class_weights=self.class_weights)


class Focal(_SoftmaxLoss):
    name = "focal"

    def __init__(self, *, class_info: ClassInfo, gamma: float = 3.0, alpha: float = 0.5) -> None:
        del class_info
        self.gamma, self.alpha = float(gamma), float(alpha)

    def __call__(self, logits, labels, *, generator=None):
        return focal_loss(logits, labels, gamma=self.gamma, alpha=self.alpha)


class Margin(_SoftmaxLoss):
    """Δ_j = C_m / N_j^{1/4} (C_m = 6.0); a class without training instances gets Δ = C_m."""

    name = "margin"

    def __init__(self, *, class_info: ClassInfo, c: float = 6.0) -> None:
        counts = np.maximum(class_info.instance_count.astype(np.float64), 1.0)
        self.margins = torch.tensor(np.append(c / counts ** 0.25, 0.0), dtype=torch.float32)

    def __call__(self, logits, labels, *, generator=None):
        return margin_cross_entropy(logits, labels, margins=self.margins)


class Gumbel(_SoftmaxLoss):
    name = "gumbel"
    activation = "gumbel"

    def __init__(self, *, class_info: ClassInfo, sigma: float = 1.0, clip: tuple[float, float] = (-4.0, 10.0),
                 train_background: bool = True) -> None:
        del class_info
        if sigma <= 0 or clip[0] >= clip[1]:
            raise ConfigError("gumbel loss needs sigma > 0 and clip_min < clip_max")
        self.sigma, self.clip, self.train_background = float(sigma), (float(clip[0]), float(clip[1])), train_background
        self.background_score = "learned" if train_background else "product"

    def __call__(self, logits, labels, *, generator=None):
        return gumbel_loss(logits, labels, sigma=self.sigma, clip=self.clip, train_background=self.train_background)

    def scores(self, logits: torch.Tensor) -> torch.Tensor:
        return gumbel_scores(logits, sigma=self.sigma, background=self.background_score)

    def init_classifier(self, linear: torch.nn.Linear, num_classes: int) -> bool:
        gumbel_init(linear, num_classes)
        return True


class GumbelOptimised(Gumbel):
    """GOL = Gumbel + DropLoss. Tail classes: ``tail_by="image_frequency"`` (paper and code:
    image-count / #train images < λ, λ = 0.0011 in the GOL configs) or ``"group"`` (LVIS
    frequency 'r')."""

    name = "gol"

    def __init__(self, *, class_info: ClassInfo, num_train_images: int, sigma: float = 1.0,
                 clip: tuple[float, float] = (-4.0, 10.0), train_background: bool = True, lam: float = 0.0011,
                 tail_by: str = "image_frequency", background_mode: str = "code", clamp_max: float = 0.0) -> None:
        super().__init__(class_info=class_info, sigma=sigma, clip=clip, train_background=train_background)
        if tail_by == "image_frequency":
            tail = class_info.image_count / max(1, num_train_images) < lam
        elif tail_by == "group":
            tail = np.array([f == "r" for f in class_info.frequency])
        else:
            raise ConfigError(f"gol tail_by={tail_by!r} is unknown; valid: image_frequency, group")
        if background_mode not in ("code", "paper"):
            raise ConfigError(f"gol background_mode={background_mode!r} is unknown; valid: code, paper")
        self.tail = torch.as_tensor(np.asarray(tail, dtype=bool))
        self.frequent = torch.as_tensor(np.array([f == "f" for f in class_info.frequency]))
        self.background_mode, self.clamp_max = background_mode, float(clamp_max)

    def __call__(self, logits, labels, *, generator=None):
        return gol_loss(logits, labels, tail=self.tail, generator=generator, sigma=self.sigma, clip=self.clip,
                        train_background=self.train_background, background_mode=self.background_mode,
                        frequent=self.frequent, clamp_max=self.clamp_max)


#: Config name -> loss class.
LOSSES: dict[str, type] = {
    "ce": CrossEntropy,
    "reweight": Reweighted,
    "focal": Focal,
    "margin": Margin,
    "gumbel": Gumbel,
    "gol": GumbelOptimised,
}

#: Losses whose scores are Gumbel η rather than softmax.
GUMBEL_LOSSES = ("gumbel", "gol")

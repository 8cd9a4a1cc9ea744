"""FASA — Feature Augmentation and Sampling Adaptation (seed 003 §3; DESIGN.md §3), as a
training plug-in on the classifier's input (the head's ``embed`` output, as the FASA code does
on the 1,024-d input of ``fc_cls``).

  (1) online class statistics from the batch's real foreground features (detached):
      μ_c ← (1-m) μ_c + m μ_c^t,  σ_c ← (1-m) σ_c + m σ_c^t,  m = 0.1; a class's first batch
      sets them directly (FASA code);
  (2) virtual features x̂_c = μ_c + σ_c ⊙ ε, ε ~ N(0, I): each step, one per class with
      probability p_c (FASA code), passed through the classifier only, loss weight 0.1, from
      the second adaptation period on ("from the second epoch");
  (3) p_c = s_c (1/N_c) / Σ_c (1/N_c), s_c = 1 at start (inverse class frequency);
  (4) every ``period`` steps ("epoch"), classes are grouped by their statistics and, per group,
      if the mean validation loss of its classes (val classes only; each class weighted equally,
      i.e. class-balanced like the paper's RFS-balanced val set) went down since the previous
      period, p ← min(1, α p), else p ← max(0, β p); α = 1.1, β = 0.9. Classes without val RoIs
      follow their group.
Grouping: the paper uses density clustering (DBSCAN/mean-shift) on the Fisher distance
d_ij = mean_d (μ_i − μ_j)² / (σ_i² + σ_j²); we use k-medoids on the same distance (``num_groups``
groups, seeded), which needs no density bandwidth to tune. Validation "loss" is −log of the
head's score for the true class (CE for softmax heads).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from cache_schema.errors import ConfigError
from heads.samplers import step_rng

_STREAM_GROUPS = 11


def fisher_distance(mean: torch.Tensor, std: torch.Tensor, *, chunk: int = 32) -> torch.Tensor:
    """``[k, k]`` matrix of mean_d (μ_i − μ_j)² / (σ_i² + σ_j²) for ``mean``/``std`` ``[k, D]``."""
    var = std.double() ** 2
    mean = mean.double()
    out = torch.empty(len(mean), len(mean), dtype=torch.float64, device=mean.device)
    for i in range(0, len(mean), chunk):
        diff = (mean[i:i + chunk, None] - mean[None]) ** 2
        out[i:i + chunk] = (diff / (var[i:i + chunk, None] + var[None] + 1e-12)).mean(-1)
    return out


def kmedoids(dist: np.ndarray, *, num_groups: int, rng: np.random.Generator, iters: int = 30) -> np.ndarray:
    """Cluster ``k`` items given their ``[k, k]`` distances; returns group ids ``[k]`` (0-based).
    Init: a random first medoid, then repeatedly the item farthest from the chosen medoids."""
    k = len(dist)
    g = max(1, min(num_groups, k))
    medoids = [int(rng.integers(k))]
    while len(medoids) < g:
        medoids.append(int(np.argmax(dist[:, medoids].min(1))))
    medoids = np.array(medoids)
    for _ in range(iters):
        assign = np.argmin(dist[:, medoids], axis=1)
        new = medoids.copy()
        for j in range(g):
            members = np.flatnonzero(assign == j)
            if len(members):
                new[j] = members[np.argmin(dist[np.ix_(members, members)].sum(1))]
        if np.array_equal(new, medoids):
            break
        medoids = new
    return np.argmin(dist[:, medoids], axis=1).astype(np.int64)


class FeatureAugmenter:
    """FASA state and steps for one training run (all tensors on ``device``)."""

    def __init__(self, *, num_classes: int, dim: int, instance_count: np.ndarray, seed: int,
                 device: torch.device, momentum: float = 0.1, loss_weight: float = 0.1, period: int = 500,
                 alpha: float = 1.1, beta: float = 0.9, num_groups: int = 8) -> None:
        if not 0 < momentum <= 1 or loss_weight < 0 or period <= 0 or alpha < 1 or not 0 < beta <= 1:
            raise ConfigError("fasa needs 0 < momentum <= 1, loss_weight >= 0, period > 0, alpha >= 1, 0 < beta <= 1")
        self.num_classes, self.seed = num_classes, int(seed)
        self.momentum, self.loss_weight, self.period = float(momentum), float(loss_weight), int(period)
        self.alpha, self.beta, self.num_groups = float(alpha), float(beta), int(num_groups)
        inv = 1.0 / np.maximum(instance_count.astype(np.float64), 1.0)                           # (3)
        self.mean = torch.zeros(num_classes, dim, device=device)
        self.std = torch.zeros(num_classes, dim, device=device)
        self.seen = torch.zeros(num_classes, dtype=torch.bool, device=device)
        self.p = torch.tensor(inv / inv.sum(), dtype=torch.float32, device=device)
        self.groups = torch.full((num_classes,), -1, dtype=torch.int64)
        self.prev_val_loss = torch.full((num_classes,), float("nan"), dtype=torch.float64)
        self.adaptations = 0

    @torch.no_grad()
    def update(self, emb: torch.Tensor, labels: torch.Tensor) -> None:
        """(1) fold the batch's foreground features ``emb`` ``[n, D]`` into μ, σ."""
        fg = labels < self.num_classes
        if not bool(fg.any()):
            return
        x, y = emb[fg].float(), labels[fg]
        count = torch.bincount(y, minlength=self.num_classes).float()
        present = count > 0
        s1 = torch.zeros_like(self.mean).index_add_(0, y, x)
        s2 = torch.zeros_like(self.mean).index_add_(0, y, x * x)
        mu_t = s1[present] / count[present, None]
        sd_t = (s2[present] / count[present, None] - mu_t ** 2).clamp(min=0).sqrt()
        first = present & ~self.seen
        m = torch.where(first[present], 1.0, self.momentum)[:, None]
        self.mean[present] = (1 - m) * self.mean[present] + m * mu_t
        self.std[present] = (1 - m) * self.std[present] + m * sd_t
        self.seen |= present

    def sample(self, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """(2) virtual features ``[k, D]`` and their labels ``[k]``: class c with probability p_c."""
        u = torch.rand(self.num_classes, generator=generator, device=self.p.device)
        classes = torch.nonzero(self.seen & (u < self.p)).flatten()
        eps = torch.randn(len(classes), self.mean.shape[1], generator=generator, device=self.p.device)
        return self.mean[classes] + self.std[classes] * eps, classes

    def loss(self, head: nn.Module, loss_fn, x: torch.Tensor, y: torch.Tensor, *, step: int,
             generator: torch.Generator) -> torch.Tensor:
        """Loss on the real batch plus, from step ``period`` on, ``loss_weight`` × loss of the virtual batch."""
        emb = head.embed(x)
        loss = loss_fn(head.cls(emb), y, generator=generator)
        self.update(emb.detach(), y)
        if step >= self.period and self.loss_weight > 0:
            vx, vy = self.sample(generator)
            if len(vy):
                loss = loss + self.loss_weight * loss_fn(head.cls(vx), vy, generator=generator)
        return loss

    def adapt(self, val_loss: torch.Tensor) -> dict:
        """(4) regroup classes and rescale p per group. ``val_loss`` float64 ``[C]``, NaN where a
        class has no val RoI. Returns a summary for the log."""
        seen = torch.nonzero(self.seen).flatten().cpu()
        groups = torch.full((self.num_classes,), -1, dtype=torch.int64)
        if len(seen):
            dist = fisher_distance(self.mean[seen.to(self.mean.device)], self.std[seen.to(self.std.device)])
            rng = step_rng(self.seed, _STREAM_GROUPS, self.adaptations)
            groups[seen] = torch.from_numpy(kmedoids(dist.cpu().numpy(), num_groups=self.num_groups, rng=rng))
        up = down = 0
        p = self.p.cpu().double()
        for g in range(int(groups.max()) + 1):
            members = groups == g
            now = val_loss[members]
            before = self.prev_val_loss[members]
            both = ~torch.isnan(now) & ~torch.isnan(before)
            if not bool(both.any()):
                continue
            if now[both].mean() < before[both].mean():
                p[members] = (p[members] * self.alpha).clamp(max=1.0)
                up += 1
            else:
                p[members] = (p[members] * self.beta).clamp(min=0.0)
                down += 1
        self.p = p.float().to(self.p.device)
        self.groups, self.prev_val_loss = groups, val_loss.double().cpu().clone()
        self.adaptations += 1
        return {"fasa_groups": int(groups.max()) + 1, "fasa_up": up, "fasa_down": down,
                "fasa_p_sum": float(self.p.sum())}

    def state_dict(self) -> dict:
        return {"mean": self.mean.cpu(), "std": self.std.cpu(), "seen": self.seen.cpu(), "p": self.p.cpu(),
                "groups": self.groups, "prev_val_loss": self.prev_val_loss, "adaptations": self.adaptations}

    def load_state_dict(self, state: dict) -> None:
        dev = self.mean.device
        self.mean, self.std = state["mean"].to(dev), state["std"].to(dev)
        self.seen, self.p = state["seen"].to(dev), state["p"].to(dev)
        self.groups, self.prev_val_loss = state["groups"], state["prev_val_loss"]
        self.adaptations = int(state["adaptations"])

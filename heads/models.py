"""Classification heads trained on cached RoI features, and their self-describing files.

Heads (plain dict :data:`HEADS`, each built from a :class:`HeadSpec`):

=========  ========  ===================================================================
name       level     layers (trainable unless noted), init
=========  ========  ===================================================================
3fc_ft     pooled    fc6 → fc7 → cls, all three from the detector's box head (SimCal best)
2fc_rand   pooled    fc6 → cls, random init
3fc_rand   pooled    fc6 → fc7 → cls, random init
last2fc    pooled    fc6 (frozen detector copy) → fc7 → cls, fc7/cls from the detector
lastfc     fc        cls from the detector (input is the cached fc7 output)
ncm        fc        nearest class mean; no gradient training (one pass, :func:`fit_ncm`)
=========  ========  ===================================================================

Detector weights come as ``{"fc6.weight", "fc6.bias", "fc7.weight", "fc7.bias", "cls.weight",
"cls.bias"}`` with cls rows ordered ``[class 0..C-1, background]``; parameter names here are
the same, so a trained head maps back onto the detector one to one.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from cache_schema.errors import CheckpointError, ConfigError
from heads.losses import GUMBEL_LOSSES, LOSSES, gumbel_scores, softmax_scores

HEAD_FORMAT = "roicache.head"
HEAD_FORMAT_VERSION = 1


@dataclass(frozen=True, kw_only=True)
class HeadSpec:
    """Everything needed to rebuild a head and turn its logits into scores.

    Attributes:
        name: key of :data:`HEADS`.
        level: store feature level it reads, ``"pooled"`` or ``"fc"``.
        in_shape: per-RoI input shape, e.g. ``(64, 7, 7)`` or ``(1024,)``.
        num_classes: ``C`` (outputs are ``C+1``, background last).
        hidden: width of the hidden fc layers (0 for heads without hidden layers).
        loss: key of :data:`heads.losses.LOSSES` it was trained with.
        init_from: sha256 of the detector checkpoint it was initialised from, or ``None``.
        gumbel_sigma: σ of the Gumbel activation (Gumbel-type losses only).
        background_score: ``"learned"`` or ``"product"`` (see :func:`heads.losses.gumbel_scores`).
        ncm_metric / ncm_scale: ``"cosine"`` or ``"euclidean"``, and the logit scale (ncm only).
    """

    name: str
    level: str
    in_shape: tuple[int, ...]
    num_classes: int
    hidden: int
    loss: str
    init_from: str | None = None
    gumbel_sigma: float = 1.0
    background_score: str = "learned"
    ncm_metric: str = "cosine"
    ncm_scale: float = 16.0

    def __post_init__(self) -> None:
        if self.name not in HEADS:
            raise ConfigError(f"unknown head {self.name!r}; valid: {', '.join(HEADS)}")
        if self.level != HEADS[self.name].level:
            raise ConfigError(f"head {self.name} reads level {HEADS[self.name].level!r}, not {self.level!r}")
        if self.loss not in LOSSES:
            raise ConfigError(f"unknown loss {self.loss!r}; valid: {', '.join(LOSSES)}")
        if self.num_classes <= 0 or not self.in_shape or any(s <= 0 for s in self.in_shape):
            raise ConfigError(f"head spec: bad num_classes={self.num_classes} or in_shape={self.in_shape}")
        if self.ncm_metric not in ("cosine", "euclidean"):
            raise ConfigError(f"ncm metric {self.ncm_metric!r} is unknown; valid: cosine, euclidean")
        object.__setattr__(self, "in_shape", tuple(int(s) for s in self.in_shape))

    @property
    def in_features(self) -> int:
        return math.prod(self.in_shape)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["in_shape"] = list(self.in_shape)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "HeadSpec":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise CheckpointError(f"head file spec has unknown fields {sorted(unknown)}; written by a newer roicache?")
        return cls(**{**d, "in_shape": tuple(d["in_shape"])})


def head_scores(spec: HeadSpec, logits: torch.Tensor) -> torch.Tensor:
    """Class probabilities ``[N, C+1]`` from a head's logits, consistent with how it was trained."""
    if spec.name != "ncm" and spec.loss in GUMBEL_LOSSES:
        return gumbel_scores(logits, sigma=spec.gumbel_sigma, background=spec.background_score)
    return softmax_scores(logits)


def _linear(n_in: int, n_out: int) -> nn.Linear:
    return nn.Linear(n_in, n_out)


def _random_init(layers: list[nn.Linear], cls: nn.Linear, generator: torch.Generator) -> None:
    """mmdetection's box-head init: hidden fcs Xavier-uniform, classifier N(0, 0.01), zero biases."""
    with torch.no_grad():
        for layer in layers:
            bound = math.sqrt(6.0 / (layer.in_features + layer.out_features))
            layer.weight.uniform_(-bound, bound, generator=generator)
            layer.bias.zero_()
        cls.weight.normal_(0.0, 0.01, generator=generator)
        cls.bias.zero_()


def _check_state(state: dict | None, names: tuple[str, ...], shapes: dict[str, tuple[int, ...]], head: str) -> dict:
    if state is None:
        raise CheckpointError(f"head {head} is initialised from the detector; pass its box-head weights "
                              f"(detector checkpoint) or choose 2fc_rand/3fc_rand")
    missing = [n for n in names if n not in state]
    if missing:
        raise CheckpointError(f"detector head weights lack {missing}; expected keys {list(names)}")
    # numpy arrays (cache_schema.head_init.read_head_weights) and tensors are both accepted
    state = {n: torch.as_tensor(state[n]).float() for n in names}
    for n in names:
        if tuple(state[n].shape) != shapes[n]:
            raise CheckpointError(f"detector weight {n} has shape {tuple(state[n].shape)}, head {head} needs "
                                  f"{shapes[n]}; check the store's level/classes match the detector")
    return state


class MLPHead(nn.Module):
    """Flatten → [fc6 → ReLU → (fc7 → ReLU)] → cls. Input ``[N, *in_shape]`` float32,
    output logits ``[N, C+1]``."""

    level = "pooled"
    hidden_layers = 2
    from_detector = True

    def __init__(self, *, spec: HeadSpec) -> None:
        super().__init__()
        self.spec = spec
        widths = [spec.in_features] + [spec.hidden] * self.hidden_layers
        names = ["fc6", "fc7"][: self.hidden_layers]
        for name, a, b in zip(names, widths[:-1], widths[1:]):
            self.add_module(name, _linear(a, b))
        self.cls = _linear(widths[-1], spec.num_classes + 1)
        self._hidden_names = names

    def hidden_modules(self) -> list[nn.Linear]:
        return [getattr(self, n) for n in self._hidden_names]

    def initialise(self, *, init_state: dict | None, generator: torch.Generator) -> None:
        """Copy the detector's layers (``from_detector``) or draw a seeded random init."""
        if not self.from_detector:
            _random_init(self.hidden_modules(), self.cls, generator)
            return
        shapes = {f"{n}.{p}": tuple(getattr(getattr(self, n), p).shape) for n in self._hidden_names + ["cls"]
                  for p in ("weight", "bias")}
        state = _check_state(init_state, tuple(shapes), shapes, self.spec.name)
        with torch.no_grad():
            for key in shapes:
                mod, param = key.split(".")
                getattr(getattr(self, mod), param).copy_(state[key].float())

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """The classifier's input ``[N, hidden]`` (``[N, in_features]`` for lastfc)."""
        x = x.reshape(x.shape[0], -1)
        for layer in self.hidden_modules():
            x = F.relu(layer(x))
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.cls(self.embed(x))


class ThreeFCFinetune(MLPHead):
    pass


class TwoFCRandom(MLPHead):
    hidden_layers = 1
    from_detector = False


class ThreeFCRandom(MLPHead):
    from_detector = False


class LastFC(MLPHead):
    """cls only, on the cached ``fc`` (fc7 output) level."""

    level = "fc"
    hidden_layers = 0


class LastTwoFC(nn.Module):
    """fc6 frozen (buffers copied from the detector, so head.pt is self-contained) → fc7 → cls.

    Why compute fc6 on the fly: the store keeps ``pooled`` and ``fc`` (= fc7 output), not fc6's
    output; one frozen matmul per batch is cheaper than another cached level."""

    level = "pooled"

    def __init__(self, *, spec: HeadSpec) -> None:
        super().__init__()
        self.spec = spec
        self.register_buffer("fc6_weight", torch.zeros(spec.hidden, spec.in_features))
        self.register_buffer("fc6_bias", torch.zeros(spec.hidden))
        self.fc7 = _linear(spec.hidden, spec.hidden)
        self.cls = _linear(spec.hidden, spec.num_classes + 1)

    def initialise(self, *, init_state: dict | None, generator: torch.Generator) -> None:
        del generator
        shapes = {"fc6.weight": tuple(self.fc6_weight.shape), "fc6.bias": tuple(self.fc6_bias.shape),
                  "fc7.weight": tuple(self.fc7.weight.shape), "fc7.bias": tuple(self.fc7.bias.shape),
                  "cls.weight": tuple(self.cls.weight.shape), "cls.bias": tuple(self.cls.bias.shape)}
        state = _check_state(init_state, tuple(shapes), shapes, self.spec.name)
        with torch.no_grad():
            self.fc6_weight.copy_(state["fc6.weight"].float())
            self.fc6_bias.copy_(state["fc6.bias"].float())
            for key in ("fc7.weight", "fc7.bias", "cls.weight", "cls.bias"):
                mod, param = key.split(".")
                getattr(getattr(self, mod), param).copy_(state[key].float())

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """The classifier's input ``[N, hidden]`` (fc7 output)."""
        x = F.relu(F.linear(x.reshape(x.shape[0], -1), self.fc6_weight, self.fc6_bias))
        return F.relu(self.fc7(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.cls(self.embed(x))


class NCMHead(nn.Module):
    """Nearest class mean on the ``fc`` representation.

    ``means`` ``[C+1, D]`` are the mean features of each class's foreground RoIs (row C: the
    background RoIs'); logits are ``scale * cos(x, μ_k)`` or ``-scale * ||x - μ_k||² / D``
    (divided by D so one scale suits any width). Classes without RoIs get logit -1e4 (softmax 0).
    """

    level = "fc"

    def __init__(self, *, spec: HeadSpec) -> None:
        super().__init__()
        self.spec = spec
        self.register_buffer("means", torch.zeros(spec.num_classes + 1, spec.in_features))
        self.register_buffer("present", torch.zeros(spec.num_classes + 1, dtype=torch.bool))

    def initialise(self, *, init_state: dict | None, generator: torch.Generator) -> None:
        del init_state, generator  # means come from fit_ncm

    def set_means(self, *, sums: torch.Tensor, counts: torch.Tensor) -> None:
        """``sums`` float64 ``[C+1, D]``, ``counts`` int64 ``[C+1]`` from one pass over the RoIs."""
        with torch.no_grad():
            self.present.copy_(counts > 0)
            self.means.copy_((sums / counts.clamp(min=1)[:, None].to(sums.dtype)).to(self.means.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(x.shape[0], -1)
        if self.spec.ncm_metric == "cosine":
            logits = self.spec.ncm_scale * F.normalize(x, dim=1) @ F.normalize(self.means, dim=1).T
        else:
            d2 = (x * x).sum(1, keepdim=True) - 2 * x @ self.means.T + (self.means * self.means).sum(1)[None]
            logits = -self.spec.ncm_scale * d2.clamp(min=0) / x.shape[1]
        return logits.masked_fill(~self.present[None, :], -1e4)


#: Config name -> head class (each has ``level`` and ``initialise(init_state=, generator=)``).
HEADS: dict[str, type[nn.Module]] = {
    "3fc_ft": ThreeFCFinetune,
    "2fc_rand": TwoFCRandom,
    "3fc_rand": ThreeFCRandom,
    "last2fc": LastTwoFC,
    "lastfc": LastFC,
    "ncm": NCMHead,
}


def level_for_head(name: str) -> str:
    """The store level (``"pooled"``/``"fc"``) head ``name`` reads — what the lead loads."""
    if name not in HEADS:
        raise ConfigError(f"unknown head {name!r}; valid: {', '.join(HEADS)}")
    return HEADS[name].level


def build_head(spec: HeadSpec, *, init_state: dict | None, seed: int) -> nn.Module:
    """Construct and initialise the head ``spec`` describes (seeded CPU generator for random init)."""
    head = HEADS[spec.name](spec=spec)
    head.initialise(init_state=init_state, generator=torch.Generator().manual_seed(int(seed)))
    return head


def classifier_of(head: nn.Module) -> nn.Linear | None:
    """The final linear layer (``cls``), or ``None`` for ncm."""
    return getattr(head, "cls", None)


def save_head(path: str | os.PathLike[str], *, head: nn.Module, spec: HeadSpec, meta: dict) -> Path:
    """Write ``{format, format_version, spec, state_dict, meta}`` atomically (temp name + rename).
    ``meta`` must hold only plain types (str/int/float/bool/None, lists, dicts)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().clone() for k, v in head.state_dict().items()}
    payload = {"format": HEAD_FORMAT, "format_version": HEAD_FORMAT_VERSION, "spec": spec.to_dict(),
               "state_dict": state, "meta": meta}
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(payload, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def load_head(path: str | os.PathLike[str], *, map_location: str | torch.device = "cpu") -> tuple[nn.Module, HeadSpec, dict]:
    """Read a head file (``weights_only=True``) → ``(head in eval mode, spec, meta)``."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"head file {path} does not exist; train one with `heads train`")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means a bad file
        raise CheckpointError(f"head file {path} cannot be read ({type(e).__name__}); it is corrupt or not a head") from e
    if not isinstance(payload, dict) or payload.get("format") != HEAD_FORMAT:
        raise CheckpointError(f"{path} is not a roicache head file (format {HEAD_FORMAT!r} expected)")
    if payload.get("format_version") != HEAD_FORMAT_VERSION:
        raise CheckpointError(f"head file {path} has format_version {payload.get('format_version')}, "
                              f"this roicache reads {HEAD_FORMAT_VERSION}")
    spec = HeadSpec.from_dict(payload["spec"])
    head = head_from_state(spec, payload["state_dict"], where=f"head file {path}")
    return head.to(map_location).eval(), spec, payload.get("meta", {})


def head_from_state(spec: HeadSpec, state_dict: dict, *, where: str = "head") -> nn.Module:
    """The head ``spec`` describes holding the trained weights ``state_dict`` (no initialisation)."""
    head = HEADS[spec.name](spec=spec)
    try:
        head.load_state_dict(state_dict)
    except RuntimeError as e:
        raise CheckpointError(f"{where}: weights do not fit spec {spec.name} ({str(e).splitlines()[0]})") from e
    return head.eval()

"""Head modules: detector initialisation, frozen fc6, ncm, spec validation, head files."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from cache_schema.errors import CheckpointError, ConfigError
from heads.models import (HEADS, HeadSpec, build_head, head_scores, level_for_head, load_head, save_head)
from tests.test_train_heads_support import detector_state

C, CF, HID = 5, 4, 16
IN = CF * 3 * 3


def _spec(name, **kw):
    level = level_for_head(name)
    shape = (CF, 3, 3) if level == "pooled" else (HID,)
    hidden = 0 if name in ("lastfc", "ncm") else HID
    return HeadSpec(**{"name": name, "level": level, "in_shape": shape, "num_classes": C, "hidden": hidden,
                       "loss": "ce", **kw})


def _reference(state, x):
    h = F.relu(x.reshape(len(x), -1) @ state["fc6.weight"].T + state["fc6.bias"])
    h = F.relu(h @ state["fc7.weight"].T + state["fc7.bias"])
    return h @ state["cls.weight"].T + state["cls.bias"]


def test_3fc_ft_and_last2fc_start_as_the_detector_head():
    state = detector_state(in_features=IN, hidden=HID, num_classes=C)
    state["fc7.bias"] = torch.linspace(-0.1, 0.1, HID)
    x = torch.randn(7, CF, 3, 3, generator=torch.Generator().manual_seed(0))
    want = _reference(state, x)
    for name in ("3fc_ft", "last2fc"):
        head = build_head(_spec(name), init_state=state, seed=0)
        torch.testing.assert_close(head(x), want, rtol=1e-5, atol=1e-6)
        as_numpy = {k: v.numpy() for k, v in state.items()}  # the store's read_head_weights gives numpy
        torch.testing.assert_close(build_head(_spec(name), init_state=as_numpy, seed=0)(x), want, rtol=1e-5, atol=1e-6)
    last2 = build_head(_spec("last2fc"), init_state=state, seed=0)
    trainable = {n for n, p in last2.named_parameters() if p.requires_grad}
    assert trainable == {"fc7.weight", "fc7.bias", "cls.weight", "cls.bias"}  # fc6 frozen
    assert "fc6_weight" in last2.state_dict()                                 # but saved with the head


def test_lastfc_is_the_detector_classifier_on_fc_features():
    state = detector_state(in_features=IN, hidden=HID, num_classes=C)
    head = build_head(_spec("lastfc"), init_state=state, seed=0)
    x = torch.randn(3, HID)
    torch.testing.assert_close(head(x), x @ state["cls.weight"].T + state["cls.bias"])
    assert [n for n, _ in head.named_parameters()] == ["cls.weight", "cls.bias"]


def test_random_heads_are_seeded_and_shaped():
    a = build_head(_spec("3fc_rand"), init_state=None, seed=3)
    b = build_head(_spec("3fc_rand"), init_state=None, seed=3)
    c = build_head(_spec("3fc_rand"), init_state=None, seed=4)
    for (n, p), (_, q), (_, r) in zip(a.named_parameters(), b.named_parameters(), c.named_parameters()):
        assert torch.equal(p, q), n
    assert not torch.equal(a.fc6.weight, c.fc6.weight)
    assert a(torch.randn(2, CF, 3, 3)).shape == (2, C + 1)
    two = build_head(_spec("2fc_rand"), init_state=None, seed=0)
    assert [n for n, _ in two.named_parameters()] == ["fc6.weight", "fc6.bias", "cls.weight", "cls.bias"]
    bound = math.sqrt(6 / (IN + HID))
    assert two.fc6.weight.abs().max() <= bound and two.cls.bias.abs().max() == 0


def test_detector_init_errors_are_clear():
    with pytest.raises(CheckpointError, match="detector"):
        build_head(_spec("3fc_ft"), init_state=None, seed=0)
    bad = detector_state(in_features=IN + 1, hidden=HID, num_classes=C)
    with pytest.raises(CheckpointError, match="fc6.weight has shape"):
        build_head(_spec("3fc_ft"), init_state=bad, seed=0)
    partial = {k: v for k, v in detector_state(in_features=IN, hidden=HID, num_classes=C).items() if k != "cls.bias"}
    with pytest.raises(CheckpointError, match="lack"):
        build_head(_spec("3fc_ft"), init_state=partial, seed=0)


def test_ncm_scores_nearest_mean_and_masks_absent_classes():
    spec = _spec("ncm")
    head = build_head(spec, init_state=None, seed=0)
    means = torch.zeros(C + 1, HID)
    for k in range(C + 1):
        means[k, k] = 1.0
    counts = torch.tensor([2, 1, 0, 3, 1, 5])                # class 2 has no RoI
    head.set_means(sums=(means * counts[:, None]).double(), counts=counts)
    x = torch.zeros(3, HID)
    x[0, 3], x[1, 5], x[2, 2] = 2.0, 1.0, 1.0
    logits = head(x)
    assert logits[0].argmax() == 3 and logits[1].argmax() == 5
    assert logits[0, 3].item() == pytest.approx(16.0)        # scale * cos = 16 * 1
    assert torch.all(logits[:, 2] == -1e4)                   # absent class never wins
    euclid = build_head(_spec("ncm", ncm_metric="euclidean", ncm_scale=1.0), init_state=None, seed=0)
    euclid.set_means(sums=(means * counts[:, None]).double(), counts=counts)
    out = euclid(x)
    assert out[0, 3].item() == pytest.approx(-1.0 / HID)       # -||(2-1)e3||² / D
    assert out[0].argmax() == 3


def test_spec_validation():
    with pytest.raises(ConfigError, match="valid: 3fc_ft"):
        HeadSpec(name="4fc", level="pooled", in_shape=(1,), num_classes=2, hidden=1, loss="ce")
    with pytest.raises(ConfigError, match="reads level"):
        HeadSpec(name="lastfc", level="pooled", in_shape=(8,), num_classes=2, hidden=0, loss="ce")
    with pytest.raises(ConfigError, match="unknown loss"):
        HeadSpec(name="lastfc", level="fc", in_shape=(8,), num_classes=2, hidden=0, loss="hinge")
    assert set(HEADS) == {"3fc_ft", "2fc_rand", "3fc_rand", "last2fc", "lastfc", "ncm"}


def test_head_scores_follow_the_training_loss():
    logits = torch.tensor([[0.0, 1.0, -1.0, 0.5, 0.0, 2.0]])
    soft = head_scores(_spec("lastfc"), logits)
    torch.testing.assert_close(soft, logits.softmax(1))
    gum = head_scores(_spec("lastfc", loss="gol"), logits)
    torch.testing.assert_close(gum, torch.exp(-torch.exp(-logits)))


def test_save_load_round_trip_and_bad_files(tmp_path):
    state = detector_state(in_features=IN, hidden=HID, num_classes=C)
    spec = _spec("last2fc", init_from="ab" * 32)
    head = build_head(spec, init_state=state, seed=0)
    meta = {"seed": 0, "steps": 12, "note": "x", "bins": [10, 100]}
    path = save_head(tmp_path / "out" / "head.pt", head=head, spec=spec, meta=meta)
    assert sorted(p.name for p in path.parent.iterdir()) == ["head.pt"]  # no temp file left
    loaded, spec2, meta2 = load_head(path)
    assert spec2 == spec and meta2 == meta and not loaded.training
    x = torch.randn(4, CF, 3, 3)
    torch.testing.assert_close(loaded(x), head(x))
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="corrupt"):
        load_head(tmp_path / "junk.pt")
    torch.save({"format": "something-else"}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not a roicache head"):
        load_head(tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="does not exist"):
        load_head(tmp_path / "missing.pt")



@pytest.mark.parametrize("name", ["3fc_ft", "last2fc", "lastfc"])
@pytest.mark.parametrize("loss, init, fresh", [("ce", "auto", False), ("gumbel", "auto", True), ("gol", "auto", True),
                                               ("gumbel", "detector", False), ("ce", "loss", False)])
def test_auto_classifier_init_gives_gumbel_losses_a_gumbel_classifier(name, loss, init, fresh):
    """Detector-init heads keep the detector's softmax classifier under a softmax loss; under a
    Gumbel-type loss ``auto`` re-initialises it as GOL does (W = 0.001, b = -log log(C+1)), since
    softmax logits read as Gumbel activations stall training. ``ce`` has no init of its own."""
    from heads.build import build_loss, build_training_head
    from heads.config import HeadConfig, LossConfig
    from heads.models import classifier_of
    from tests.test_train_heads_support import make_class_info

    state = detector_state(in_features=IN, hidden=HID, num_classes=C)
    shape = {"pooled": (CF, 3, 3), "fc": (HID,)}[level_for_head(name)]
    spec = _spec(name, loss=loss, in_shape=shape, hidden=0 if name == "lastfc" else HID)
    loss_fn = build_loss(LossConfig(name=loss), num_train_images=10,
                         class_info=make_class_info(image_classes=[{c} for c in range(C)] * 2, num_classes=C))
    head = build_training_head(spec, cfg=HeadConfig(name=name, classifier_init=init), init_state=state, seed=0,
                               loss=loss_fn)
    cls = classifier_of(head)
    if fresh:
        assert torch.all(cls.weight == 0.001)
        torch.testing.assert_close(cls.bias, torch.full((C + 1,), -math.log(math.log(C + 1))))
    else:
        torch.testing.assert_close(cls.weight, state["cls.weight"])

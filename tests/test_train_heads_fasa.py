"""FASA plug-in: online statistics, virtual sampling, group-wise adaptation, resumable training."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from cache_schema.errors import ConfigError
from heads.fasa import FeatureAugmenter, fisher_distance, kmedoids
from heads.models import load_head
from heads.sources import InMemoryRoiSource
from heads.train import train_head
from tests.test_train_heads import _cfg, _streaming
from tests.test_train_heads_support import detector_state, make_world


def _fa(**kw):
    args = {"num_classes": 4, "dim": 2, "instance_count": np.array([1, 3, 100, 1000]), "seed": 0,
            "device": torch.device("cpu"), "num_groups": 2}
    return FeatureAugmenter(**{**args, **kw})


def test_initial_sampling_probability_is_inverse_frequency():
    fa = _fa()
    inv = np.array([1, 1 / 3, 1 / 100, 1 / 1000])
    np.testing.assert_allclose(fa.p.numpy(), inv / inv.sum(), rtol=1e-6)


def test_statistics_first_batch_sets_then_momentum_updates():
    fa = _fa(momentum=0.1)
    emb = torch.tensor([[1.0, 2.0], [3.0, 2.0], [9.0, 9.0], [5.0, 5.0]])
    fa.update(emb, torch.tensor([0, 0, 4, 1]))            # background row ignored
    torch.testing.assert_close(fa.mean[0], torch.tensor([2.0, 2.0]))
    torch.testing.assert_close(fa.std[0], torch.tensor([1.0, 0.0]))   # population std
    assert fa.seen.tolist() == [True, True, False, False]
    fa.update(torch.tensor([[12.0, 2.0]]), torch.tensor([0]))
    torch.testing.assert_close(fa.mean[0], torch.tensor([0.9 * 2 + 0.1 * 12, 2.0]))
    torch.testing.assert_close(fa.std[0], torch.tensor([0.9, 0.0]))


def test_sampling_draws_only_seen_classes_with_their_probability():
    fa = _fa()
    fa.update(torch.tensor([[1.0, 1.0], [2.0, 2.0]]), torch.tensor([0, 2]))
    fa.p = torch.tensor([1.0, 1.0, 0.0, 1.0])
    x, y = fa.sample(torch.Generator().manual_seed(0))
    assert y.tolist() == [0] and torch.equal(x, torch.tensor([[1.0, 1.0]]))  # σ = 0: x̂ = μ
    fa.p = torch.tensor([0.3, 0.0, 0.3, 0.0])
    g = torch.Generator().manual_seed(1)
    hits = torch.stack([torch.bincount(fa.sample(g)[1], minlength=4) for _ in range(2000)]).float().mean(0)
    assert hits[0].item() == pytest.approx(0.3, abs=0.04) and hits[1] == 0 and hits[3] == 0


def test_fisher_kmedoids_separates_clusters():
    mean = torch.tensor([[0.0, 0.0], [0.1, 0.0], [10.0, 10.0], [10.2, 9.9], [0.0, 0.2]])
    std = torch.ones(5, 2)
    d = fisher_distance(mean, std)
    assert d[0, 1].item() == pytest.approx((0.1 ** 2 / 2) / 2)   # mean over dims of (Δμ)² / (σ_i² + σ_j²)
    g = kmedoids(d.numpy(), num_groups=2, rng=np.random.default_rng(0))
    assert g[0] == g[1] == g[4] and g[2] == g[3] and g[0] != g[2]


def test_group_wise_adaptation_scales_p_by_alpha_or_beta():
    fa = _fa()
    fa.update(torch.tensor([[0.0, 0.0], [0.1, 0.1], [50.0, 50.0], [50.1, 50.0]]), torch.tensor([0, 1, 2, 3]))
    fa.std += 1.0
    p0 = fa.p.clone()
    info = fa.adapt(torch.tensor([1.0, float("nan"), 1.0, 1.0], dtype=torch.float64))
    assert info["fasa_groups"] == 2 and torch.equal(fa.p, p0)      # first period only records
    fa.adapt(torch.tensor([0.5, float("nan"), 2.0, 1.5], dtype=torch.float64))
    # group {0, 1}: loss 1.0 -> 0.5 improved, class 1 (no val RoI) follows its group
    # group {2, 3}: mean 1.0 -> 1.75 worse
    want = p0.double() * torch.tensor([1.1, 1.1, 0.9, 0.9], dtype=torch.float64)
    torch.testing.assert_close(fa.p.double(), want, rtol=1e-6, atol=0)
    assert fa.groups[0] == fa.groups[1] != fa.groups[2] == fa.groups[3]


def test_training_with_fasa_adapts_logs_and_resumes_exactly(tmp_path):
    roiset, info, _ = make_world(seed=0, num_images=40, num_classes=6, feature_shape=(4, 2, 2))
    val, _, _ = make_world(seed=0, num_images=40, num_classes=6, feature_shape=(4, 2, 2))
    state = detector_state(in_features=16, hidden=8, num_classes=6)
    cfg = _cfg(fasa={"enabled": True, "period": 10, "num_groups": 3, "loss_weight": 0.5})
    full = train_head(config=cfg, source=InMemoryRoiSource(roiset=roiset, num_classes=6), class_info=info,
                      init_state=state, out_dir=tmp_path / "full", val=val, progress=False)
    events = [json.loads(x) for x in (tmp_path / "full" / "log.jsonl").read_text().splitlines()]
    adapts = [e for e in events if e.get("event") == "fasa_adapt"]
    assert [e["step"] for e in adapts] == [10, 20, 30] and adapts[-1]["fasa_up"] + adapts[-1]["fasa_down"] > 0
    assert full.metrics["fasa"]["adaptations"] == 3
    out = tmp_path / "broken"
    with pytest.raises(KeyboardInterrupt):
        train_head(config=cfg, source=_streaming(roiset, info, fail_after=24), class_info=info, init_state=state,
                   out_dir=out, val=val, progress=False)
    resumed = train_head(config=cfg, source=InMemoryRoiSource(roiset=roiset, num_classes=6), class_info=info,
                         init_state=state, out_dir=out, val=val, progress=False)
    wf = load_head(full.head_path)[0].state_dict()
    wr = load_head(resumed.head_path)[0].state_dict()
    assert resumed.resumed_from == 20 and all(torch.equal(wf[k], wr[k]) for k in wf)
    plain = train_head(config=_cfg(), source=InMemoryRoiSource(roiset=roiset, num_classes=6), class_info=info,
                       init_state=state, out_dir=tmp_path / "plain", val=val, progress=False)
    assert not torch.equal(load_head(plain.head_path)[0].cls.weight, wf["cls.weight"])  # virtual features mattered
    with pytest.raises(ConfigError, match="ncm"):
        train_head(config=_cfg(head={"name": "ncm"}, fasa={"enabled": True}),
                   source=InMemoryRoiSource(roiset=make_world(feature_shape=(8,))[0], num_classes=6),
                   class_info=info, init_state=None, out_dir=tmp_path / "ncm", progress=False)

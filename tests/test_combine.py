"""Contract and formula tests of the dual-head combination rules."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from cache_schema.errors import ConfigError
from heads.combine import RULES, CombineConfig, combine_scores, get_rule

COUNTS = np.array([5, 300, 301, 2000], dtype=np.int64)  # C = 4


def random_probs(seed: int, n: int = 6, c: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(torch.randn(n, c + 1, generator=g) * 2, -1), torch.softmax(torch.randn(n, c + 1, generator=g) * 2, -1)


# Hand-made case: 2 RoIs, 4 classes + background (last).
PO = torch.tensor([[0.10, 0.20, 0.05, 0.15, 0.50], [0.02, 0.03, 0.40, 0.05, 0.50]])
PC = torch.tensor([[0.30, 0.10, 0.02, 0.18, 0.40], [0.04, 0.01, 0.50, 0.05, 0.40]])
# T = 300, N <= T: classes 0 (5) and 1 (300) from cal, 2 (301) and 3 (2000) from orig.
SEL = torch.tensor([[0.30, 0.10, 0.05, 0.15], [0.04, 0.01, 0.40, 0.05]])
EXPECTED = {
    "orig": (PO[:, :4],),
    "cal-only": (PC[:, :4],),
    "avg": ((PO[:, :4] + PC[:, :4]) / 2,),
    "sel": (SEL,),
    # cal 0.01 and 0.04 < 0.05 -> 0 before sel (0.02 in class 2 is not selected anyway).
    "sel-thr": (torch.tensor([[0.30, 0.10, 0.05, 0.15], [0.0, 0.0, 0.40, 0.05]]),),
    # mean cal bg 0.40 / mean orig bg 0.50 = 0.8 scales the selected cal columns.
    "sel-scale": (torch.tensor([[0.24, 0.08, 0.05, 0.15], [0.032, 0.008, 0.40, 0.05]]),),
    # rows [sel, orig bg] sum to 0.60 + 0.50 = 1.10 and 0.50 + 0.50 = 1.00.
    "sel-norm": (torch.tensor([[0.30, 0.10, 0.05, 0.15]]) / 1.10, torch.tensor([[0.04, 0.01, 0.40, 0.05]]) / 1.00),
    "det": (PO[:, :4], PC[:, :4]),
}


@pytest.mark.parametrize("name", list(RULES))
def test_contract(name):
    po, pc = random_probs(0)
    cfg = CombineConfig(T=300)
    out = combine_scores(name, p_orig=po, p_cal=pc, instance_count=COUNTS, config=cfg)
    again = combine_scores(name, p_orig=po.clone(), p_cal=pc.clone(), instance_count=torch.as_tensor(COUNTS), config=cfg)
    assert len(out) == (2 if get_rule(name).detection_level else 1)
    for s, s2 in zip(out, again):
        assert s.shape == (6, 4) and s.dtype == torch.float32
        assert torch.isfinite(s).all() and (s >= 0).all() and (s <= 1).all()
        assert torch.equal(s, s2)  # deterministic
    empty = combine_scores(name, p_orig=po[:0], p_cal=pc[:0], instance_count=COUNTS, config=cfg)
    assert all(s.shape == (0, 4) for s in empty)


@pytest.mark.parametrize("name", list(RULES))
def test_formula_on_hand_case(name):
    out = combine_scores(name, p_orig=PO, p_cal=PC, instance_count=COUNTS, config=CombineConfig(T=300))
    expected = EXPECTED[name]
    if name == "sel-norm":
        expected = (torch.cat(expected),)
    assert len(out) == len(expected)
    for s, e in zip(out, expected):
        torch.testing.assert_close(s, e.float(), rtol=0, atol=1e-7)


def test_sel_norm_rows_sum_to_one_with_background():
    po, pc = random_probs(1)
    s = combine_scores("sel-norm", p_orig=po, p_cal=pc, instance_count=COUNTS)[0]
    sel = combine_scores("sel", p_orig=po, p_cal=pc, instance_count=COUNTS)[0]
    bg = po[:, -1] / (sel.sum(1) + po[:, -1])
    torch.testing.assert_close(s.sum(1) + bg, torch.ones(6))


def test_sel_threshold_limits():
    po, pc = random_probs(2)
    counts = np.array([1, 7, 10**5, 300])
    orig = combine_scores("orig", p_orig=po, p_cal=pc, instance_count=counts)[0]
    cal = combine_scores("cal-only", p_orig=po, p_cal=pc, instance_count=counts)[0]
    assert torch.equal(combine_scores("sel", p_orig=po, p_cal=pc, instance_count=counts, config=CombineConfig(T=0))[0], orig)
    assert torch.equal(combine_scores("sel", p_orig=po, p_cal=pc, instance_count=counts, config=CombineConfig(T=math.inf))[0], cal)
    # Boundary: N = 300 is calibrated with "le" (paper) but not with "lt" (official code).
    le = combine_scores("sel", p_orig=po, p_cal=pc, instance_count=counts, config=CombineConfig(T=300, boundary="le"))[0]
    lt = combine_scores("sel", p_orig=po, p_cal=pc, instance_count=counts, config=CombineConfig(T=300, boundary="lt"))[0]
    assert torch.equal(le[:, 3], cal[:, 3]) and torch.equal(lt[:, 3], orig[:, 3])
    assert torch.equal(le[:, :3], lt[:, :3])


def test_sel_scale_direction_and_clip():
    out = combine_scores("sel-scale", p_orig=PO, p_cal=PC, instance_count=COUNTS, config=CombineConfig(scale_ratio="orig/cal"))[0]
    torch.testing.assert_close(out[:, :2], (PC[:, :2] * 1.25).float())
    # A huge ratio clips at 1.
    po = torch.tensor([[0.0, 0.01, 0.99]])
    pc = torch.tensor([[0.9, 0.09, 0.01]])
    s = combine_scores("sel-scale", p_orig=po, p_cal=pc, instance_count=np.array([1, 1]),
                       config=CombineConfig(scale_ratio="orig/cal"))[0]
    assert s.max() == 1.0


def test_bad_inputs():
    po, pc = random_probs(3)
    with pytest.raises(ConfigError, match="unknown combination rule"):
        combine_scores("nope", p_orig=po, p_cal=pc, instance_count=COUNTS)
    with pytest.raises(ConfigError, match="columns"):
        combine_scores("sel", p_orig=po, p_cal=pc[:, :4], instance_count=COUNTS)
    with pytest.raises(ConfigError, match="calibrated"):
        combine_scores("sel", p_orig=po, p_cal=None, instance_count=COUNTS)
    assert combine_scores("orig", p_orig=po, p_cal=None, instance_count=COUNTS)[0].shape == (6, 4)
    with pytest.raises(ConfigError):
        CombineConfig(T=-1)
    with pytest.raises(ConfigError):
        CombineConfig(boundary="lte")

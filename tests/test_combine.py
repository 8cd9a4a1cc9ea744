"""Contract and formula tests of the dual-head combination rules."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from cache_schema.errors import CheckpointError, ConfigError
from heads.combine import RULES, Combination, combine_scores, get_rule

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
    cfg = Combination(T=300)
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
    out = combine_scores(name, p_orig=PO, p_cal=PC, instance_count=COUNTS, config=Combination(T=300))
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
    assert torch.equal(combine_scores("sel", p_orig=po, p_cal=pc, instance_count=counts, config=Combination(T=0))[0], orig)
    assert torch.equal(combine_scores("sel", p_orig=po, p_cal=pc, instance_count=counts, config=Combination(T=math.inf))[0], cal)
    # Boundary: N = 300 is calibrated with "le" (paper) but not with "lt" (official code).
    le = combine_scores("sel", p_orig=po, p_cal=pc, instance_count=counts, config=Combination(T=300, boundary="le"))[0]
    lt = combine_scores("sel", p_orig=po, p_cal=pc, instance_count=counts, config=Combination(T=300, boundary="lt"))[0]
    assert torch.equal(le[:, 3], cal[:, 3]) and torch.equal(lt[:, 3], orig[:, 3])
    assert torch.equal(le[:, :3], lt[:, :3])


def test_sel_scale_direction_and_clip():
    out = combine_scores("sel-scale", p_orig=PO, p_cal=PC, instance_count=COUNTS, config=Combination(scale_ratio="orig/cal"))[0]
    torch.testing.assert_close(out[:, :2], (PC[:, :2] * 1.25).float())
    # A huge ratio clips at 1.
    po = torch.tensor([[0.0, 0.01, 0.99]])
    pc = torch.tensor([[0.9, 0.09, 0.01]])
    s = combine_scores("sel-scale", p_orig=po, p_cal=pc, instance_count=np.array([1, 1]),
                       config=Combination(scale_ratio="orig/cal"))[0]
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


# ----------------------------------------------------------------------------- the record


@pytest.mark.parametrize("bad,words", [
    ({"rule": "bogus"}, ["bogus", *RULES]),
    ({"rule": "replace"}, ["replace", "sel-thr"]),
    ({"T": -1}, ["T=-1", ">= 0"]),
    ({"T": math.nan}, ["T=nan"]),
    ({"T": "300"}, ["T='300'", "number"]),
    ({"T": True}, ["T=True", "number"]),
    ({"boundary": "lte"}, ["lte", "le", "lt"]),
    ({"thr": 1.0}, ["thr=1.0", "[0, 1)"]),
    ({"thr": -0.1}, ["thr=-0.1"]),
    ({"scale_ratio": "cal-orig"}, ["cal-orig", "cal/orig", "orig/cal"]),
])
def test_combination_refuses_bad_values_in_one_line(bad, words):
    with pytest.raises(ConfigError) as info:
        Combination(**bad)
    message = str(info.value)
    assert "\n" not in message and all(w in message for w in words), message


def test_combination_defaults_and_float_fields():
    c = Combination()
    assert (c.rule, c.T, c.boundary, c.thr, c.scale_ratio) == ("sel", 300.0, "le", 0.05, "cal/orig")
    assert Combination(T=300) == Combination(T=300.0) and isinstance(Combination(T=300).T, float)
    assert Combination(T=9).override(T=None, rule="sel-thr", thr=0.5) == Combination(rule="sel-thr", T=9, thr=0.5)
    assert Combination(T=9).per_rule(("orig", "sel", "orig")) == (Combination(rule="orig", T=9), Combination(T=9))
    with pytest.raises(ConfigError, match="boundary"):
        Combination().override(boundary="x")  # validated like the constructor


@pytest.mark.parametrize("c", [Combination(), Combination(rule="sel-scale", T=math.inf, boundary="lt", thr=0.2,
                                                          scale_ratio="orig/cal"), Combination(rule="orig", T=0)])
def test_combination_dict_round_trip_is_json(c):
    d = c.to_dict()
    text = json.dumps(d, allow_nan=False)  # T = inf is the string "inf": valid JSON
    assert Combination.from_dict(json.loads(text)) == c
    if math.isinf(c.T):
        assert d["T"] == "inf"


def test_combination_from_dict_refuses_malformed_records():
    with pytest.raises(CheckpointError, match="unknown combination key 'combine'"):
        Combination.from_dict({"combine": "sel"})
    with pytest.raises(CheckpointError, match="table"):
        Combination.from_dict(["sel"])
    with pytest.raises(ConfigError, match="T='many'"):
        Combination.from_dict({"T": "many"})
    with pytest.raises(ConfigError, match="bogus"):
        Combination.from_dict({"rule": "bogus"})
    assert Combination.from_dict({"rule": "avg"}) == Combination(rule="avg")  # older records: defaults


def test_thr_and_scale_ratio_change_the_scores():
    lo = combine_scores("sel-thr", p_orig=PO, p_cal=PC, instance_count=COUNTS, config=Combination(rule="sel-thr"))[0]
    hi = combine_scores("sel-thr", p_orig=PO, p_cal=PC, instance_count=COUNTS,
                        config=Combination(rule="sel-thr", thr=0.2))[0]
    assert hi[0, 1] == 0.0 and lo[0, 1] == pytest.approx(0.10)  # cal 0.10 survives 0.05, not 0.2

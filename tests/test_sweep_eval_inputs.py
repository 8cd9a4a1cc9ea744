"""Cached evaluation on val inputs loaded once (``heads.pipeline.load_eval_inputs``), as a sweep
shares them with its workers: the rows equal evaluation that reads the store, for both
evaluators, heads at either level and a class-specific box regressor; the shared record holds
one copy of the val arrays, also for the training monitor.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from cache_schema import open_store
from cache_schema.errors import ConfigError
from heads.combine import Combination
from heads.config import config_from_dict
from heads.evaluation.inputs import SharedGt
from heads.pipeline import evaluate_from_store, evaluate_with_inputs, load_eval_inputs, train_from_store
from heads.sweep.jobs import load_train_inputs
from tests.test_eval_class_boxes import MMDET_LIKE, _class_specific_copy, _regression_for

ROWS = Combination(T=300.0).per_rule(("orig", "sel", "cal-only"))


def _train(store: Path, head: str, out: Path) -> Path:
    config = config_from_dict({"head": {"name": head}, "schedule": {"max_steps": 8, "milestones": [6]},
                               "run": {"device": "cpu", "threads": 1}})
    train_from_store(cache=str(store), config=config, out_dir=out, progress=False)
    return out


@pytest.fixture(scope="module")
def heads_dir(tiny_store, tmp_path_factory) -> dict[str, Path]:
    """A short lastfc run (reads fc) and a short 2fc_rand run (reads pooled) on the tiny store."""
    root = tmp_path_factory.mktemp("eval_inputs_heads")
    return {"fc": _train(tiny_store, "lastfc", root / "lastfc"), "pooled": _train(tiny_store, "2fc_rand", root / "2fc")}


def _dicts(outcome) -> dict[str, dict]:
    return {rule: m.to_dict() for rule, m in outcome.rows.items()}


@pytest.mark.parametrize("evaluator", ["fast", "lvis-api"])
def test_rows_on_loaded_inputs_equal_rows_read_from_the_store(tiny_store, heads_dir, evaluator):
    inputs = load_eval_inputs(open_store(str(tiny_store)), levels=("pooled", "fc"), evaluator=evaluator).share_memory()
    assert (inputs.gt is not None) == (evaluator == "fast")
    for head in heads_dir.values():
        direct = evaluate_from_store(cache=str(tiny_store), head=head, combinations=ROWS, out_dir=None, progress=False,
                                     evaluator=evaluator)
        loaded = evaluate_with_inputs(inputs=inputs, head=head, combinations=ROWS, out_dir=None, progress=False)
        assert _dicts(loaded) == _dicts(direct) and loaded.notes == direct.notes
    # The orig row does not depend on the head: what a sweep scores once and copies into every trial.
    alone = evaluate_with_inputs(inputs=inputs, head=None, combinations=(Combination(rule="orig"),), out_dir=None,
                                 progress=False)
    assert alone.rows["orig"].to_dict() == direct.rows["orig"].to_dict()


def test_class_specific_boxes_on_loaded_inputs_equal_rows_read_from_the_store(tiny_store, heads_dir, tmp_path):
    """A pooled head on a class-specific store: the boxes come from the separately loaded fc level."""
    store = _class_specific_copy(tiny_store, tmp_path / "cs.zarr", _regression_for(tiny_store, 7), post=MMDET_LIKE)
    inputs = load_eval_inputs(open_store(str(store)), levels=("pooled",))
    assert set(inputs.features) == {"pooled", "fc"} and inputs.box_regression is not None
    for head in (None, heads_dir["pooled"]):
        rows = ROWS if head is not None else (Combination(rule="orig"),)
        direct = evaluate_from_store(cache=str(store), head=head, combinations=rows, out_dir=None, progress=False)
        loaded = evaluate_with_inputs(inputs=inputs, head=head, combinations=rows, out_dir=None, progress=False)
        assert _dicts(loaded) == _dicts(direct) and loaded.notes == direct.notes


def test_shared_inputs_hold_one_copy_and_the_monitor_reads_it(tiny_store):
    store = open_store(str(tiny_store))
    inputs = load_eval_inputs(store, levels=("fc",), evaluator="fast").share_memory()
    tensors = [*inputs.features.values(), inputs.position_ids, inputs.image_sizes, *inputs.gt.columns.values(),
               *(v for v in vars(inputs.roiset).values() if isinstance(v, torch.Tensor))]
    assert all(t.is_shared() for t in tensors) and inputs.roiset.mask_inter is not None
    assert inputs.nbytes == sum(t.numel() * t.element_size() for t in tensors)
    # The numpy views of the ground truth read the shared pages, not a copy.
    gt = inputs.fast_gt
    assert gt.bbox.ctypes.data == inputs.gt.columns["bbox"].data_ptr()
    train = load_train_inputs(store, ("fc",), with_init=False, val_from=inputs)
    assert train.val["fc"].features.data_ptr() == inputs.features["fc"].data_ptr()
    read = store.split("val").load(level="fc")  # what the monitor read before: the same values
    for column in ("features", "labels", "ious", "image_index", "image_offsets", "images"):
        assert torch.equal(getattr(train.val["fc"], column), getattr(read, column)), column


def test_shared_ground_truth_gives_back_the_same_arrays(tiny_store):
    gt = load_eval_inputs(open_store(str(tiny_store)), evaluator="fast").fast_gt
    again = SharedGt.of(gt).arrays()
    for name in ("image_ids", "cat_ids", "image", "cat", "area", "ignore", "bbox", "neg", "not_exhaustive",
                 "instance_count", "mask_area", "slot"):
        a, b = getattr(gt, name), getattr(again, name)
        assert a.dtype == b.dtype and np.array_equal(a, b), name
    assert again.frequency == gt.frequency


def test_a_head_whose_level_was_not_loaded_is_refused(tiny_store, heads_dir):
    inputs = load_eval_inputs(open_store(str(tiny_store)), levels=("pooled",))
    with pytest.raises(ConfigError, match="not 'fc'"):
        evaluate_with_inputs(inputs=inputs, head=heads_dir["fc"], combinations=ROWS, out_dir=None, progress=False)
    with pytest.raises(ConfigError, match="need a head"):
        evaluate_with_inputs(inputs=inputs, head=None, combinations=ROWS, out_dir=None, progress=False)

"""Samplers over a tiny real RoI index: hand-derived RFS factors, bilevel invariants, determinism."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from cache_schema.errors import ConfigError, SchemaError
from cache_schema.records import RoiSet
from heads.samplers import (BilevelSampler, ClassBalancedSampler, RandomSampler, RepeatFactorSampler, SAMPLERS)
from heads.sources import RoiIndex
from tests.test_train_heads_support import make_class_info, make_world


def _index_from_labels(per_image: list[list[int]], num_classes: int) -> RoiIndex:
    labels = [x for rows in per_image for x in rows]
    offsets = np.concatenate(([0], np.cumsum([len(r) for r in per_image])))
    return RoiIndex(labels=np.array(labels, dtype=np.int64), image_offsets=offsets.astype(np.int64),
                    images=np.arange(len(per_image), dtype=np.int64), num_classes=num_classes)


def _world_index(**kw):
    roiset, info, _ = make_world(**kw)
    return RoiIndex.from_roiset(roiset, num_classes=info.num_classes), info


# ----------------------------------------------------------------------------- RFS


def test_rfs_factors_match_hand_derivation():
    # Images: I0 = {0, 1}, I1 = {0, 2}, I2 = {0, 2}; t = 0.75.
    # f(0) = 3/3 -> r = max(1, sqrt(.75)) = 1; f(1) = 1/3 -> sqrt(2.25) = 1.5;
    # f(2) = 2/3 -> sqrt(1.125) = 1.0606601717798212.  r(I) = max over its classes.
    info = make_class_info(image_classes=[{0, 1}, {0, 2}, {0, 2}], num_classes=3)
    index = _index_from_labels([[0, 1, 3], [0, 2, 3, 3], [0, 2]], num_classes=3)
    s = RepeatFactorSampler(index=index, class_info=info, seed=0, threshold=0.75, images_per_batch=1)
    np.testing.assert_allclose(s.class_factors, [1.0, 1.5, math.sqrt(1.125)])
    np.testing.assert_allclose(s.image_factors, [1.5, math.sqrt(1.125), math.sqrt(1.125)])
    # LVIS default t = 0.001: no class is that rare here, every factor is 1.
    d = RepeatFactorSampler(index=index, class_info=info, seed=0)
    np.testing.assert_allclose(d.image_factors, [1.0, 1.0, 1.0])


def test_rfs_stochastic_rounding_has_the_right_expectation():
    info = make_class_info(image_classes=[{0, 1}, {0, 2}, {0, 2}], num_classes=3)
    index = _index_from_labels([[0, 1, 3], [0, 2, 3, 3], [0, 2]], num_classes=3)
    s = RepeatFactorSampler(index=index, class_info=info, seed=3, threshold=0.75, images_per_batch=2)
    epochs = [s.epoch(e) for e in range(3000)]
    counts = np.array([np.bincount(e, minlength=3) for e in epochs])
    # each epoch: floor(r) <= count <= ceil(r); mean over epochs -> r (std of mean <= 0.5/sqrt(3000) = 0.009)
    assert counts.min(0).tolist() == [1, 1, 1] and counts.max(0).tolist() == [2, 2, 2]
    np.testing.assert_allclose(counts.mean(0), s.image_factors, atol=0.04)


def test_rfs_batches_walk_the_epoch_stream_and_keep_all_rois():
    info = make_class_info(image_classes=[{0, 1}, {0, 2}, {0, 2}], num_classes=3)
    index = _index_from_labels([[0, 1, 3], [0, 2, 3, 3], [0, 2]], num_classes=3)
    s = RepeatFactorSampler(index=index, class_info=info, seed=1, threshold=0.75, images_per_batch=2)
    stream = np.concatenate([s.epoch(e) for e in range(6)])
    for step in range(8):
        blocks = stream[2 * step: 2 * step + 2]
        np.testing.assert_array_equal(s.batch(step).rows, index.rows_of_blocks(blocks))
    budget = RepeatFactorSampler(index=index, class_info=info, seed=1, threshold=0.75, images_per_batch=2, max_rois=3)
    for step in range(8):
        rows = budget.batch(step).rows
        full = s.batch(step).rows
        assert len(rows) == min(3, len(full)) and set(rows) <= set(full)


# ----------------------------------------------------------------------------- bilevel


def test_bilevel_class_draws_are_uniform():
    index, info = _world_index(seed=1, num_images=60, num_classes=6)
    s = BilevelSampler(index=index, class_info=info, seed=0)
    draws = np.concatenate([s.batch(k).classes for k in range(1500)])  # 24,000 class draws
    freq = np.bincount(draws, minlength=6) / len(draws)
    # 4 sigma of a binomial share at p = 1/6 with n = 24,000 is 0.0096
    np.testing.assert_allclose(freq, np.full(6, 1 / 6), atol=0.0096)
    # Uniformity holds although the classes are long-tailed by instance count:
    assert info.instance_count.max() >= 4 * info.instance_count.min()


def test_bilevel_batch_holds_only_drawn_classes_and_background_one_to_one():
    index, info = _world_index(seed=2, num_images=50, num_classes=6, bg_per_image=12)
    s = BilevelSampler(index=index, class_info=info, seed=5)
    for step in range(200):
        b = s.batch(step)
        labels = index.labels[b.rows]
        fg, bg = labels[labels < 6], labels[labels == 6]
        assert set(fg.tolist()) <= set(b.classes.tolist())
        assert len(fg) > 0 and len(bg) == len(fg)          # 12 bg per image always suffice here
        assert len(np.unique(b.rows)) == len(b.rows)
        # every kept row comes from one of the batch's images
        assert set(index.images[index.blocks_of_rows(b.rows)].tolist()) <= set(b.images.tolist())
        # all fg RoIs of drawn classes in the drawn images are kept
        all_rows = index.rows_of_blocks(np.searchsorted(index.images, b.images))
        want = all_rows[np.isin(index.labels[all_rows], b.classes)]
        assert set(want.tolist()) == set(b.rows[labels < 6].tolist())


def test_bilevel_background_is_capped_by_what_the_images_hold():
    # two images, each with 3 fg RoIs of its class and 1 background RoI -> bg < fg
    info = make_class_info(image_classes=[{0}, {1}], num_classes=2)
    index = _index_from_labels([[0, 0, 0, 2], [1, 1, 1, 2]], num_classes=2)
    s = BilevelSampler(index=index, class_info=info, seed=0, classes_per_batch=2, replacement=False)
    b = s.batch(0)
    labels = index.labels[b.rows]
    assert sorted(labels.tolist()) == [0, 0, 0, 1, 1, 1, 2, 2]


def test_bilevel_own_class_mode_keeps_only_each_images_drawn_class():
    # image 0 holds classes 0 and 1; when drawn for class 0 it must not contribute class-1 RoIs
    info = make_class_info(image_classes=[{0, 1}, {2}], num_classes=3)
    index = _index_from_labels([[0, 1, 1, 3, 3, 3], [2, 3]], num_classes=3)
    s = BilevelSampler(index=index, class_info=info, seed=0, classes_per_batch=1, keep="own_class")
    seen = set()
    for step in range(50):
        b = s.batch(step)
        labels = index.labels[b.rows]
        assert set(labels[labels < 3].tolist()) == {int(b.classes[0])}
        seen.add(int(b.classes[0]))
    assert seen == {0, 1, 2}


def test_bilevel_without_replacement_draws_distinct_classes():
    index, info = _world_index(seed=3, num_images=40, num_classes=6)
    s = BilevelSampler(index=index, class_info=info, seed=0, classes_per_batch=4, replacement=False)
    for step in range(50):
        assert len(np.unique(s.batch(step).classes)) == 4


def test_bilevel_errors_on_empty_class_set_and_on_no_foreground():
    index = _index_from_labels([[2, 2], [2]], num_classes=2)
    empty = make_class_info(image_classes=[set(), set()], num_classes=2)
    with pytest.raises(SchemaError, match="empty class set"):
        BilevelSampler(index=index, class_info=empty, seed=0)
    annotated_but_unmatched = make_class_info(image_classes=[{0}, {1}], num_classes=2)
    s = BilevelSampler(index=index, class_info=annotated_but_unmatched, seed=0)
    with pytest.raises(SchemaError, match="no foreground RoI"):
        s.batch(0)


# ----------------------------------------------------------------------------- others + determinism


def test_class_balanced_batches_are_class_uniform_with_fixed_background_share():
    index, info = _world_index(seed=4, num_images=60, num_classes=6)
    s = ClassBalancedSampler(index=index, seed=0, batch_rois=64, background_ratio=1.0)
    fg_labels = []
    for step in range(400):
        labels = index.labels[s.batch(step).rows]
        assert len(labels) == 64 and int((labels == 6).sum()) == 32
        fg_labels.append(labels[labels < 6])
    freq = np.bincount(np.concatenate(fg_labels), minlength=6) / (400 * 32)
    np.testing.assert_allclose(freq, np.full(6, 1 / 6), atol=0.012)


def test_random_sampler_epoch_visits_every_row_once():
    index, _ = _world_index(seed=5, num_images=20)
    n = index.num_rows
    s = RandomSampler(index=index, seed=0, batch_rois=7)
    rows = np.concatenate([s.batch(k).rows for k in range(math.ceil(2 * n / 7) + 1)])
    np.testing.assert_array_equal(np.sort(rows[:n]), np.arange(n))
    np.testing.assert_array_equal(np.sort(rows[n:2 * n]), np.arange(n))


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_same_seed_same_batches_other_seed_other_batches(name):
    index, info = _world_index(seed=6, num_images=40)

    def build(seed):
        if name == "random":
            return RandomSampler(index=index, seed=seed, batch_rois=32)
        if name == "class_balanced":
            return ClassBalancedSampler(index=index, seed=seed, batch_rois=32)
        if name == "bilevel":
            return BilevelSampler(index=index, class_info=info, seed=seed)
        return RepeatFactorSampler(index=index, class_info=info, seed=seed, images_per_batch=4)

    a, b, c = build(11), build(11), build(12)
    steps = [0, 1, 17, 5]  # out of order on purpose: a batch depends on (seed, step) only
    for k in steps:
        np.testing.assert_array_equal(a.batch(k).rows, b.batch(k).rows)
    assert any(not np.array_equal(a.batch(k).rows, c.batch(k).rows) for k in steps)
    fresh = build(11)
    np.testing.assert_array_equal(fresh.batch(17).rows, a.batch(17).rows)


def test_bad_settings_raise_config_errors():
    index, info = _world_index(seed=7, num_images=10)
    with pytest.raises(ConfigError):
        BilevelSampler(index=index, class_info=info, seed=-1)
    with pytest.raises(ConfigError, match="keep"):
        BilevelSampler(index=index, class_info=info, seed=0, keep="everything")
    with pytest.raises(ConfigError):
        RandomSampler(index=index, seed=0, batch_rois=0)


def test_index_rejects_labels_beyond_background():
    rs = RoiSet(labels=torch.tensor([0, 5]), ious=torch.zeros(2), image_index=torch.zeros(2, dtype=torch.int64),
                image_offsets=torch.tensor([0, 2]), images=torch.tensor([0]))
    with pytest.raises(SchemaError, match="disagree"):
        RoiIndex.from_roiset(rs, num_classes=3)

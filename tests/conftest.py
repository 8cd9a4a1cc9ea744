"""Session-wide tiny real artefacts: a benchmark, a detector trained on it, a complete store.

Built once per test session (about 10 s on 2 cores) from :mod:`tests.pipeline_fixtures`; every
test that reuses them must treat them as read-only — copy first (``shutil.copytree``) to mutate.

Fixtures:
    tiny_data: dataset directory (``train.json``, ``val.json``, ``images/``), 6 classes,
        16 train + 10 val images of 80x80 px.
    tiny_ckpt: ``roicache.detector`` checkpoint trained 30 steps on ``tiny_data``.
    tiny_store: a complete store extracted from both (splits train,val; levels pooled,fc;
        24 proposals per image; batch size 4; 1 torch thread), ``pipeline_fixtures.TINY_EXTRACT``.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.pipeline_fixtures import build_data, build_detector, build_store


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    return build_data(tmp_path_factory.mktemp("tiny_data"))


@pytest.fixture(scope="session")
def tiny_ckpt(tiny_data, tmp_path_factory) -> Path:
    return build_detector(tiny_data, tmp_path_factory.mktemp("tiny_detector"))


@pytest.fixture(scope="session")
def tiny_store(tiny_ckpt, tiny_data, tmp_path_factory) -> Path:
    return build_store(tiny_ckpt, tiny_data, tmp_path_factory.mktemp("tiny_store") / "store.zarr")

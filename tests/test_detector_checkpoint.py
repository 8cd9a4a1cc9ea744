"""Detector checkpoints: round trip, atomic writes, every kind of bad file -> CheckpointError."""

from __future__ import annotations

import pytest
import torch

from cache_schema.errors import CheckpointError, ConfigError
from cache_schema.runtime import sha256_file
from extract.detectors.checkpoint import FORMAT, load_detector, save_detector
from extract.detectors.model import build_detector
from extract.detectors.toy import ToyShapes, tiny_arch

CATS = ToyShapes.categories


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    torch.manual_seed(7)
    arch = tiny_arch()
    model = build_detector(arch).eval()
    path = tmp_path_factory.mktemp("ckpt") / "detector.pt"
    save_detector(path, model=model, arch=arch, categories=CATS, meta={"seed": 7, "steps": 0})
    return path, model, arch


def test_round_trip_gives_identical_outputs(saved):
    path, model, arch = saved
    loaded = load_detector(path, device="cpu")
    assert loaded.arch == arch
    assert list(loaded.categories) == CATS
    assert loaded.meta == {"seed": 7, "steps": 0}
    assert loaded.sha256 == sha256_file(path) and len(loaded.sha256) == 64
    assert not loaded.model.training
    images = [ToyShapes(num_images=1, seed=11)[0][0]]
    with torch.no_grad():
        a, b = model(images)[0], loaded.model(images)[0]
    assert len(a["boxes"]) > 0
    for key in ("boxes", "scores", "labels", "masks"):
        assert torch.equal(a[key], b[key])
    # No temporary file is left next to the checkpoint.
    assert [p.name for p in path.parent.iterdir()] == ["detector.pt"]


def test_payload_is_plain_weights_only(saved):
    path, _, arch = saved
    payload = torch.load(path, weights_only=True)
    assert payload["format"] == FORMAT and payload["format_version"] == 1
    assert payload["arch"] == arch.to_dict()
    assert set(payload) == {"format", "format_version", "arch", "categories", "state_dict", "meta"}


def _one_line(info) -> str:
    msg = str(info.value)
    assert "\n" not in msg and msg
    return msg


def test_missing_and_directory(tmp_path):
    with pytest.raises(CheckpointError) as info:
        load_detector(tmp_path / "nope.pt")
    assert "does not exist" in _one_line(info)
    with pytest.raises(CheckpointError) as info:
        load_detector(tmp_path)
    assert "not a file" in _one_line(info)


def test_not_torch_and_truncated(saved, tmp_path):
    path = saved[0]
    text = tmp_path / "notes.pt"
    text.write_text("hello, I am not a checkpoint\n")
    with pytest.raises(CheckpointError) as info:
        load_detector(text)
    assert "not a readable torch checkpoint" in _one_line(info)
    cut = tmp_path / "cut.pt"
    data = path.read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError) as info:
        load_detector(cut)
    assert "truncated, corrupt" in _one_line(info)


def test_foreign_and_mismatched_files(saved, tmp_path):
    path, model, arch = saved
    plain = tmp_path / "plain_state_dict.pt"
    torch.save(model.state_dict(), plain)
    with pytest.raises(CheckpointError) as info:
        load_detector(plain)
    assert "not a roicache detector checkpoint" in _one_line(info)

    payload = torch.load(path, weights_only=True)
    newer = tmp_path / "newer.pt"
    torch.save({**payload, "format_version": 99}, newer)
    with pytest.raises(CheckpointError, match="format_version"):
        load_detector(newer)

    wrong_arch = tmp_path / "wrong_arch.pt"
    torch.save({**payload, "arch": {**payload["arch"], "representation_size": 48}}, wrong_arch)
    with pytest.raises(CheckpointError) as info:
        load_detector(wrong_arch)
    assert "do not match" in _one_line(info)

    bad_arch = tmp_path / "bad_arch.pt"
    torch.save({**payload, "arch": {**payload["arch"], "norm": "weird"}}, bad_arch)
    with pytest.raises(CheckpointError, match="bad arch"):
        load_detector(bad_arch)

    no_meta = tmp_path / "no_meta.pt"
    torch.save({k: v for k, v in payload.items() if k != "meta"}, no_meta)
    with pytest.raises(CheckpointError, match="lacks"):
        load_detector(no_meta)

    few_cats = tmp_path / "few_cats.pt"
    torch.save({**payload, "categories": payload["categories"][:2]}, few_cats)
    with pytest.raises(CheckpointError, match="categories"):
        load_detector(few_cats)


def test_save_validates_inputs(saved, tmp_path):
    _, model, arch = saved
    with pytest.raises(ConfigError, match="one per class"):
        save_detector(tmp_path / "a.pt", model=model, arch=arch, categories=CATS[:2], meta={})
    with pytest.raises(ConfigError, match="ascending"):
        save_detector(tmp_path / "a.pt", model=model, arch=arch, categories=CATS[::-1], meta={})
    with pytest.raises(ConfigError, match="JSON"):
        save_detector(tmp_path / "a.pt", model=model, arch=arch, categories=CATS, meta={"x": object()})
    assert not list(tmp_path.iterdir())

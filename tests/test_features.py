"""The feature cache on disk: memory-mapped features train the same head as features in memory, and closing the
cache removes what it wrote and nothing else."""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np
import pytest

from tests import train_util
from tests.configs import tiny
from tljax.training import train


@pytest.fixture
def mapped(monkeypatch) -> list[str]:
    """The names of the memory-mapped files the cache opens."""
    names, original = [], np.lib.format.open_memmap

    def spy(path, *args, **kwargs):
        names.append(Path(path).name)
        return original(path, *args, **kwargs)

    monkeypatch.setattr(np.lib.format, "open_memmap", spy)
    return names


def _run(folder: Path, workdir: Path, in_memory_mb: float) -> dict:
    """A one-phase run training the head on cached features; its final parameters."""
    cfg = tiny.get_config(str(folder))
    cfg.phases = cfg.phases[:1]
    cfg.phases[0].cache_features = True
    cfg.features_in_memory_mb = in_memory_mb
    train.run(cfg, str(workdir))
    return train_util.final_state(workdir)["params"]


def test_memory_mapped_features_give_the_same_head_and_are_removed(folder, tmp_path, mapped):
    in_memory = _run(folder, tmp_path / "memory", 1024)
    assert mapped == []
    on_disk = _run(folder, tmp_path / "disk", 0)
    assert sorted(mapped) == ["train-0.npy", "val-0.npy"]
    same = jax.tree.map(np.array_equal, in_memory, on_disk)
    assert all(jax.tree.leaves(same))
    assert not (tmp_path / "disk" / "features").exists()  # the cache made the folder, and removed it


def test_a_features_folder_the_user_made_is_kept(folder, tmp_path, mapped):
    features = tmp_path / "run" / "features"
    features.mkdir(parents=True)
    (features / "notes.txt").write_text("mine")
    _run(folder, tmp_path / "run", 0)
    assert len(mapped) == 2
    assert [p.name for p in features.iterdir()] == ["notes.txt"]
    assert (features / "notes.txt").read_text() == "mine"

import json
import os
import stat

import pytest
import torch

from lenskit.io import atomic_open, atomic_torch_save, atomic_write_json, atomic_write_text


def test_atomic_writes_round_trip(tmp_path):
    atomic_write_text(tmp_path / "a" / "t.txt", "hello")
    atomic_write_json(tmp_path / "j.json", {"x": [1, 2]})
    atomic_torch_save({"w": torch.ones(2)}, tmp_path / "p.pt")
    assert (tmp_path / "a" / "t.txt").read_text() == "hello"
    assert json.loads((tmp_path / "j.json").read_text()) == {"x": [1, 2]}
    assert torch.equal(torch.load(tmp_path / "p.pt", weights_only=True)["w"], torch.ones(2))


def test_failed_write_leaves_the_old_file(tmp_path):
    target = tmp_path / "keep.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_open(target) as handle:
        handle.write("half")
        raise RuntimeError("interrupted")
    assert target.read_text() == "old"
    assert os.listdir(tmp_path) == ["keep.txt"]


def test_written_files_are_readable_by_others(tmp_path):
    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "r.txt", "x")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "r.txt").stat().st_mode) == 0o644

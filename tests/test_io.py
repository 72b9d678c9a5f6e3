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


def test_a_writer_killed_mid_write_leaves_no_temp_file_after_the_next_write(tmp_path):
    import signal
    import subprocess
    import sys
    import time

    target = tmp_path / "result.json"
    code = (
        "import sys, time\n"
        "from lenskit.io import atomic_open\n"
        "with atomic_open(sys.argv[1]) as f:\n"
        "    f.write('partial'); f.flush(); print('writing', flush=True); time.sleep(60)\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code, str(target)], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout.readline().strip() == "writing"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    left = list(tmp_path.glob(".result.json.*.tmp"))
    assert len(left) == 1 and not target.exists()  # the kill left its temporary file
    mine = tmp_path / f".result.json.{os.getpid()}.live.tmp"  # a write in progress here
    mine.write_text("x")
    time.sleep(0.01)
    atomic_write_json(target, {"ok": True})
    assert json.loads(target.read_text()) == {"ok": True}
    assert sorted(tmp_path.glob(".result.json.*.tmp")) == [mine]

"""retain_freed_memory: freed large tensors' memory is reused, not faulted in again."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

from lenskit.allocator import RETAIN_ENV, retain_freed_memory

glibc = pytest.mark.skipif(
    platform.libc_ver()[0] != "glibc", reason="mallopt's settings are glibc's"
)

# Page faults per 64 MB tensor made, filled and freed, over 30 of them after a first.
SCRIPT = """
import resource, sys, torch
from lenskit.allocator import retain_freed_memory
took = retain_freed_memory()
def make():
    t = torch.empty(16 << 20)  # 64 MB: glibc maps blocks over 32 MB on their own
    t.fill_(1.0)
make()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(30):
    make()
print(int(took), (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) // 30)
"""
FRESH = 16384  # 4 KB pages in 64 MB


def _faults(retain: str) -> tuple[bool, int]:
    env = {**os.environ, RETAIN_ENV: retain}
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, check=True
    )
    took, faults = out.stdout.split()
    return took == "1", int(faults)


@glibc
def test_a_retained_heap_reuses_most_freed_memory_without_faults():
    took, faults = _faults("1")
    assert took
    # Most are reused. Not all: torch's 64-byte aligned blocks do not fit a freed block
    # of their own size in glibc < 2.38, until freed neighbours coalesce.
    assert faults < FRESH // 2


@glibc
def test_without_it_each_large_tensor_faults_in_fresh_pages():
    took, faults = _faults("0")
    assert not took
    assert faults >= FRESH * 0.9


def test_the_switch_turns_it_off(monkeypatch):
    monkeypatch.setenv(RETAIN_ENV, "0")
    assert retain_freed_memory() is False


def test_the_command_line_asks_for_it_before_running_a_command(monkeypatch, capsys):
    import lenskit.cli

    calls = []
    monkeypatch.setattr(lenskit.cli, "retain_freed_memory", lambda: calls.append(1))
    assert lenskit.cli.main(["trajectory", "--model", "tiny-llama", "--prompt", ""]) == 2
    assert calls == [1]
    assert "empty" in capsys.readouterr().err

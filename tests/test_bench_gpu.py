"""The GPU benchmark script runs every section on a CPU, so it is ready when a GPU is."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_gpu.py"


def test_every_section_runs_on_a_tiny_model(tmp_path):
    out = tmp_path / "gpu.json"
    args = ["--device", "cpu", "--smoke", "--model", "tiny-llama", "--train-minutes", "0.1"]
    done = subprocess.run(
        [sys.executable, str(SCRIPT), *args, "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(out.read_text(encoding="utf-8"))
    sections = ("matmul_tflops", "accuracy", "trajectory", "kl_step", "eval", "train")
    errors = {k: report[k]["error"] for k in sections if "error" in report[k]}
    assert not errors
    exact = report["accuracy"]["exact"]
    assert exact["kl_bits_max_abs_diff"] < 1e-4 and exact["top1_agreement"] == 1.0
    assert report["accuracy"]["output_row_vs_model_logits_max_abs"] < 1e-4
    assert report["kl_step"]["bf16_vs_float32_grad_cosine"] > 0.99
    assert report["eval"]["tokens_per_s"] > 0 and report["eval"]["floor_tokens_per_s"] > 0
    assert report["train"]["rc"] == 0 and report["train"]["metrics"]["per_layer"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_no_cuda_is_one_line(tmp_path):
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--out", str(tmp_path / "gpu.json")],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 1
    assert done.stderr.strip() == (
        "bench_gpu: no CUDA device here: pass --device cpu to check the script"
    )

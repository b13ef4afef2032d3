"""benchmarks/gpu_check.sh as a smoke test: it runs on CPU and reports a missing CUDA as a skip."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.sh"


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHON": sys.executable}
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, env=env, timeout=300)


@pytest.mark.slow
def test_gpu_check_runs_on_cpu_and_writes_one_report(tmp_path: Path) -> None:
    report = tmp_path / "report.txt"
    result = _run("--device", "cpu", "--quick", "--report", str(report))
    assert result.returncode == 0, result.stdout + result.stderr
    text = report.read_text()
    assert "lenet-s   M=4 train step" in text and "packed" in text
    assert "== together" in text and "auto/faster" in text  # together-tuning timed too
    assert "TFLOP/s" in text and "FAILED" not in text


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the report where CUDA is absent")
def test_gpu_check_reports_missing_cuda_as_a_skip(tmp_path: Path) -> None:
    report = tmp_path / "report.txt"
    result = _run("--report", str(report))
    assert result.returncode == 0
    assert "SKIPPED: --device cuda but CUDA is not available" in report.read_text()


def test_gpu_check_refuses_bad_arguments(tmp_path: Path) -> None:
    assert _run("--colour", "blue").returncode == 2
    assert _run("--wheel", str(tmp_path / "missing.whl")).returncode == 2

"""The CUDA kernels (Triton) on machines without a GPU: ``tests/test_cuda.py`` and
``tests/test_cuda_precision.py`` run on the CPU under ``TRITON_INTERPRET=1``, with the CPU
dispatch pointed at the Triton kernels (see conftest.py). The same checks run on a real GPU
by ``python -m pytest tests/test_cuda.py tests/test_cuda_precision.py``.

Left out here: torch.compile (Inductor would compile the graph around an interpreted kernel,
minutes for nothing the GPU run does not cover).
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_cuda_suite_under_triton_interpreter():
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1", SANET_TEST_DEVICE="cpu", SANET_TEST_TRITON_ON_CPU="1")
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-rA", "-p", "no:cacheprovider", "tests/test_cuda.py",
         "tests/test_cuda_precision.py", "-k", "not compile"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=1500)
    tail = proc.stdout[-6000:] + proc.stderr[-2000:]
    assert proc.returncode == 0, tail
    # -rA names every outcome: the Triton kernels themselves ran (were not skipped or faked)
    assert "PASSED tests/test_cuda.py::test_triton_kernels_are_used" in proc.stdout, tail
    assert "PASSED tests/test_cuda_precision.py::test_parameter_gradients" in proc.stdout, tail
    assert " passed" in proc.stdout.splitlines()[-1], tail

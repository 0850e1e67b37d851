"""Shared test helpers: seeding, random SA parameters, error norms, fused-kernel availability."""
from __future__ import annotations

import os
import zlib
from typing import Iterator

import pytest
import torch
from torch import Tensor, nn


SA_PARAM_NAMES = ("cweight", "cbias", "sweight", "sbias", "gn.weight", "gn.bias")


def rel_err(actual: Tensor, expected: Tensor) -> float:
    """Norm-wise relative error ``||actual - expected|| / ||expected||`` (in float64)."""
    a, e = actual.detach().double(), expected.detach().double()
    assert a.shape == e.shape, f"shape {tuple(a.shape)} != {tuple(e.shape)}"
    denom = e.norm().item()
    return (a - e).norm().item() / (denom if denom > 0 else 1.0)


@torch.no_grad()
def randomize_sa_(module: nn.Module, generator: torch.Generator | None = None) -> nn.Module:
    """Give the parameters of every SA layer in ``module`` (``cweight, cbias, sweight, sbias``,
    ``gn.weight, gn.bias``) random, non-initial N(0, 1) values; other parameters are left alone."""
    for m in module.modules():
        if hasattr(m, "cweight") and hasattr(m, "gn"):
            for p in m.parameters():
                p.copy_(torch.randn(p.shape, generator=generator, dtype=p.dtype))
    return module


if os.environ.get("SANET_TEST_TRITON_ON_CPU", "") == "1":
    # Run the CUDA (Triton) kernels on CPU tensors; needs TRITON_INTERPRET=1 in the
    # environment before triton is imported (tests/test_triton_interpreter.py sets both).
    import sanet.ops.fused as _fused
    from sanet.ops import sa_op as _sa_op

    _sa_op.KERNELS["cpu"] = _sa_op.KERNELS["cuda"]
    _fused._cpu_ext_ok = lambda: True
    _fused._CPU_DTYPES = _fused._CUDA_DTYPES  # the Triton kernels' fp16/bf16 paths too


def case_seed(*case) -> int:
    """A fixed seed per test case. Not ``hash()``: str hashes change with every process, and
    random draws would make a test flaky. (A parameter gradient that is one sum over the
    batch of terms of both signs can come out near 0; its fp32 relative error is then above
    1e-5 for the authors' formulation and ours alike, in about 2% of draws.)"""
    return zlib.crc32(repr(case).encode())


@pytest.fixture
def no_cpu_kernel(monkeypatch):
    """A CPU without the C++ extension (a failed build, SANET_DISABLE_EXT): no fused kernel
    for any dtype, in the bench command and in the layers alike."""
    import sanet.ops.fused as fused_mod
    from sanet.ops import fused_sa_supported

    monkeypatch.setattr(fused_mod, "_cpu_ext_ok", lambda: False)
    assert not fused_sa_supported(torch.zeros(1, 2, 1, dtype=torch.bfloat16))


def fused_kernel_available() -> bool:
    from sanet.ops import fused_sa_supported

    return fused_sa_supported(torch.zeros(1, 2, 1))


def pytest_configure(config: pytest.Config) -> None:
    # TorchScript is deprecated in torch 2.x but still part of the contract we test.
    config.addinivalue_line("filterwarnings", r"ignore:`torch.jit.script` is deprecated:FutureWarning")
    config.addinivalue_line("filterwarnings", r"ignore:`torch.jit.script_method` is deprecated:FutureWarning")


@pytest.fixture(autouse=True)
def _seed() -> Iterator[None]:
    torch.manual_seed(0)
    yield


@pytest.fixture
def sigint_default() -> Iterator[None]:
    """Python's own SIGINT handler, which sanet's main() wraps: a shell's background job (``make
    test &``, nohup) starts with SIGINT ignored, and a test's Ctrl-C would then do nothing."""
    import signal

    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, before)


@pytest.fixture(scope="session")
def fused_available() -> bool:
    return fused_kernel_available()


def require_fused(impl: str) -> None:
    """Skip a test of impl 'fused' where the C++ kernel can't be loaded (never under make test:
    there SANET_REQUIRE_EXT=1 turns a failed build into an error)."""
    if impl == "fused" and not fused_kernel_available():
        if os.environ.get("SANET_REQUIRE_EXT", "") not in ("", "0"):
            pytest.fail("SANET_REQUIRE_EXT=1 but the fused CPU kernel is unavailable")
        pytest.skip("fused CPU kernel unavailable (see `sanet ext`)")


@pytest.fixture(scope="module")
def data(tmp_path_factory, one_thread):
    """A tiny 3-class ImageFolder (``train/``, ``val/``) per test module."""
    from engine_utils import make_imagefolder

    return make_imagefolder(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, data, one_thread):
    """The output folder of a one-epoch ``sanet train`` of ``sa_resnet_test`` on ``data``."""
    from engine_utils import train_argv

    from sanet.cli import main

    out = tmp_path_factory.mktemp("run") / "run"
    assert main(train_argv(data, out)) == 0
    return out


@pytest.fixture(scope="module")
def one_thread():
    """Run in-process training on one thread: fast and predictable on a shared 2-core box."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class FakeModelBench:
    """Stands in for model_bench: records its rows and options, returns a result of ones."""

    def __init__(self):
        self.specs, self.kwargs, self.threads = None, None, None

    def __call__(self, specs, **kwargs):
        self.specs, self.kwargs, self.threads = specs, kwargs, torch.get_num_threads()
        one = {"samples_ms": [1.0], "median_ms": 1.0}
        return {"batch_size": kwargs["batch_size"], "img_size": kwargs["img_size"],
                "amp": None if kwargs["amp"] is None else str(kwargs["amp"]),
                "times": {f"{label}/{what}": one for label in specs for what in ("inference", "train_step")},
                "memory": {label: dict.fromkeys(("saved_bytes", "saved_activation_bytes", "saved_tensors",
                                                 "peak_train_step_bytes"), 1) for label in specs}}


@pytest.fixture
def fake_bench(monkeypatch):
    """``sanet bench``'s model benchmark replaced by a :class:`FakeModelBench`."""
    import sanet.analysis.bench as bench_mod

    fake = FakeModelBench()
    monkeypatch.setattr(bench_mod, "model_bench", fake)
    before = torch.get_num_threads()
    yield fake
    torch.set_num_threads(before)

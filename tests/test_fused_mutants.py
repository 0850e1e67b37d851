"""Tests from a mutation round over the fused tail (blocks.py, ops/fused.py, ops/sa_op.py,
ops/cpu_ext.py and the C++ kernels): each one failed on a mutant that the other tests let
through. Kernels are compared with the paper-literal reference (``impl="reference"``) on
fresh random inputs, gradients included.
"""
from __future__ import annotations

import copy
import os
import sys
import types

import pytest
import torch

from sanet.errors import SanetError
from sanet.ops import cpu_ext


# ------------------------------------------------------------ build cache (no compiler runs)

@pytest.fixture
def fake_build(monkeypatch, tmp_path):
    """``load_cpu_ext``'s own logic (key, cache directory, marker, errors) with
    ``cpp_extension.load`` replaced by a recorder: returns the list of names it was asked to
    build; ``fake_build.fail = True`` makes the "compiler" fail."""
    from torch.utils import cpp_extension

    class Recorder(list):
        fail = False

    calls = Recorder()
    module = types.ModuleType("fake_sanet_ext")

    def load(name, **kwargs):
        calls.append(name)
        if calls.fail:
            raise RuntimeError("the compiler said no")
        return module

    monkeypatch.setattr(cpp_extension, "load", load)
    monkeypatch.setenv("SANET_EXT_DIR", str(tmp_path))
    monkeypatch.delenv("SANET_DISABLE_EXT", raising=False)
    monkeypatch.setenv("PATH", os.environ.get("PATH", ""))  # restored afterwards
    monkeypatch.setattr(cpu_ext, "_status", dict(cpu_ext._status))
    calls.module, calls.root = module, tmp_path
    return calls


def _load_uncached():
    return cpu_ext.load_cpu_ext.__wrapped__()  # the lru_cache of this process stays as it is


def test_cache_key_covers_torch_python_and_isa(fake_build, monkeypatch):
    """A library built against another torch (C++ ABI), Python or vector ISA must not be
    loaded from the cache: each of them gives another build directory."""
    assert _load_uncached() is fake_build.module
    other_isa = "DEFAULT" if cpu_ext._isa() != "DEFAULT" else "AVX2"
    for owner, attr, value in ((torch, "__version__", "0.0.1+another"), (cpu_ext, "_isa", lambda: other_isa),
                               (sys.implementation, "cache_tag", "cpython-0")):
        with monkeypatch.context() as m:
            m.setattr(owner, attr, value)
            _load_uncached()
    assert len(fake_build) == 4 and len(set(fake_build)) == 4, fake_build


def test_a_successful_build_leaves_its_marker(fake_build):
    """The marker lets later processes import the library without cpp_extension and ninja."""
    assert _load_uncached() is fake_build.module
    name, = fake_build
    marker = fake_build.root / name / cpu_ext._BUILT
    assert marker.is_file() and marker.read_text().strip() == name


def test_a_failed_build_raises_under_require_ext(fake_build, monkeypatch):
    """SANET_REQUIRE_EXT=1 (CI, ``make test``) turns a failed build into an error; without it
    SA warns once and falls back (load_cpu_ext returns None, the status says why)."""
    fake_build.fail = True
    monkeypatch.setenv("SANET_REQUIRE_EXT", "1")
    with pytest.raises(SanetError, match="SANET_REQUIRE_EXT"):
        _load_uncached()
    for value in ("0", ""):
        monkeypatch.setenv("SANET_REQUIRE_EXT", value)
        with pytest.warns(RuntimeWarning, match="the compiler said no"):
            assert _load_uncached() is None
        assert "the compiler said no" in cpu_ext._status["error"]


# ------------------------------------------------------------ fused.py: when the op may run

@pytest.mark.parametrize("bn_dtype", [torch.float64, torch.bfloat16])
@pytest.mark.parametrize("train", [True, False])
def test_bn_without_affine_of_another_dtype_gives_bn_s_error(bn_dtype, train):
    """The dtype rule reads BatchNorm's dtype off its running statistics when it has no
    weight (affine=False): bn(x) refuses an fp64 or bf16 BatchNorm on fp32 input, and so
    must the op, instead of returning a result."""
    import sanet
    from torch import nn

    from sanet.ops import bn_shuffle_attention

    bn = nn.BatchNorm2d(16, affine=False).to(bn_dtype).train(train)
    sa = sanet.ShuffleAttention(16, 2)
    x = torch.randn(2, 16, 4, 4)
    with pytest.raises(Exception) as want:
        sa(copy.deepcopy(bn)(x))
    with pytest.raises(want.type):
        bn_shuffle_attention(x, bn, sa, relu=True)


# ------------------------------------------------------------ fused.py: hooks stop the fusion

def test_a_global_backward_pre_hook_sees_the_tail_modules():
    """``register_module_full_backward_pre_hook`` (a global hook, as gradient-capture tools
    set) must fire for the block's BatchNorm, SA and ReLU: the fused tail calls none of them,
    so such a hook makes the block run them one by one, with the same result."""
    import sanet
    from torch.nn.modules import module as nn_module

    gen = torch.Generator().manual_seed(11)
    block = sanet.SABottleneck(64, 16).double().train()
    for m in block.modules():
        if isinstance(m, torch.nn.ReLU):
            m.inplace = False  # full backward hooks refuse in-place modules (PyTorch's rule)
    with torch.no_grad():
        for p in block.sa.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype))
    ref = copy.deepcopy(block)
    ref.sa.impl = "reference"
    x = torch.randn(2, 64, 5, 7, generator=gen, dtype=torch.float64)
    seen = []
    handle = nn_module.register_module_full_backward_pre_hook(lambda m, g: seen.append(type(m).__name__))
    try:
        xf = x.clone().requires_grad_()
        y = block(xf)
        y.backward(torch.ones_like(y))
    finally:
        handle.remove()
    assert {"BatchNorm2d", "ShuffleAttention", "ReLU"} <= set(seen), seen
    xr = x.clone().requires_grad_()
    y_ref = ref(xr)
    y_ref.backward(torch.ones_like(y_ref))
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(xf.grad, xr.grad)

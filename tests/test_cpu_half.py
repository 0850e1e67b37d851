"""fp16/bf16 on the CPU: the C++ kernels run on an fp32 copy of half-precision input (what CPU
autocast gives SA), round once, and autograd keeps the half-precision input, not the copy.
The GPU suite's half-precision cases (``tests/test_cuda.py``, ``tests/test_cuda_precision.py``
with ``SANET_TEST_DEVICE=cpu``) run on these kernels; the single-layer exactness checks are in
``test_fused.py::test_half_precision_on_cpu_is_the_fp32_kernel_rounded_once``."""
from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch

import sanet
from sanet.analysis.memory import saved_tensor_bytes
from sanet.ops import sa_op

from conftest import randomize_sa_, rel_err
from fused_utils import require_cpu_ext

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.usefixtures("one_thread")]


@pytest.fixture(autouse=True)
def _needs_the_kernel():
    require_cpu_ext()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_the_layer_keeps_its_half_precision_input_not_the_fp32_copy(dtype):
    x = torch.randn(4, 256, 14, 14, dtype=dtype, requires_grad=True)
    sa = sanet.ShuffleAttention(256, 64)
    fused = saved_tensor_bytes(lambda: sa(x), exclude=list(sa.parameters()))
    ref = saved_tensor_bytes(lambda: sanet.ShuffleAttention(256, 64, impl="reference")(x))
    x_bytes = x.numel() * x.element_size()
    assert fused["activation_bytes"] == x_bytes + 2 * 4 * 256 * 8  # x and per-plane mean, var (float64)
    assert ref["bytes"] >= 2 * x_bytes


@pytest.mark.parametrize("train", [True, False])
def test_bn_sa_tail_under_autocast_is_fp32_exact_but_for_one_rounding(train):
    """What CPU autocast hands the block's tail: bf16 x and shortcut, BatchNorm and SA in fp32.
    Against fp64 on the same values: the output and the two input gradients are off by one
    bf16 rounding, the fp32 parameters' gradients and the running statistics by fp32 rounding
    only (the authors' formulation under autocast: ~2e-2 for most of them)."""
    from sanet.ops import bn_shuffle_attention

    from fused_utils import bn_sa_pair

    gen = torch.Generator().manual_seed(8 + train)
    bn, sa, _, _ = bn_sa_pair(64, 8, gen, torch.float32)
    bn.train(train)
    bn64, sa64 = copy.deepcopy(bn).double(), copy.deepcopy(sa).double()
    sa64.impl = "reference"
    x, sc, g = ((torch.randn(4, 64, 9, 9, generator=gen) * s + 0.5).bfloat16() for s in (2, 1, 1))

    def run(bn, sa, x, sc, fused):
        x, sc = x.detach().requires_grad_(True), sc.detach().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=fused):
            y = bn_shuffle_attention(x, bn, sa, sc, relu=True) if fused else torch.relu(sa(bn(x)) + sc)
        return y, torch.autograd.grad(y, [x, sc, *sa.parameters(), *bn.parameters()], g.to(y.dtype))

    y, grads = run(bn, sa, x, sc, True)
    y64, grads64 = run(bn64, sa64, x.double(), sc.double(), False)
    assert y.dtype == torch.bfloat16 and rel_err(y, y64) <= 4e-3  # 2^-8: one rounding
    for name, a, b in zip(["x", "shortcut"], grads[:2], grads64[:2]):
        assert a.dtype == torch.bfloat16 and rel_err(a, b) <= 4e-3, name
    for (name, _), a, b in zip([*sa.named_parameters(), *bn.named_parameters()], grads[2:], grads64[2:]):
        assert a.dtype == torch.float32 and rel_err(a, b) <= 1e-5, f"{name}: {rel_err(a, b):.3g}"
    for name in ("running_mean", "running_var"):
        assert rel_err(getattr(bn, name), getattr(bn64, name)) <= 1e-6, name
    assert int(bn.num_batches_tracked) == int(train)


def test_model_under_bf16_autocast_fuses_bn_and_sa(monkeypatch):
    """sa_resnet_test training under bf16 autocast: every block's BN+SA+add+ReLU tail runs the
    C++ kernel on the convolution's bf16 output (before: the authors' formulation in bf16), each
    BatchNorm counts one batch, and the output stays within bf16 noise of the authors'
    formulation under the same autocast. (Whole-network gradients of bf16 models differ from
    each other and from fp32 by up to ~30% on these random weights, chaos either way: their
    precision is checked per block, above.)"""
    calls = []
    fwd, bwd, update = sa_op.KERNELS["cpu"]

    def spy(x, shortcut, *args):
        calls.append((x.dtype, shortcut is not None, args[12]))  # (dtype, residual fused, BN in training)
        return fwd(x, shortcut, *args)

    monkeypatch.setitem(sa_op.KERNELS, "cpu", (spy, bwd, update))
    torch.manual_seed(3)
    model = timm.create_model("sa_resnet_test", num_classes=10)
    randomize_sa_(model, torch.Generator().manual_seed(3))
    model.train()
    ref = copy.deepcopy(model)
    for m in ref.modules():
        if isinstance(m, sanet.ShuffleAttention):
            m.impl = "reference"
    x = torch.randn(4, 3, 64, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = model(x)
        y_ref = ref(x)
    assert calls == [(torch.bfloat16, True, True)] * 4  # one bottleneck per stage; none for ref
    assert y.dtype == y_ref.dtype == torch.bfloat16
    assert rel_err(y, y_ref) <= 3e-2
    y.float().sum().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
    for name, b in model.named_buffers():
        if name.endswith("num_batches_tracked"):
            assert int(b) == 1, name


def test_torch_compile_records_the_op_for_half_input(monkeypatch):
    """Under torch.compile (fullgraph) the custom op takes bf16 input too (the compiled graph
    calls the C++ kernel): the same output and input gradient as eager."""
    dtypes = []
    fwd, bwd, update = sa_op.KERNELS["cpu"]
    monkeypatch.setitem(sa_op.KERNELS, "cpu", (lambda x, *a: dtypes.append(x.dtype) or fwd(x, *a), bwd, update))
    sa = sanet.ShuffleAttention(64, 8)
    x = torch.randn(2, 64, 9, 9).bfloat16().requires_grad_(True)
    g = torch.randn(2, 64, 9, 9).bfloat16()
    torch._dynamo.reset()
    y = torch.compile(sa, fullgraph=True)(x)
    assert dtypes and set(dtypes) == {torch.bfloat16}
    y_eager = sa(x)
    assert y.dtype == torch.bfloat16 and torch.equal(y, y_eager)
    assert torch.equal(torch.autograd.grad(y, x, g)[0], torch.autograd.grad(y_eager, x, g)[0])


@pytest.mark.slow
def test_gpu_suites_half_precision_cases_on_the_cpp_kernels():
    """tests/test_cuda.py and test_cuda_precision.py on the CPU (SANET_TEST_DEVICE=cpu): their
    fp16/bf16 cases (BN+SA tail in training against fp64, fp16 overflow, model under autocast)
    run on the C++ kernels, not skipped."""
    env = dict(os.environ, SANET_TEST_DEVICE="cpu", OMP_NUM_THREADS="1")
    env.pop("SANET_TEST_TRITON_ON_CPU", None)
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rA", "-p", "no:cacheprovider",
                           "tests/test_cuda.py", "tests/test_cuda_precision.py", "-k", "not compile"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    tail = proc.stdout[-6000:] + proc.stderr[-2000:]
    assert proc.returncode == 0, tail
    for case in ("test_bn_sa_tail_half_precision_training[small-dtype0]",
                 "test_bn_sa_tail_half_precision_training[sums-past-fp16-dtype1]",
                 "test_half_precision_within_reference_precision[shape0-64-dtype1]",
                 "test_model_under_autocast[dtype1]"):
        assert f"PASSED tests/test_cuda_precision.py::{case}" in proc.stdout, tail
    assert "no fused kernel for" not in proc.stdout, tail  # no half case skipped for want of one

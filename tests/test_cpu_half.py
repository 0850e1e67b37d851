"""fp16/bf16 on the CPU: the C++ kernels read half-precision input (what CPU autocast gives SA)
as it is, compute in fp32 and round once: bitwise what the fp32 kernels give on the upcast
tensors, rounded (the fp32-copy path this replaced); autograd keeps the half-precision input.
The GPU suite's half-precision cases (``tests/test_cuda.py``, ``tests/test_cuda_precision.py``
with ``SANET_TEST_DEVICE=cpu``) run on these kernels; the single-layer exactness checks are in
``test_fused.py::test_half_precision_on_cpu_is_the_fp32_kernel_rounded_once``."""
from __future__ import annotations

import copy
import os
import subprocess
import sys
import zlib
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


def _copy_path(ext):
    """The fp32-copy path the native half kernels replaced: the fp32 kernels on upcast tensors,
    the full-size results rounded once to the half type."""
    def f32(t):
        return None if t is None else t.float()

    def forward(x, sc, *args):
        out, *stats = ext.sa_forward(x.float(), f32(sc), *args)
        return (out.to(x.dtype), *stats)

    def backward(g, x, out, *args):
        gx, gpre, *rest = ext.sa_backward(g.float(), x.float(), f32(out), *args)
        return (gx.to(x.dtype), None if gpre is None else gpre.to(x.dtype), *rest)
    return forward, backward


# (shape, groups): tiny, small (two-pass training BatchNorm), odd with vector tails, 56x56
# (training BatchNorm walks channels there, dL/dz in a per-thread buffer), one output past
# the streaming-store threshold (8 MiB) with odd planes (unaligned stream heads).
_SHAPES = [((2, 64, 3, 3), 8), ((3, 64, 7, 7), 8), ((2, 32, 5, 13), 4), ((2, 32, 56, 56), 4),
           ((5, 96, 97, 101), 8)]
_TAILS = {  # (BatchNorm: None / "train" / "eval", shortcut, ReLU)
    "sa": (None, False, False), "bn-eval-tail": ("eval", True, True), "bn-train-tail": ("train", True, True),
    "bn-train": ("train", False, False), "bn-eval-relu": ("eval", False, True)}


def _assert_within_one_ulp(a, b):
    """a equals b but for a few elements one ulp (of a's type) away."""
    differ = a != b
    assert torch.equal(torch.nextafter(b[differ], a[differ]), a[differ])
    assert differ.sum() <= max(2, a.numel() // 1000), int(differ.sum())


_BF16, _FP16 = torch.bfloat16, torch.float16
# Every dtype and tail on the small shapes; the large (streaming) one for three of them.
_CASES = [(name, shape, groups, dtype, tail)
          for name, (shape, groups) in zip(["3x3", "7x7", "5x13", "56x56"], _SHAPES[:4])
          for dtype in (_BF16, _FP16) for tail in _TAILS]
_CASES += [("stream", *_SHAPES[4], dtype, tail) for dtype, tail in ((_BF16, "bn-train-tail"),
                                                                   (_FP16, "bn-eval-tail"), (_BF16, "sa"))]


@pytest.mark.parametrize("name, shape, groups, dtype, tail", _CASES,
                         ids=[f"{c[0]}-{'bf16' if c[3] == _BF16 else 'fp16'}-{c[4]}" for c in _CASES])
def test_native_half_kernels_equal_the_fp32_kernels_rounded_once(name, shape, groups, dtype, tail):
    """Every output of both kernels against the fp32-copy path, bitwise: out, grad x, the
    gradient before the ReLU (the shortcut's) in the half type; per-plane and batch statistics
    (the running statistics' update), the six SA parameters' and BatchNorm's gradients as
    they are. The kernels do the same float math on the same values and round once.

    One exception: with a shortcut, out is z * s + shortcut, which GCC (-ffp-contract=fast)
    fuses into one FMA in some of its loops and not in others, so in a few elements out
    differs by one rounding of z * s in float, and by one half-type ulp where that flips the
    final rounding. The fp32 kernel itself does so between its streaming loop and its other
    one (an 8 MiB output and a smaller one differ in ~1e-7 of their values)."""
    ext = sa_op._cpu_ext()
    fwd_ref, bwd_ref = _copy_path(ext)
    bn_mode, has_sc, relu = _TAILS[tail]
    gen = torch.Generator().manual_seed(zlib.crc32(repr((dtype, tail, shape)).encode()))
    C, cc = shape[1], shape[1] // (2 * groups)
    params = [torch.randn(cc, generator=gen) for _ in range(6)]
    x = (torch.randn(shape, generator=gen) * 2 + 0.5).to(dtype)
    sc = torch.randn(shape, generator=gen).to(dtype) if has_sc else None
    g = torch.randn(shape, generator=gen).to(dtype)
    bw, bb = torch.rand(C, generator=gen) + 0.5, torch.randn(C, generator=gen)
    bm, bv = torch.randn(C, generator=gen), torch.rand(C, generator=gen) + 0.5
    train = bn_mode == "train"
    bn = (bw, bb, None, None) if train else (bw, bb, bm, bv) if bn_mode else (None,) * 4
    args = (*params, groups, 1e-5, *bn, train, 1e-5, relu)
    got, want = sa_op._cpu_forward(x, sc, *args), fwd_ref(x, sc, *args)
    assert got[0].dtype == dtype
    for name, a, b in zip(["out", "plane mean", "plane var", "batch mean", "batch var"], got, want):
        if name == "out" and has_sc:
            _assert_within_one_ulp(a, b)
        else:
            assert torch.equal(a, b), name
    out, pmean, pvar, bmean, bvar = got
    stats = (bmean, bvar) if train else (bm, bv) if bn_mode else (None, None)
    bargs = (pmean, pvar, *params, groups, 1e-5, bw if bn_mode else None, bb if bn_mode else None,
             *stats, train, 1e-5)
    got = sa_op._cpu_backward(g, x, out if relu else None, *bargs)
    want = bwd_ref(g, x, out if relu else None, *bargs)
    assert got[0].dtype == dtype and got[2].dtype == torch.float32
    for name, a, b in zip(["grad x", "grad before ReLU", "SA params", "bn weight", "bn bias"], got, want):
        if b is None:
            assert a.numel() == 0, name
        else:
            assert torch.equal(a, b), name


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_bn_sa_tail_on_channels_last_half_input_is_the_fp32_modules_rounded(dtype, train):
    """The block tail through autograd, channels_last half input, fp32 modules (as under AMP):
    output and input gradients are the fp32 run's on the upcast input rounded once, every
    parameter gradient and running statistic the fp32 run's exactly. (No ReLU: its mask from
    the fp32 output could differ where a tiny value rounds to 0 in fp16.)"""
    from sanet.ops import bn_shuffle_attention

    from fused_utils import bn_sa_pair

    gen = torch.Generator().manual_seed(20 + train)
    bn, sa, _, _ = bn_sa_pair(64, 8, gen, torch.float32)
    bn.train(train)
    bn32, sa32 = copy.deepcopy(bn), copy.deepcopy(sa)
    cl = torch.channels_last
    x, sc, g = ((torch.randn(3, 64, 9, 11, generator=gen) * s + 0.5).to(dtype).to(memory_format=cl)
                for s in (2, 1, 1))

    def run(bn, sa, x, sc):
        x, sc = x.detach().requires_grad_(True), sc.detach().requires_grad_(True)
        y = bn_shuffle_attention(x, bn, sa, sc)
        return y, torch.autograd.grad(y, [x, sc, *sa.parameters(), *bn.parameters()], g.to(y.dtype))

    y, grads = run(bn, sa, x, sc)
    y32, grads32 = run(bn32, sa32, x.float(), sc.float())
    assert y.dtype == dtype and y.is_contiguous(memory_format=cl)
    assert torch.equal(y, y32.to(dtype))
    for a, b in zip(grads[:2], grads32[:2]):
        assert a.dtype == dtype and torch.equal(a, b.to(dtype))
    for (name, _), a, b in zip([*sa.named_parameters(), *bn.named_parameters()], grads[2:], grads32[2:]):
        assert a.dtype == torch.float32 and torch.equal(a, b), name
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        assert torch.equal(getattr(bn, name), getattr(bn32, name)), name


def test_half_input_goes_to_the_kernel_without_a_copy(monkeypatch):
    """_cpu_forward/_cpu_backward hand the half-precision tensors to the kernels as they are."""
    real = sa_op._cpu_ext()
    seen = []

    class Spy:
        def sa_forward(self, x, sc, *args):
            seen.append((x.dtype, sc.dtype, x.data_ptr()))
            return real.sa_forward(x, sc, *args)

        def sa_backward(self, g, x, out, *args):
            seen.append((g.dtype, out.dtype, x.data_ptr()))
            return real.sa_backward(g, x, out, *args)

    monkeypatch.setattr(sa_op, "_cpu_ext", Spy)
    sa = sanet.ShuffleAttention(64, 8)
    x = torch.randn(2, 64, 7, 7).bfloat16().requires_grad_(True)
    sc = torch.randn(2, 64, 7, 7).bfloat16()
    y, *_ = sa_op.sa_op(x, sc, *sa.parameters(), 8, sa.gn.eps, None, None, None, None, False, 1e-5, True)
    y.sum().backward()
    bf = torch.bfloat16
    assert seen == [(bf, bf, x.data_ptr()), (bf, bf, x.data_ptr())]


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

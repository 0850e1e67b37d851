"""Fused kernels at the edges of fp32: one-pixel and 90k-pixel planes, means far from zero,
outliers, inf and NaN, saturated gates, planes without pixels. Each against the fp64
reference (and PyTorch's own fp32 where that is the fair bound)."""
from __future__ import annotations

import copy

import pytest
import torch

import sanet
from sanet.ops import bn_shuffle_attention

from fused_utils import bn_sa_pair, fused_and_fp64, grads, large_mean_input, randomize, rel, require_cpu_ext

require_cpu_ext()


@pytest.mark.parametrize("hw", [1, 2])
def test_tiny_planes_large_activations_against_fp64(hw):
    """One-pixel planes make GroupNorm's 1/sqrt(eps) amplify rounding; the kernel centres
    the gate argument first, so it stays at fp32 accuracy (the fp32 reference does not)."""
    gen = torch.Generator().manual_seed(8)
    sa = sanet.ShuffleAttention(256, 64, impl="fused")
    randomize(sa, gen)
    ref64 = copy.deepcopy(sa).double()
    ref64.impl = "reference"
    x = (100 * torch.randn(4, 256, hw, hw, generator=gen)).requires_grad_(True)
    x64 = x.detach().double().requires_grad_(True)
    y, y64 = sa(x), ref64(x64)
    g = torch.randn(y.shape, generator=gen)
    assert rel(y, y64) <= 1e-6
    names = ["input"] + [n for n, _ in sa.named_parameters()]
    got = grads(y, [x] + list(sa.parameters()), g)
    want = grads(y64, [x64] + list(ref64.parameters()), g.double())
    for name, a, b in zip(names, got, want):
        if hw == 1 and name == "gn.weight":  # exactly 0: it multiplies x - mean = 0
            assert a.abs().max() <= 1e-6 * g.norm()
        else:
            assert rel(a, b) <= 1e-5, name


@pytest.mark.parametrize("C,G,block", [(128, 64, False), (32, 8, True)], ids=["sa", "bn-sa-add-relu"])
def test_large_planes_against_fp64(C, G, block):
    """300x301 planes: the per-plane sums of the backward cancel, so a float accumulator over
    the whole plane (90k values) is off by several 1e-5; the kernels keep fp32 accuracy (1e-5,
    or within 3x of PyTorch's own fp32 reduction of the reference)."""
    gen = torch.Generator().manual_seed(0)
    bn, sa, _, _ = bn_sa_pair(C, G, gen, torch.float32)
    bn.eval()
    x = torch.randn(1, C, 300, 301, generator=gen)
    sc = torch.randn(x.shape, generator=gen)
    g = torch.randn(x.shape, generator=gen)
    results = []
    for dtype, impl in ((torch.float32, "fused"), (torch.float32, "reference"), (torch.float64, "reference")):
        b, s = copy.deepcopy(bn).to(dtype), copy.deepcopy(sa).to(dtype)
        s.impl = impl
        xi = x.to(dtype).requires_grad_(True)
        if not block:
            y = s(xi)
        elif impl == "fused":
            y = bn_shuffle_attention(xi, b, s, sc.to(dtype), relu=True)
        else:
            y = torch.relu(s(b(xi)) + sc.to(dtype))
        inputs = [xi, *s.parameters()] + (list(b.parameters()) if block else [])
        results.append([y] + list(grads(y, inputs, g.to(dtype))))
    names = ["out", "input"] + [n for n, _ in sa.named_parameters()] + ["bn.weight", "bn.bias"]
    for name, fused, ref32, ref64 in zip(names, *results):
        err, err_ref = rel(fused.double(), ref64), rel(ref32.double(), ref64)
        assert err <= max(1e-5, 3 * err_ref), (name, err, err_ref)


@pytest.mark.parametrize("mode", ["sa", "bn_train", "bn_eval"])
@pytest.mark.parametrize("hw", [(8, 8), (64, 64)], ids=["two-phase", "channel-walk"])
def test_large_mean_against_fp64(mode, hw):
    """Input whose mean is 1000 standard deviations from 0, built exactly representable in
    fp32 and with channel means exactly 1000, so fp32 can be exact to ~1e-7. Folding
    BatchNorm into z = a*x + b rounds b (~1000 a) to fp32; summing x (rather than x - x[0])
    in float lanes and centring the gate on a rounded mean each shift whole planes by 1e-5 to
    1e-4 of their spread. The kernels centre on the plane and correct for the rounding."""
    gen = torch.Generator().manual_seed(3)
    bn, sa, _, _ = bn_sa_pair(16, 2, gen, torch.float32)
    with torch.no_grad():
        bn.running_mean.fill_(1000.0)
    bn.train(mode == "bn_train")
    x = large_mean_input(hw, gen)
    g = torch.randn(x.shape, generator=gen)
    for name, (fused, ref64) in fused_and_fp64(mode, bn, sa, x, g).items():
        assert rel(fused.double(), ref64) <= 3e-6, (name, rel(fused.double(), ref64))


@pytest.mark.parametrize("impl", ["fused", "torch"])
@pytest.mark.parametrize("hw", [(6, 6), (7, 7)])
def test_constant_planes_against_fp64(impl, hw):
    """A constant plane (variance 0) with an offset: the spatial slope is ~1/sqrt(eps), so the
    fp32 plane mean's rounding would spread over the plane (the authors' fp32 formulation is
    1e-5 - 5e-4 off here; "torch" was too, before its second pass on the mean)."""
    gen = torch.Generator().manual_seed(5)
    sa = sanet.ShuffleAttention(64, 8, impl=impl)
    randomize(sa, gen)
    ref64 = copy.deepcopy(sa).double()
    ref64.impl = "reference"
    x = (3 * torch.randn(2, 64, 1, 1, generator=gen) + 5).expand(2, 64, *hw).contiguous().requires_grad_(True)
    x64 = x.detach().double().requires_grad_(True)
    y, y64 = sa(x), ref64(x64)
    g = torch.randn(y.shape, generator=gen)
    assert rel(y, y64) <= 3e-6
    assert rel(grads(y, [x], g)[0], grads(y64, [x64], g.double())[0]) <= 3e-6


@pytest.mark.parametrize("impl", ["fused", "torch"])
@pytest.mark.parametrize("where", [0, 7], ids=["first", "middle"])
def test_inf_in_a_plane_like_the_reference(where, impl):
    """An inf saturates a channel-branch gate (finite outputs elsewhere in the plane), as in
    the reference; the spatial branch's GroupNorm makes its plane NaN in both. ("torch", the
    path of exported, traced and torch.func graphs, made the channel-branch plane NaN.)"""
    gen = torch.Generator().manual_seed(4)
    sa = sanet.ShuffleAttention(16, 2, impl=impl)
    randomize(sa, gen)
    ref = copy.deepcopy(sa)
    ref.impl = "reference"
    x = torch.randn(2, 16, 16, generator=gen)
    x[0, :, where] = float("inf")
    with torch.no_grad():
        y, r = sa(x), ref(x)
    assert torch.equal(y.isnan(), r.isnan()) and torch.equal(y.isinf(), r.isinf())
    finite = r.isfinite()
    torch.testing.assert_close(y[finite], r[finite], rtol=1e-5, atol=1e-6)


def test_identity_planes_keep_each_elements_precision():
    """Without BatchNorm in front, z is x itself: zeros stay exactly zero (ReLU'd input at
    initialisation, where every gate is constant) and an outlier plane keeps per-element
    accuracy (z about the mean would round every element to the mean's precision)."""
    sa = sanet.ShuffleAttention(16, 2, impl="fused")  # default init: sweight = 0, constant gates
    x = torch.relu(torch.randn(2, 16, 7, 7, generator=torch.Generator().manual_seed(0)) * 3 + 1)
    with torch.no_grad():
        y = sa(x)
    zeros = sanet.channel_shuffle(x, 2) == 0
    assert zeros.any() and (y[zeros] == 0).all()
    randomize(sa, torch.Generator().manual_seed(1))
    ref64 = copy.deepcopy(sa).double()
    ref64.impl = "reference"
    x = torch.randn(2, 16, 64, generator=torch.Generator().manual_seed(2))
    x[..., 0] = 1e4
    with torch.no_grad():
        y, r = sa(x).double(), ref64(x.double())
    assert ((y - r).abs() / r.abs().clamp_min(1e-30)).max() <= 1e-5


@pytest.mark.parametrize("hw", [(8, 8), (48, 48)], ids=["two-phase", "channel-walk"])
def test_outlier_plane_statistics_against_fp64(hw):
    """One element 1e4 in planes of N(0, 1): the plane means (and so BatchNorm's running mean)
    keep fp32 accuracy. Summing x - x[0] made every lane carry the outlier (1e-4 - 1e-3 off)."""
    gen = torch.Generator().manual_seed(6)
    bn, sa, _, _ = bn_sa_pair(16, 2, gen, torch.float32, momentum=None)
    x = torch.randn(2, 16, *hw, generator=gen)
    x[..., 0, 0] = 1e4
    bn64 = copy.deepcopy(bn).double()
    with torch.no_grad():
        bn_shuffle_attention(x, bn, sa)
        bn64(x.double())
    assert rel(bn.running_mean.double(), bn64.running_mean) <= 1e-6
    assert rel(bn.running_var.double(), bn64.running_var) <= 1e-6


def test_saturated_gates_against_fp64():
    """Gate weights x400 push the spatial gate's argument far past +-88: exp overflows, the
    gate saturates at 0 or 1. The outputs stay finite and every gradient keeps fp32 accuracy
    (a saturated gate must have slope 0; AVX2's reciprocal estimate gave it 6e-8, see
    test_extension_builds_and_is_exact_for_avx2 for that build)."""
    gen = torch.Generator().manual_seed(5)
    sa = sanet.ShuffleAttention(64, 8, impl="fused")
    randomize(sa, gen)
    with torch.no_grad():
        sa.sweight.mul_(20)
        sa.gn.weight.mul_(20)
    ref32, ref64 = copy.deepcopy(sa), copy.deepcopy(sa).double()
    ref32.impl = ref64.impl = "reference"
    x, g = torch.randn(2, 64, 9, 13, generator=gen), torch.randn(2, 64, 9, 13, generator=gen)
    results = []
    for module, dtype in ((sa, torch.float32), (ref32, torch.float32), (ref64, torch.float64)):
        xi = x.to(dtype).requires_grad_(True)
        y = module(xi)
        results.append([y, *grads(y, [xi, *module.parameters()], g.to(dtype))])
    assert all(t.isfinite().all() for t in results[0])
    names = ["out", "input"] + [n for n, _ in sa.named_parameters()]
    for name, fused, f32, f64 in zip(names, *results):
        err, err_ref = rel(fused.double(), f64), rel(f32.double(), f64)
        assert err <= max(1e-5, 1.5 * err_ref), (name, err, err_ref)


def test_nan_reaches_the_output_like_the_reference():
    """A NaN pixel makes its plane's statistics NaN: the whole plane's output is NaN, in both
    branches (the vector exp must not clamp NaN to a finite number)."""
    x = torch.randn(2, 32, 5, 6)
    x[0, 3, 1, 2] = float("nan")   # channel branch (first half of group 0)
    x[1, 6, 0, 0] = float("nan")   # spatial branch
    sa = sanet.ShuffleAttention(32, 4, impl="fused")
    randomize(sa, torch.Generator().manual_seed(3))
    ref = copy.deepcopy(sa)
    ref.impl = "reference"
    with torch.no_grad():
        y, y_ref = sa(x), ref(x)
    assert torch.equal(y.isnan(), y_ref.isnan()) and y.isnan().sum() == 2 * 30


def test_planes_without_pixels_have_zero_gradients():
    x = torch.randn(2, 32, 0, 5, requires_grad=True)
    sa = sanet.ShuffleAttention(32, 4, impl="fused")
    sa(x).sum().backward()
    assert x.grad.shape == x.shape
    assert all(p.grad is not None and torch.equal(p.grad, torch.zeros_like(p)) for p in sa.parameters())

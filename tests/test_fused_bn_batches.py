"""The fused BatchNorm + SA block tail (``bn_shuffle_attention``) in training on the C++
kernels' less common paths, against BatchNorm then the paper-literal SA: a constant spatial
gate (a fresh layer) on planes with a vector tail, an output large enough for streaming
stores, and batches larger than the kernels' sample batch (kMaxBatch = 32). Output, every
gradient and the running statistics; per sample where samples are batched.
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import sanet
from sanet.ops import bn_shuffle_attention

from fused_utils import grads, randomize, rel, require_cpu_ext

require_cpu_ext()


def tail_and_reference(bn, sa, x, g, dtype):
    """``bn_shuffle_attention`` in x's dtype, and BatchNorm then the reference SA in ``dtype``,
    both in training, on copies of the modules: each one's (output, gradients of input, SA's
    and BatchNorm's parameters, BatchNorm's buffers)."""
    res = []
    for fused in (True, False):
        b, s = copy.deepcopy(bn).train(), copy.deepcopy(sa)
        xi = x.detach().clone().requires_grad_(True)
        if fused:
            y = bn_shuffle_attention(xi, b, s)
        else:
            b, s, xi = b.to(dtype), s.to(dtype), x.detach().to(dtype).requires_grad_(True)
            s.impl = "reference"
            y = s(b(xi))
        res.append((y, grads(y, [xi, *s.parameters(), *b.parameters()], g.to(y.dtype)), list(b.buffers())))
    return res


def grad_names(sa):
    return ["input", *(n for n, _ in sa.named_parameters()), "bn.weight", "bn.bias"]


def assert_fp64_grads_and_buffers(sa, grads_fused, grads_ref, buffers_fused, buffers_ref):
    for name, a, b in zip(grad_names(sa), grads_fused, grads_ref):
        assert rel(a, b) < 1e-10, name
    for a, b in zip(buffers_fused, buffers_ref):
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("hw", [(7, 7), (3, 3)])
def test_fresh_sa_after_training_bn_on_planes_with_a_vector_tail(hw):
    """A fresh layer (sweight = cweight = 0: constant gates, the kernels' own path) on planes
    whose size is not a multiple of the vector width: every parameter gradient, sweight's
    (its only signal at initialisation) above all."""
    gen = torch.Generator().manual_seed(41)
    bn, sa = nn.BatchNorm2d(32).double(), sanet.ShuffleAttention(32, 4).double()
    randomize(bn, gen)
    x = torch.randn(2, 32, *hw, generator=gen, dtype=torch.float64) * 3 + 1
    g = torch.randn(x.shape, generator=gen, dtype=torch.float64)
    (y, gf, bf), (y_ref, g_ref, b_ref) = tail_and_reference(bn, sa, x, g, torch.float64)
    assert rel(y, y_ref) < 1e-12
    assert_fp64_grads_and_buffers(sa, gf, g_ref, bf, b_ref)


def test_streaming_output_with_small_planes():
    """An output of 8 MiB (kStreamBytes: the kernels store it with streaming stores) of
    small planes (the two-pass path of training BatchNorm), in fp32 against an fp64 oracle:
    within 1e-5, or no worse than twice BatchNorm then the reference SA in fp32 (BatchNorm's
    parameter gradients are sums of many terms of both signs)."""
    gen = torch.Generator().manual_seed(42)
    bn, sa = nn.BatchNorm2d(256), sanet.ShuffleAttention(256, 8)
    randomize(bn, gen)
    randomize(sa, gen)
    x = torch.randn(32, 256, 16, 16, generator=gen) * 2 + 1
    assert x.numel() * x.element_size() >= 8 << 20  # csrc/sa_vec.h
    g = torch.randn(x.shape, generator=gen)
    (y, gf, bf), (y64, g64, b64) = tail_and_reference(bn, sa, x, g, torch.float64)
    _, (_, g32, _) = tail_and_reference(bn, sa, x, g, torch.float32)
    assert rel(y, y64) <= 1e-5
    for name, a, r32, r64 in zip(grad_names(sa), gf, g32, g64):
        assert rel(a, r64) <= max(1e-5, 2 * rel(r32, r64)), name
    for name, a, b in zip(["running_mean", "running_var"], bf, b64):
        assert rel(a, b) <= 1e-6, name
    assert bf[2].item() == 1


def test_batch_larger_than_the_kernels_sample_batch():
    """40 samples (kMaxBatch = 32) of large planes (>= 8 KiB: training BatchNorm's
    per-channel walk, which batches samples): every sample's output and input gradient,
    samples 32..39 checked on their own, parameter gradients and running statistics."""
    gen = torch.Generator().manual_seed(43)
    bn, sa = nn.BatchNorm2d(8).double(), sanet.ShuffleAttention(8, 2).double()
    randomize(bn, gen)
    randomize(sa, gen)
    x = torch.randn(40, 8, 40, 40, generator=gen, dtype=torch.float64) * 2 + 0.5
    x[32:] *= 3  # the samples past 32 differ: they move the batch statistics
    g = torch.randn(x.shape, generator=gen, dtype=torch.float64)
    (y, gf, bf), (y_ref, g_ref, b_ref) = tail_and_reference(bn, sa, x, g, torch.float64)
    for n in list(range(32, 40)) + [0, 31]:
        assert rel(y[n], y_ref[n]) < 1e-12, f"output of sample {n}"
        assert rel(gf[0][n], g_ref[0][n]) < 1e-10, f"input gradient of sample {n}"
    assert rel(y, y_ref) < 1e-12
    assert_fp64_grads_and_buffers(sa, gf, g_ref, bf, b_ref)

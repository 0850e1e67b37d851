"""``torch.ops.sanet.sa_forward`` / ``sa_backward``: the fused SA kernels as PyTorch custom ops.

Registered with :mod:`torch.library` so that autograd, ``torch.compile`` (fake tensors) and
the device dispatch (C++ on CPU, Triton on CUDA) all see one op. The op computes, on
(N, C, M) contiguous input ``x``::

    z   = x                          or BatchNorm(x) (batch or given statistics)
    s   = ShuffleAttention(z)        (per-channel gate, then the 2-group shuffle)
    out = s (+ shortcut) (ReLU)

Backward keeps only ``x``, per-(n, c) plane statistics, per-channel BatchNorm statistics
and, with ReLU, ``out`` (which the next layer keeps anyway); never a full-size
intermediate. Small tensors (gate parameters packed as a (6, c) array, BatchNorm
parameters and statistics) are float64.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import Tensor

from .cpu_ext import load_cpu_ext

__all__ = ["sa_forward", "sa_backward", "sa_param_grads"]


def _cpu_ext():
    ext = load_cpu_ext()
    if ext is None:
        raise RuntimeError("sanet: the fused CPU kernel is unavailable; see sanet.ops.cpu_ext_status()")
    return ext


@torch.library.custom_op("sanet::sa_forward", mutates_args=())
def sa_forward(
    x: Tensor,
    shortcut: Optional[Tensor],
    params: Tensor,
    groups: int,
    eps: float,
    bn_weight: Optional[Tensor],
    bn_bias: Optional[Tensor],
    bn_mean: Optional[Tensor],
    bn_invstd: Optional[Tensor],
    bn_train: bool,
    bn_eps: float,
    relu: bool,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Returns (out, plane mean, plane var, batch mean, batch var); the last two are empty
    unless ``bn_train``."""
    out, pmean, pvar, bmean, bvar = _cpu_ext().sa_forward(
        x, shortcut, params, groups, eps, bn_weight, bn_bias, bn_mean, bn_invstd, bn_train,
        bn_eps, relu)
    return out, pmean, pvar, bmean, bvar


@sa_forward.register_fake
def _sa_forward_fake(x, shortcut, params, groups, eps, bn_weight, bn_bias, bn_mean, bn_invstd,
                     bn_train, bn_eps, relu):
    n, c = x.shape[0], x.shape[1]
    stats = x.new_empty((n, c), dtype=torch.float64)
    bstats = x.new_empty((c if bn_train else 0,), dtype=torch.float64)
    return torch.empty_like(x), stats, stats.clone(), bstats, bstats.clone()


@torch.library.custom_op("sanet::sa_backward", mutates_args=())
def sa_backward(
    grad: Tensor,
    x: Tensor,
    out: Optional[Tensor],
    pmean: Tensor,
    pvar: Tensor,
    params: Tensor,
    groups: int,
    eps: float,
    bn_weight: Optional[Tensor],
    bn_bias: Optional[Tensor],
    bn_mean: Optional[Tensor],
    bn_invstd: Optional[Tensor],
    bn_train: bool,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Returns (grad x, grad pre-ReLU (empty without ``out``), S1, S2, d bn_weight, d bn_bias)."""
    gx, gpre, s1, s2, dw, db = _cpu_ext().sa_backward(
        grad, x, out, pmean, pvar, params, groups, eps, bn_weight, bn_bias, bn_mean, bn_invstd,
        bn_train)
    if gpre is None:  # the kernel returns an undefined tensor without ReLU
        gpre = x.new_empty((0,))
    return gx, gpre, s1, s2, dw, db


@sa_backward.register_fake
def _sa_backward_fake(grad, x, out, pmean, pvar, params, groups, eps, bn_weight, bn_bias,
                      bn_mean, bn_invstd, bn_train):
    n, c = x.shape[0], x.shape[1]
    stats = x.new_empty((n, c), dtype=torch.float64)
    bn = x.new_empty((c if bn_weight is not None else 0,), dtype=torch.float64)
    gpre = torch.empty_like(x) if out is not None else x.new_empty((0,))
    return torch.empty_like(x), gpre, stats, stats.clone(), bn, bn.clone()


def sa_param_grads(s1: Tensor, s2: Tensor, params: Tensor, groups: int) -> Tensor:
    """Gradient of the packed (6, c) gate parameters from the kernel's per-plane sums.

    ``s1[n, ch] = sum(dL/du)``; ``s2`` is ``s1 * mean(z)`` on channel-branch channels and
    ``sum(dL/du * zhat)`` on spatial-branch channels (u: gate argument, zhat: GroupNorm's
    normalised input).
    """
    c = params.shape[1]
    s1 = s1.reshape(s1.shape[0], groups, 2, c).sum((0, 1))
    s2 = s2.reshape(s2.shape[0], groups, 2, c).sum((0, 1))
    sw, gw, gb = params[2], params[4], params[5]
    return torch.stack([
        s2[0],                     # cweight: dL/du * mean
        s1[0],                     # cbias
        gw * s2[1] + gb * s1[1],   # sweight: dL/du * gn(x)
        s1[1],                     # sbias
        sw * s2[1],                # gn.weight
        sw * s1[1],                # gn.bias
    ])


def _setup_context(ctx, inputs, output):
    (x, shortcut, params, groups, eps, bn_weight, bn_bias, bn_mean, bn_invstd, bn_train,
     bn_eps, relu) = inputs
    out, pmean, pvar, bmean, bvar = output
    if bn_train:
        bn_mean, bn_invstd = bmean, torch.rsqrt(bvar + bn_eps)
    ctx.save_for_backward(x, out if relu else None, pmean, pvar, params, bn_weight, bn_bias,
                          bn_mean, bn_invstd)
    ctx.groups, ctx.eps, ctx.bn_train = groups, eps, bn_train
    ctx.has_shortcut = shortcut is not None
    ctx.set_materialize_grads(True)


def _backward(ctx, g_out, *unused_stat_grads):
    x, out, pmean, pvar, params, bn_weight, bn_bias, bn_mean, bn_invstd = ctx.saved_tensors
    gx, gpre, s1, s2, dbw, dbb = sa_backward(
        g_out.contiguous(), x, out, pmean, pvar, params, ctx.groups, ctx.eps, bn_weight,
        bn_bias, bn_mean, bn_invstd, ctx.bn_train)
    g_shortcut = None
    if ctx.has_shortcut:
        g_shortcut = gpre if out is not None else g_out
    g_params = sa_param_grads(s1, s2, params, ctx.groups)
    has_bn = bn_weight is not None
    return (gx, g_shortcut, g_params, None, None, dbw if has_bn else None,
            dbb if has_bn else None, None, None, None, None, None)


sa_forward.register_autograd(_backward, setup_context=_setup_context)


@sa_forward.register_kernel("cuda")
def _sa_forward_cuda(x, shortcut, params, groups, eps, bn_weight, bn_bias, bn_mean, bn_invstd,
                     bn_train, bn_eps, relu):
    if shortcut is not None or bn_weight is not None or relu:
        raise NotImplementedError("sanet: BatchNorm/residual fusion is CPU-only; on CUDA they run as separate ops")
    from .triton_sa import triton_sa_forward

    out, pmean, pvar = triton_sa_forward(x, params, groups, eps)
    empty = pmean.new_empty((0,))
    return out, pmean, pvar, empty, empty.clone()


@sa_backward.register_kernel("cuda")
def _sa_backward_cuda(grad, x, out, pmean, pvar, params, groups, eps, bn_weight, bn_bias, bn_mean,
                      bn_invstd, bn_train):
    from .triton_sa import triton_sa_backward

    gx, s1, s2 = triton_sa_backward(grad, x, pmean, pvar, params, groups, eps)
    empty = pmean.new_empty((0,))
    return gx, x.new_empty((0,)), s1, s2, empty, empty.clone()

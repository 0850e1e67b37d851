"""``torch.ops.sanet.sa_forward`` / ``sa_backward``: the fused SA kernels as PyTorch custom ops.

Registered with :mod:`torch.library` so that autograd, ``torch.compile`` (fake tensors) and
the device dispatch (C++ on CPU, Triton on CUDA) all see one op. On (N, C, M) contiguous
input ``x`` the op computes::

    z   = x                          or BatchNorm(x) (batch or given running statistics)
    s   = ShuffleAttention(z)        (per-channel gate, then the 2-group shuffle)
    out = s (+ shortcut) (ReLU)

Parameters go in as they are (any float dtype); the kernels read them as float64. Backward
keeps only ``x``, per-(n, c) plane statistics (float64, N x C), BatchNorm's per-channel
statistics and, with the ReLU, ``out`` (which the next layer keeps anyway) — never a
full-size intermediate.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

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
    cweight: Tensor,
    cbias: Tensor,
    sweight: Tensor,
    sbias: Tensor,
    gn_weight: Tensor,
    gn_bias: Tensor,
    groups: int,
    eps: float,
    bn_weight: Optional[Tensor],
    bn_bias: Optional[Tensor],
    bn_mean: Optional[Tensor],
    bn_var: Optional[Tensor],
    bn_train: bool,
    bn_eps: float,
    relu: bool,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Returns (out, plane mean, plane var, batch mean, batch var); the batch statistics are
    empty unless ``bn_train``. BatchNorm is fused when ``bn_train`` or when its running
    statistics ``bn_mean``/``bn_var`` are given."""
    out, pmean, pvar, bmean, bvar = _cpu_ext().sa_forward(
        x, shortcut, cweight, cbias, sweight, sbias, gn_weight, gn_bias, groups, eps, bn_weight,
        bn_bias, bn_mean, bn_var, bn_train, bn_eps, relu)
    return out, pmean, pvar, bmean, bvar


@sa_forward.register_fake
def _sa_forward_fake(x, shortcut, cweight, cbias, sweight, sbias, gn_weight, gn_bias, groups, eps,
                     bn_weight, bn_bias, bn_mean, bn_var, bn_train, bn_eps, relu):
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
    cweight: Tensor,
    cbias: Tensor,
    sweight: Tensor,
    sbias: Tensor,
    gn_weight: Tensor,
    gn_bias: Tensor,
    groups: int,
    eps: float,
    bn_weight: Optional[Tensor],
    bn_bias: Optional[Tensor],
    bn_mean: Optional[Tensor],
    bn_var: Optional[Tensor],
    bn_train: bool,
    bn_eps: float,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Returns (grad x, grad before the ReLU (empty without ``out``), S1, S2, d bn_weight,
    d bn_bias); BatchNorm is part of the op when ``bn_mean``/``bn_var`` are given."""
    gx, gpre, s1, s2, dw, db = _cpu_ext().sa_backward(
        grad, x, out, pmean, pvar, cweight, cbias, sweight, sbias, gn_weight, gn_bias, groups, eps,
        bn_weight, bn_bias, bn_mean, bn_var, bn_train, bn_eps)
    if gpre is None:  # the kernel returns an undefined tensor without ReLU
        gpre = x.new_empty((0,))
    return gx, gpre, s1, s2, dw, db


@sa_backward.register_fake
def _sa_backward_fake(grad, x, out, pmean, pvar, cweight, cbias, sweight, sbias, gn_weight, gn_bias,
                      groups, eps, bn_weight, bn_bias, bn_mean, bn_var, bn_train, bn_eps):
    n, c = x.shape[0], x.shape[1]
    stats = x.new_empty((n, c), dtype=torch.float64)
    bn = x.new_empty((c if bn_mean is not None else 0,), dtype=torch.float64)
    gpre = torch.empty_like(x) if out is not None else x.new_empty((0,))
    return torch.empty_like(x), gpre, stats, stats.clone(), bn, bn.clone()


def sa_param_grads(s1: Tensor, s2: Tensor, params: Sequence[Tensor], groups: int) -> List[Tensor]:
    """Gradients of the six gate parameters from the kernels' per-plane sums.

    ``s1[n, ch] = sum(dL/du)`` over the plane (u: gate argument); ``s2`` is ``s1 * mean(z)``
    on channel-branch channels and ``sum(dL/du * zhat)`` on spatial-branch channels (zhat:
    GroupNorm's normalised input). Returned in each parameter's shape and dtype.
    """
    c = params[0].numel()
    s1 = s1.reshape(s1.shape[0], groups, 2, c).sum((0, 1))
    s2 = s2.reshape(s2.shape[0], groups, 2, c).sum((0, 1))
    sw, gw, gb = (params[i].reshape(-1).to(torch.float64) for i in (2, 4, 5))
    grads = [
        s2[0],                    # cweight: dL/du * mean
        s1[0],                    # cbias
        gw * s2[1] + gb * s1[1],  # sweight: dL/du * gn(z)
        s1[1],                    # sbias
        sw * s2[1],               # gn.weight
        sw * s1[1],               # gn.bias
    ]
    return [g.to(p.dtype).reshape(p.shape) for g, p in zip(grads, params)]


def _setup_context(ctx, inputs, output):
    (x, shortcut, cw, cb, sw, sb, gw, gb, groups, eps, bn_weight, bn_bias, bn_mean, bn_var,
     bn_train, bn_eps, relu) = inputs
    out, pmean, pvar, bmean, bvar = output
    has_bn = bn_train or bn_mean is not None
    if bn_train:
        bn_mean, bn_var = bmean, bvar
    elif has_bn:
        # Running statistics can change before backward runs (a later training forward).
        bn_mean, bn_var = bn_mean.clone(), bn_var.clone()
    ctx.save_for_backward(x, out if relu else None, pmean, pvar, cw, cb, sw, sb, gw, gb,
                          bn_weight, bn_bias, bn_mean, bn_var)
    ctx.groups, ctx.eps, ctx.bn_train, ctx.bn_eps = groups, eps, bn_train, bn_eps
    ctx.has_shortcut, ctx.has_bn = shortcut is not None, has_bn


def _backward(ctx, g_out, *unused_stat_grads):
    x, out, pmean, pvar, *params, bn_weight, bn_bias, bn_mean, bn_var = ctx.saved_tensors
    gx, gpre, s1, s2, dbw, dbb = sa_backward(
        g_out.contiguous(), x, out, pmean, pvar, *params, ctx.groups, ctx.eps, bn_weight, bn_bias,
        bn_mean, bn_var, ctx.bn_train, ctx.bn_eps)
    g_shortcut = None
    if ctx.has_shortcut:
        g_shortcut = gpre if out is not None else g_out
    g_bn_w = dbw.to(bn_weight.dtype) if ctx.has_bn and bn_weight is not None else None
    g_bn_b = dbb.to(bn_bias.dtype) if ctx.has_bn and bn_bias is not None else None
    return (gx, g_shortcut, *sa_param_grads(s1, s2, params, ctx.groups), None, None, g_bn_w,
            g_bn_b, None, None, None, None, None)


sa_forward.register_autograd(_backward, setup_context=_setup_context)


@sa_forward.register_kernel("cuda")
def _sa_forward_cuda(x, shortcut, cweight, cbias, sweight, sbias, gn_weight, gn_bias, groups, eps,
                     bn_weight, bn_bias, bn_mean, bn_var, bn_train, bn_eps, relu):
    if shortcut is not None or bn_train or bn_mean is not None or relu:
        raise NotImplementedError("sanet: BatchNorm/residual fusion is CPU-only; on CUDA they run as separate ops")
    from .triton_sa import triton_sa_forward

    out, pmean, pvar = triton_sa_forward(x, [cweight, cbias, sweight, sbias, gn_weight, gn_bias], groups, eps)
    empty = pmean.new_empty((0,))
    return out, pmean, pvar, empty, empty.clone()


@sa_backward.register_kernel("cuda")
def _sa_backward_cuda(grad, x, out, pmean, pvar, cweight, cbias, sweight, sbias, gn_weight, gn_bias,
                      groups, eps, bn_weight, bn_bias, bn_mean, bn_var, bn_train, bn_eps):
    from .triton_sa import triton_sa_backward

    params = [cweight, cbias, sweight, sbias, gn_weight, gn_bias]
    gx, s1, s2 = triton_sa_backward(grad, x, pmean, pvar, params, groups, eps)
    empty = pmean.new_empty((0,))
    return gx, x.new_empty((0,)), s1, s2, empty, empty.clone()

"""The Triton path of the fused op on CUDA: launchers of the kernels in ``triton_kernels.py``.

``triton_sa_forward`` / ``triton_sa_backward`` / ``triton_update_running_stats`` implement
``sanet::sa_forward``, ``sa_backward`` and the running-statistics update for CUDA tensors
(``sa_op.KERNELS``) with the CPU kernel's contract. Here: how planes are tiled into programs,
the geometry the kernels index by, and the argument checks the C++ kernel does in C++.
"""
from __future__ import annotations

import functools
from typing import Optional, Sequence, Tuple

import torch
from torch import Tensor

from .arg_checks import check_op_args
from .sa_op import param_grads_dtype
from .triton_kernels import _HAS_TRITON

if _HAS_TRITON:
    from .triton_kernels import _batch_merge, _param_grads, _running_update, _sa_bwd, _sa_fwd

__all__ = ["triton_available", "triton_sa_forward", "triton_sa_backward", "triton_update_running_stats"]

# Planes up to _MAX_TILE elements stay in registers; larger ones are walked in chunks of
# _LOOP_BLOCK. A program owns about _TILE elements (several small planes, or one plane).
_MAX_TILE = 4096
_LOOP_BLOCK = 1024
_TILE = 2048


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    """Triton imports and a CUDA device is present."""
    return _HAS_TRITON and torch.cuda.is_available()


@functools.lru_cache(maxsize=None)
def _tiling(m: int) -> dict:
    """ROWS planes per program, BLOCK elements per row, whole planes in registers or not."""
    block = max(16, 1 << max(0, m - 1).bit_length())  # next power of 2
    single = block <= _MAX_TILE
    if not single:
        block = _LOOP_BLOCK
    rows = max(1, _TILE // block)
    return dict(SINGLE=single, ROWS=rows, BLOCK=block, num_warps=4 if rows * block <= 2048 else 8)


def _geometry(x: Tensor, groups: int) -> dict:
    n, c = x.shape[:2]  # (N, C, *) contiguous: N * C planes of M elements
    m = x.numel() // (n * c) if n * c else 0
    return dict(NC=n * c, C=c, M=m, CG=c // groups, CC=c // (2 * groups), HALF=c // 2)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)  # triton.cdiv is a jit function: microseconds per call from Python


def _params(params: Sequence[Tensor]) -> dict:
    # (1, c, 1, 1) and (c,) tensors; the kernels index them as dense vectors (a view with
    # other strides, e.g. a slice of a larger tensor, is copied: c values)
    return dict(zip(("cw", "cb", "sw", "sb", "gw", "gb"), (p.contiguous() for p in params)))


def _bn_args(x: Tensor, bn_weight, bn_bias, bn_mean, bn_var) -> dict:
    # Absent tensors are passed as x and never read (their HAS_* flag is off).
    return dict(bw=x if bn_weight is None else bn_weight, bb=x if bn_bias is None else bn_bias,
                bm=x if bn_mean is None else bn_mean, bv=x if bn_var is None else bn_var,
                HAS_BN=bn_mean is not None, HAS_BW=bn_weight is not None, HAS_BB=bn_bias is not None)


def _merge(p: Tensor, q: Tensor, out_a: Tensor, out_b: Tensor, var: Optional[Tensor] = None,
           eps: float = 0.0) -> None:
    n, c = p.shape
    _batch_merge[(_cdiv(c, 64),)](p, q, out_a, out_b, p if var is None else var, n, c, eps,
                                        VAR=var is None, BLOCK_N=16, BLOCK_C=64)


def triton_sa_forward(x: Tensor, shortcut: Optional[Tensor], cweight: Tensor, cbias: Tensor,
                      sweight: Tensor, sbias: Tensor, gn_weight: Tensor, gn_bias: Tensor, groups: int,
                      eps: float, bn_weight: Optional[Tensor] = None, bn_bias: Optional[Tensor] = None,
                      bn_mean: Optional[Tensor] = None, bn_var: Optional[Tensor] = None,
                      bn_train: bool = False, bn_eps: float = 1e-5,
                      relu: bool = False) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The ``sanet::sa_forward`` op (same arguments) on contiguous (N, C, *) CUDA tensors."""
    params = (cweight, cbias, sweight, sbias, gn_weight, gn_bias)
    check_op_args("sanet::sa_forward", x, shortcut, params, groups, (bn_weight, bn_bias, bn_mean, bn_var))
    n, c = x.shape[:2]
    geo = _geometry(x, groups)
    tiling = _tiling(geo["M"])
    out = torch.empty_like(x)
    pm = x.new_empty((n, c), dtype=torch.float64)
    pv = torch.empty_like(pm)
    bmean = pm.new_empty((c if bn_train else 0,))
    bvar = torch.empty_like(bmean)
    args = dict(x=x, sc=x if shortcut is None else shortcut, out=out, pm=pm, pv=pv, eps=eps,
                bn_eps=bn_eps, HAS_SC=shortcut is not None, RELU=relu, **_params(params), **geo, **tiling)
    grid = (_cdiv(geo["NC"], tiling["ROWS"]),)
    if bn_train:  # batch statistics first: per-plane statistics, merged per channel
        _sa_fwd[grid](**args, **_bn_args(x, bn_weight, bn_bias, None, None), STATS_IN=False,
                      STATS_ONLY=True)
        _merge(pm, pv, bmean, bvar)
        bn_mean, bn_var = bmean, bvar
    _sa_fwd[grid](**args, **_bn_args(x, bn_weight, bn_bias, bn_mean, bn_var), STATS_IN=bn_train,
                  STATS_ONLY=False)
    return out, pm, pv, bmean, bvar


def triton_sa_backward(grad: Tensor, x: Tensor, out: Optional[Tensor], pm: Tensor, pv: Tensor,
                       cweight: Tensor, cbias: Tensor, sweight: Tensor, sbias: Tensor, gn_weight: Tensor,
                       gn_bias: Tensor, groups: int, eps: float, bn_weight: Optional[Tensor] = None,
                       bn_bias: Optional[Tensor] = None, bn_mean: Optional[Tensor] = None,
                       bn_var: Optional[Tensor] = None, bn_train: bool = False, bn_eps: float = 1e-5
                       ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The ``sanet::sa_backward`` op (same arguments): (grad x, grad before the ReLU, the six
    gate parameters' gradients as one (6, c) tensor in ``param_grads_dtype``, BatchNorm's d weight and
    d bias)."""
    params = (cweight, cbias, sweight, sbias, gn_weight, gn_bias)
    check_op_args("sanet::sa_backward", x, None, params, groups, (bn_weight, bn_bias, bn_mean, bn_var))
    if grad.shape != x.shape or grad.dtype != x.dtype:
        raise ValueError(f"sanet::sa_backward: grad must have x's shape {list(x.shape)} and dtype {x.dtype}, "
                         f"got {list(grad.shape)} {grad.dtype}")
    n, c = x.shape[:2]
    geo = _geometry(x, groups)
    tiling = _tiling(geo["M"])
    has_bn, relu = bn_mean is not None, out is not None
    gx = torch.empty_like(x)
    gpre = torch.empty_like(x) if relu else x.new_empty((0,))
    s1 = pm.new_empty((n, c))
    s2 = torch.empty_like(s1)
    sg, sgx = (torch.empty_like(s1), torch.empty_like(s1)) if has_bn else (s1, s2)  # unused without BN
    bn_dtype = torch.float32 if bn_weight is None else bn_weight.dtype
    # BatchNorm's sums over the batch, d weight = sum(gz * xhat) and d bias = sum(gz), in
    # fp32 (or float64) whatever BatchNorm's dtype: phase 2 reads them back for dx, and in
    # fp16 they overflow (sum(gz) over a 4x64x64 batch of gradients ~10 is ~1e5: dx was inf).
    # Rounded to BatchNorm's dtype only on return (inf there, as fp16 BatchNorm's would be).
    sums_dtype = torch.float64 if bn_dtype == torch.float64 else torch.float32
    dbw = x.new_empty((c if has_bn else 0,), dtype=sums_dtype)
    dbb = torch.empty_like(dbw)
    if geo["M"] == 0:  # planes without pixels: nothing to sum, and their statistics are 0/0
        gp = params[0].new_zeros((6, geo["CC"]), dtype=param_grads_dtype(params))
        return (gx, gpre, gp, dbw.zero_().to(bn_dtype),
                dbb.zero_().to(bn_dtype))
    p = _params(params)
    args = dict(grad=grad, x=x, out=out if relu else x, gpre=gpre if relu else x, gx=gx, pm=pm, pv=pv,
                s1=s1, s2=s2, sg=sg, sgx=sgx, tsg=dbb, tsgx=dbw, eps=eps, bn_eps=bn_eps,
                NM=float(n * geo["M"]), BN_TRAIN=bn_train, **p,
                **_bn_args(x, bn_weight, bn_bias, bn_mean, bn_var), **geo, **tiling)
    grid = (_cdiv(geo["NC"], tiling["ROWS"]),)
    _sa_bwd[grid](**args, PHASE=1, RELU_MASK=relu, FROM_GPRE=False)
    if has_bn:  # sums over the batch: d bias = sum(gz), d weight = sum(gz * xhat)
        _merge(sg, sgx, dbb, dbw, bn_var, bn_eps)
        if bn_train:
            _sa_bwd[grid](**args, PHASE=2, RELU_MASK=False, FROM_GPRE=relu)
    gp = params[0].new_empty((6, geo["CC"]), dtype=param_grads_dtype(params))
    block_j = min(64, 1 << (geo["CC"] - 1).bit_length())  # next power of 2
    _param_grads[(_cdiv(geo["CC"], block_j),)](s1, s2, p["sw"], p["gw"], p["gb"], gp, n * groups, c, geo["CG"],
                                                geo["CC"], BLOCK_R=max(1, 1024 // block_j), BLOCK_J=block_j,
                                                num_warps=8)
    return gx, gpre, gp, dbw.to(bn_dtype), dbb.to(bn_dtype)  # no copy unless fp16/bf16


def triton_update_running_stats(bmean: Tensor, bvar: Tensor, running_mean: Tensor, running_var: Tensor,
                                num_batches_tracked: Tensor, momentum: Optional[float], count: int) -> None:
    """``nn.BatchNorm``'s running-statistics update from the batch mean and biased variance,
    in one launch (as PyTorch ops it is six)."""
    _running_update[(1,)](bmean, bvar, running_mean, running_var, num_batches_tracked, bmean.numel(),
                          0.0 if momentum is None else float(momentum), count / (count - 1),
                          CUMULATIVE=momentum is None, BLOCK=256)

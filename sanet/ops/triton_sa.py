"""Triton kernels for Shuffle Attention on CUDA (forward and backward, one program per plane).

Same per-channel form as the CPU kernel (SA-NET.md section 5): each program owns one (n, c)
plane, computes its statistics in fp32, then writes ``x * sigmoid(A x + B)`` into the
shuffled channel; backward recomputes the gate from ``x`` and the saved statistics.
BatchNorm/residual fusion is CPU-only; on CUDA those run as separate ops.

The kernels also run on CPU tensors under ``TRITON_INTERPRET=1`` (set before importing
triton), which is how the test suite checks them on machines without a GPU.
"""
from __future__ import annotations

import functools
from typing import Sequence, Tuple

import torch
from torch import Tensor

__all__ = ["triton_available", "triton_sa_forward", "triton_sa_backward"]

try:
    import triton
    import triton.language as tl

    _HAS_TRITON = True
except Exception:  # pragma: no cover - triton ships with CUDA builds of torch on Linux
    _HAS_TRITON = False


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    """Triton imports and a CUDA device is present."""
    return _HAS_TRITON and torch.cuda.is_available()


if _HAS_TRITON:

    @triton.jit
    def _gate_coeffs(params_ptr, c, CG, CC, mean, var, eps):
        # A, B of the gate sigmoid(A (x - mean) + B) for channel c (SA-NET.md section 5);
        # centring first keeps one-pixel planes exact (A ~ 1/sqrt(eps) there).
        j = (c % CG) % CC
        spatial = (c % CG) >= CC
        cw = tl.load(params_ptr + j)
        cb = tl.load(params_ptr + CC + j)
        sw = tl.load(params_ptr + 2 * CC + j)
        sb = tl.load(params_ptr + 3 * CC + j)
        gw = tl.load(params_ptr + 4 * CC + j)
        gb = tl.load(params_ptr + 5 * CC + j)
        rstd = 1.0 / tl.sqrt(var + eps)
        a = tl.where(spatial, sw * gw * rstd, 0.0)
        b = tl.where(spatial, sw * gb + sb, cw * mean + cb)
        return a, b, rstd, spatial, cw, sw * gw * rstd

    @triton.jit
    def _sa_fwd_kernel(x_ptr, out_ptr, mean_ptr, var_ptr, params_ptr, C, M, CG, CC, HALF, eps,
                       BLOCK: tl.constexpr):
        pid = tl.program_id(0)
        n = pid // C
        c = pid % C
        src = pid.to(tl.int64) * M
        oc = 2 * (c % HALF) + c // HALF
        dst = (n * C + oc).to(tl.int64) * M
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for start in range(0, M, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            acc += tl.load(x_ptr + src + offs, mask=offs < M, other=0.0).to(tl.float32)
        mean = tl.sum(acc, axis=0) / M
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for start in range(0, M, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            mask = offs < M
            v = tl.load(x_ptr + src + offs, mask=mask, other=0.0).to(tl.float32)
            d = tl.where(mask, v - mean, 0.0)
            acc += d * d
        var = tl.sum(acc, axis=0) / M
        tl.store(mean_ptr + pid, mean.to(tl.float64))
        tl.store(var_ptr + pid, var.to(tl.float64))
        a, b, rstd, spatial, cw, k = _gate_coeffs(params_ptr, c, CG, CC, mean, var, eps)
        for start in range(0, M, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            mask = offs < M
            v = tl.load(x_ptr + src + offs, mask=mask, other=0.0).to(tl.float32)
            y = v * tl.sigmoid(a * (v - mean) + b)
            tl.store(out_ptr + dst + offs, y.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _sa_bwd_kernel(g_ptr, x_ptr, gx_ptr, mean_ptr, var_ptr, s1_ptr, s2_ptr, params_ptr, C, M,
                       CG, CC, HALF, eps, BLOCK: tl.constexpr):
        pid = tl.program_id(0)
        n = pid // C
        c = pid % C
        src = pid.to(tl.int64) * M
        oc = 2 * (c % HALF) + c // HALF
        gsrc = (n * C + oc).to(tl.int64) * M
        mean = tl.load(mean_ptr + pid).to(tl.float32)
        var = tl.load(var_ptr + pid).to(tl.float32)
        a, b, rstd, spatial, cw, k = _gate_coeffs(params_ptr, c, CG, CC, mean, var, eps)
        # Pass A: S1 = sum(gu), Sgx = sum(gu * x), gu = dL/du = g * x * s * (1 - s).
        acc1 = tl.zeros([BLOCK], dtype=tl.float32)
        acc2 = tl.zeros([BLOCK], dtype=tl.float32)
        for start in range(0, M, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            mask = offs < M
            v = tl.load(x_ptr + src + offs, mask=mask, other=0.0).to(tl.float32)
            g = tl.load(g_ptr + gsrc + offs, mask=mask, other=0.0).to(tl.float32)
            s = tl.sigmoid(a * (v - mean) + b)
            gu = g * v * s * (1.0 - s)
            acc1 += gu
            acc2 += gu * v
        s1 = tl.sum(acc1, axis=0)
        szh = rstd * (tl.sum(acc2, axis=0) - mean * s1)
        tl.store(s1_ptr + pid, s1.to(tl.float64))
        tl.store(s2_ptr + pid, tl.where(spatial, szh, s1 * mean).to(tl.float64))
        # dL/dx = g*s + k*gu + k0 + kx*x  (k = sw*gw*rstd: GroupNorm backward; channel
        # branch: the mean's gradient cw*S1/M, uniform over the plane).
        k = tl.where(spatial & (M > 1), k, 0.0)  # a one-pixel plane's GroupNorm term is 0
        k0 = tl.where(spatial, -k * s1 / M + k * szh * rstd * mean / M, cw * s1 / M)
        kx = tl.where(spatial, -k * szh * rstd / M, 0.0)
        for start in range(0, M, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            mask = offs < M
            v = tl.load(x_ptr + src + offs, mask=mask, other=0.0).to(tl.float32)
            g = tl.load(g_ptr + gsrc + offs, mask=mask, other=0.0).to(tl.float32)
            s = tl.sigmoid(a * (v - mean) + b)
            gu = g * v * s * (1.0 - s)
            gx = g * s + k * gu + k0 + kx * v
            tl.store(gx_ptr + src + offs, gx.to(gx_ptr.dtype.element_ty), mask=mask)


def _block(m: int) -> int:
    return max(16, min(1024, triton.next_power_of_2(m)))


def _params32(params: Sequence[Tensor]) -> Tensor:
    # The six gate parameters as one (6 * c,) fp32 array, rows in the kernel's order.
    return torch.cat([p.reshape(-1) for p in params]).to(torch.float32).contiguous()


def _geometry(x: Tensor, groups: int):
    c = x.shape[1]
    return c, x.shape[2], c // groups, c // (2 * groups), c // 2


def triton_sa_forward(x: Tensor, params: Sequence[Tensor], groups: int,
                      eps: float) -> Tuple[Tensor, Tensor, Tensor]:
    """(N, C, M) contiguous ``x`` -> (out, plane mean, plane var); ``params``: the six gate
    parameters (cweight, cbias, sweight, sbias, gn.weight, gn.bias)."""
    n = x.shape[0]
    C, M, CG, CC, HALF = _geometry(x, groups)
    out = torch.empty_like(x)
    pmean = x.new_empty((n, C), dtype=torch.float64)
    pvar = torch.empty_like(pmean)
    p32 = _params32(params)
    _sa_fwd_kernel[(n * C,)](x, out, pmean, pvar, p32, C, M, CG, CC, HALF, eps, BLOCK=_block(M))
    return out, pmean, pvar


def triton_sa_backward(grad: Tensor, x: Tensor, pmean: Tensor, pvar: Tensor,
                       params: Sequence[Tensor], groups: int, eps: float) -> Tuple[Tensor, Tensor, Tensor]:
    """-> (grad x, S1, S2) with the same meaning as the CPU kernel's."""
    n = x.shape[0]
    C, M, CG, CC, HALF = _geometry(x, groups)
    gx = torch.empty_like(x)
    s1 = x.new_empty((n, C), dtype=torch.float64)
    s2 = torch.empty_like(s1)
    p32 = _params32(params)
    _sa_bwd_kernel[(n * C,)](grad, x, gx, pmean, pvar, s1, s2, p32, C, M, CG, CC, HALF, eps,
                             BLOCK=_block(M))
    return gx, s1, s2

"""The tests' own statement of SA-NET.md section 1, independent of sanet's code, and how the
layer tests compare a module against it.

``AuthorsSA`` computes SA the way the authors' ``sa_layer`` does on 4-D input: view
(N*G, C/G, H, W), chunk into two halves, average pool + per-channel affine + sigmoid gate on
the first, GroupNorm(c, c) + affine + sigmoid gate on the second, concatenate, 2-group
channel shuffle by a 5-D view/transpose; ``authors_sa_nd`` the same steps for any rank.
"""
from __future__ import annotations

from typing import Dict, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sanet import ShuffleAttention

from conftest import SA_PARAM_NAMES, randomize_sa_, rel_err, require_fused

IMPLS = ("reference", "torch", "fused", "auto")
FP32_TOL = 1e-5  # norm-wise relative error


# --------------------------------------------------------------------------- the reference
class AuthorsSA(nn.Module):
    """SA-NET.md section 1, one step per line, for (N, C, H, W) input."""

    def __init__(self, channels: int, groups: int) -> None:
        super().__init__()
        self.groups = groups
        c = channels // (2 * groups)
        self.cweight = nn.Parameter(torch.zeros(1, c, 1, 1))
        self.cbias = nn.Parameter(torch.ones(1, c, 1, 1))
        self.sweight = nn.Parameter(torch.zeros(1, c, 1, 1))
        self.sbias = nn.Parameter(torch.ones(1, c, 1, 1))
        self.gn = nn.GroupNorm(c, c)  # eps 1e-5, weight 1, bias 0
        self.avg_pool = nn.AdaptiveAvgPool2d(1)

    def forward(self, x: Tensor) -> Tensor:
        b, ch, h, w = x.shape
        x = x.reshape(b * self.groups, -1, h, w)        # 1. (N*G, C/G, H, W)
        x_0, x_1 = x.chunk(2, dim=1)                     #    two halves of c channels
        xn = self.avg_pool(x_0)                          # 2. channel branch
        xn = self.cweight * xn + self.cbias
        xn = x_0 * torch.sigmoid(xn)
        xs = self.gn(x_1)                                # 3. spatial branch
        xs = self.sweight * xs + self.sbias
        xs = x_1 * torch.sigmoid(xs)
        out = torch.cat([xn, xs], dim=1)                 # 4. concatenate, back to (N, C, H, W)
        out = out.reshape(b, -1, h, w)
        out = out.reshape(b, 2, -1, h, w)                # 5. shuffle: (N, 2, C/2, H, W),
        out = out.permute(0, 2, 1, 3, 4)                 #    swap axes 1 and 2, flatten
        return out.reshape(b, -1, h, w)


def authors_sa_nd(x: Tensor, p: Dict[str, Tensor], groups: int, eps: float = 1e-5) -> Tensor:
    """The same steps for any number of spatial dims (1-D, 2-D, 3-D): the average pool
    becomes a mean over all spatial dims and GroupNorm(c, c) is rank-agnostic."""
    b, ch, spatial = x.shape[0], x.shape[1], x.shape[2:]
    c = ch // (2 * groups)
    bcast = (1, c) + (1,) * len(spatial)
    dims = tuple(range(2, x.dim()))
    xg = x.reshape(b * groups, -1, *spatial)
    x_0, x_1 = xg.chunk(2, dim=1)
    xn = p["cweight"].reshape(bcast) * x_0.mean(dims, keepdim=True) + p["cbias"].reshape(bcast)
    xn = x_0 * torch.sigmoid(xn)
    xs = F.group_norm(x_1, c, p["gn.weight"], p["gn.bias"], eps)
    xs = p["sweight"].reshape(bcast) * xs + p["sbias"].reshape(bcast)
    xs = x_1 * torch.sigmoid(xs)
    out = torch.cat([xn, xs], dim=1).reshape(b, ch, *spatial)
    out = out.reshape(b, 2, ch // 2, *spatial).transpose(1, 2)
    return out.reshape(b, ch, *spatial)


def shuffle_index(channels: int) -> list:
    """out[:, 2k + i] = y[:, i * C/2 + k]."""
    half = channels // 2
    return [i * half + k for k in range(half) for i in range(2)]


# --------------------------------------------------------------------------- helpers
def make_pair(channels: int, groups: int, impl: str, dtype=torch.float32) -> Tuple[ShuffleAttention, AuthorsSA]:
    """The module with random parameters and the reference holding the same values."""
    require_fused(impl)
    module = randomize_sa_(ShuffleAttention(channels, groups, impl=impl)).to(dtype)
    ref = AuthorsSA(channels, groups).to(dtype)
    ref.load_state_dict(module.state_dict())  # strict: the authors' names and shapes
    return module, ref


def run_fwd_bwd(fn, x: Tensor, params, grad_out: Tensor):
    out = fn(x)
    grads = torch.autograd.grad(out, (x, *params), grad_out)
    return out, grads


def check_against(module: nn.Module, ref_fn, ref_params, x: Tensor, tol: float = FP32_TOL,
                  zero_grads: Tuple[str, ...] = ()) -> None:
    """Output, d/dx and d/d(every parameter) of ``module`` equal those of ``ref_fn``.

    ``zero_grads``: parameters whose exact gradient is 0, where a relative error means
    nothing; their gradient must be below ``tol`` times the size of the incoming gradient.
    """
    x_ref = x.detach().contiguous().requires_grad_()
    x_mod = x.detach().requires_grad_()  # keeps x's strides (channels_last stays channels_last)
    grad_out = torch.randn(x.shape, dtype=x.dtype)
    mod_params = [dict(module.named_parameters())[n] for n in SA_PARAM_NAMES]
    out, g_mod = run_fwd_bwd(module, x_mod, mod_params, grad_out)
    out_ref, g_ref = run_fwd_bwd(ref_fn, x_ref, ref_params, grad_out)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert rel_err(out, out_ref) <= tol, f"output: rel err {rel_err(out, out_ref):.3g}"
    for name, a, b in zip(("input",) + SA_PARAM_NAMES, g_mod, g_ref):
        if name in zero_grads:
            assert a.norm() <= tol * grad_out.norm() and b.norm() <= tol * grad_out.norm(), name
            continue
        err = rel_err(a, b)
        assert err <= tol, f"grad of {name}: rel err {err:.3g}"


def ref_params_of(ref: AuthorsSA):
    return [dict(ref.named_parameters())[n] for n in SA_PARAM_NAMES]

"""Shuffle Attention as plain PyTorch functions (no custom kernels).

Two formulations of the same function (SA-NET.md sections 1 and 5):

* :func:`shuffle_attention_reference` follows the authors' code step by step (group view,
  chunk, average pool, GroupNorm, concatenation, channel shuffle). It is the oracle for tests
  and the baseline of the benchmarks.
* :func:`shuffle_attention_torch` uses the per-channel form: every output channel is
  ``x * sigmoid(A * (x - mean) + B)`` of one input channel, with per-(sample, channel) ``A``,
  ``B`` and mean (centred, so that ``A ~ 1/sqrt(eps)`` on zero-variance planes costs no
  precision),
  followed by the fixed shuffle permutation. It is the path used where a graph must hold
  PyTorch ops (TorchScript, ``torch.fx``, ``jit.trace``, export) and under ``torch.func``.

Both accept (N, C, L), (N, C, H, W) and (N, C, D, H, W): every statistic is over all spatial
positions (the reference flattens the spatial dims; the per-channel form reduces over them and
keeps x's shape, so that torch.export handles dynamic heights and widths). Both check their
arguments (rank, dtype, G, parameter sizes) with the module's errors, except in TorchScript
and while ``jit.trace`` records. Half-precision input
is computed in fp32 (statistics and gates) and returned in the input dtype.
"""
from __future__ import annotations

import numbers
from typing import List, Tuple

import torch
from torch import Tensor

from ..ops.arg_checks import check_eps, check_op_args

__all__ = [
    "shuffle_attention_reference",
    "shuffle_attention_torch",
    "sa_coefficients",
    "channel_shuffle",
    "check_sa_input",
]


def _check_sa_tensor(x: Tensor) -> None:
    if not torch.jit.is_scripting() and not isinstance(x, Tensor):  # (TorchScript typed it)
        raise TypeError(f"ShuffleAttention expects a torch.Tensor, got {type(x).__name__}: convert it "
                        "first, e.g. torch.as_tensor(array)")
    if x.dim() < 3 or x.dim() > 5:
        raise ValueError(
            "ShuffleAttention expects a 3-D (N, C, L), 4-D (N, C, H, W) or 5-D (N, C, D, H, W) "
            f"tensor, got {x.dim()}-D input of shape {list(x.shape)}"
        )
    if not x.is_floating_point():
        # TorchScript formats a dtype as its enum number: name it only in eager mode.
        got = "" if torch.jit.is_scripting() else f", got {x.dtype}"
        raise TypeError(
            "ShuffleAttention expects floating-point input (float32, float64, float16 or "
            f"bfloat16; averages and gates need fractions){got}: convert it first, e.g. x.float()"
        )


def check_sa_input(x: Tensor, channels: int) -> None:
    """Clear errors for the mistakes people make: wrong rank, wrong channel count, integer input."""
    _check_sa_tensor(x)
    # A traced graph keeps no Python check anyway, and comparing a traced size warns (TracerWarning).
    if not torch.jit.is_tracing() and x.shape[1] != channels:
        raise ValueError(
            f"ShuffleAttention was built for {channels} channels but the input has "
            f"{x.shape[1]} (shape {list(x.shape)}); channels are dim 1"
        )


def _check_sa_args(fn: str, x: Tensor, params: Tuple[Tensor, ...], groups: int, eps: float) -> None:
    """The functional forms' version of the module's checks (input, G, parameter sizes, eps)."""
    if torch.jit.is_tracing():  # shape comparisons would warn; the graph can't keep them
        return
    _check_sa_tensor(x)
    check_op_args(fn, x, None, params, groups)
    check_eps(fn, eps)


# torch.fx records the check as one graph node (run with real tensors) instead of tracing
# its branches on shapes.
torch.fx.wrap("_check_sa_args")


def _check_shuffle_args(x: Tensor, groups: int) -> None:
    if torch.jit.is_tracing():  # comparing a traced size warns; the graph can't keep checks
        return
    if not torch.jit.is_scripting():  # (TorchScript typed groups as int already)
        if isinstance(groups, bool) or not isinstance(groups, numbers.Integral):
            raise TypeError(f"channel_shuffle: groups must be an int, got {repr(groups)}")
        groups = int(groups)
    if x.dim() < 2 or groups < 1 or x.shape[1] % groups != 0:
        raise ValueError(
            f"channel_shuffle needs input with channels in dim 1 and a group count that divides "
            f"them (a positive divisor of C), got groups={groups} for shape {list(x.shape)}")


torch.fx.wrap("_check_shuffle_args")


def channel_shuffle(x: Tensor, groups: int = 2) -> Tensor:
    """ShuffleNet channel shuffle: ``out[:, g' * groups + i] = x[:, i * C/groups + g']``."""
    _check_shuffle_args(x, groups)
    # unflatten, not reshape(..., -1): -1 is ambiguous for an empty batch
    if torch.jit.is_tracing():
        # ONNX's legacy exporter traces, and aten::unflatten has no ONNX export before opset 13.
        # (A list of sizes: fx's symbolic tracing can't iterate a shape, hence not always.)
        split = [x.shape[0], groups, x.shape[1] // groups] + list(x.shape[2:])
        return x.reshape(split).transpose(1, 2).reshape(x.shape)
    return x.unflatten(1, (groups, x.shape[1] // groups)).transpose(1, 2).reshape(x.shape)


def _compute_dtype(x: Tensor) -> torch.dtype:
    # Statistics and gates of half-precision input are computed in fp32.
    if x.dtype == torch.float16 or x.dtype == torch.bfloat16:
        return torch.float32
    return x.dtype


# torch.fx can't trace the dtype branch above; record the call as one graph node instead.
torch.fx.wrap("_compute_dtype")


# Planes without pixels (a spatial size of 0): the output is empty, but the parameters still
# get gradients, zero ones (as from the fused kernels). The mean of an empty plane is NaN and
# GroupNorm refuses one, and NaN times the gate's zero gradient put NaN into the parameters'
# gradients: these helpers give 0 statistics there (no NaN, nothing to normalise) and keep
# the parameters in the graph. (jit.trace records one branch whatever the test: it records
# the general one, without a TracerWarning for the size test.)
def _plane_group_norm(x: Tensor, c: int, weight: Tensor, bias: Tensor, eps: float) -> Tensor:
    """GroupNorm(c, c) of (N', c, M) planes; the affine alone (empty) for empty input."""
    if not torch.jit.is_tracing() and x.numel() == 0:
        return x * weight.reshape(1, c, 1) + bias.reshape(1, c, 1)
    # torch.group_norm is F.group_norm without its Python-side check, which rejects one value
    # per group (G = 1, one sample, 1x1 planes) where the formula is well defined.
    return torch.group_norm(x, c, weight, bias, eps)


# Statistics over all spatial dims of (N, C, *spatial) (or of the reference's (N*G, c, M)
# planes), without flattening them (see _shuffle_attention_torch), and (N, C) values shaped
# to broadcast against such an x.
def _spatial_dims(x: Tensor) -> List[int]:
    return [d for d in range(2, x.dim())]


def _spatial_mean(x: Tensor) -> Tensor:
    """(N, C) means over the spatial dims; 0 for empty planes (or an empty batch)."""
    if not torch.jit.is_tracing() and x.numel() == 0:
        return x.sum(dim=_spatial_dims(x))
    return x.mean(dim=_spatial_dims(x))


def _spatial_var_mean(x: Tensor) -> Tuple[Tensor, Tensor]:
    """(N, C) population variances and means over the spatial dims; 0 and 0 for empty planes."""
    if not torch.jit.is_tracing() and x.numel() == 0:
        mean = x.sum(dim=_spatial_dims(x))
        return torch.zeros_like(mean), mean
    return torch.var_mean(x, dim=_spatial_dims(x), correction=0)


def _per_plane(t: Tensor, x: Tensor) -> Tensor:
    """(N, C) values viewed as (N, C, 1, ...) to broadcast against x."""
    return t.reshape([t.shape[0], t.shape[1]] + [1 for _ in range(x.dim() - 2)])


# torch.fx can't trace their branches on sizes; record each call as one graph node instead.
torch.fx.wrap("_plane_group_norm")
torch.fx.wrap("_spatial_mean")
torch.fx.wrap("_spatial_var_mean")
torch.fx.wrap("_per_plane")


def shuffle_attention_reference(
    x: Tensor,
    cweight: Tensor,
    cbias: Tensor,
    sweight: Tensor,
    sbias: Tensor,
    gn_weight: Tensor,
    gn_bias: Tensor,
    groups: int,
    eps: float = 1e-5,
) -> Tensor:
    """The authors' formulation of SA (SA-NET.md section 1), one step per line. Checks its
    arguments as :class:`ShuffleAttention` does."""
    if not torch.jit.is_scripting():  # not scriptable; a scripted module checked G when built
        _check_sa_args("shuffle_attention_reference", x,
                       (cweight, cbias, sweight, sbias, gn_weight, gn_bias), groups, eps)
    return _shuffle_attention_reference(
        x, cweight, cbias, sweight, sbias, gn_weight, gn_bias, groups, eps)


def _shuffle_attention_reference(
    x: Tensor,
    cweight: Tensor,
    cbias: Tensor,
    sweight: Tensor,
    sbias: Tensor,
    gn_weight: Tensor,
    gn_bias: Tensor,
    groups: int,
    eps: float = 1e-5,
) -> Tensor:
    # Unchecked: ShuffleAttention calls this after its own checks (they run on every call).
    out_dtype = x.dtype
    xc = x.to(_compute_dtype(x))
    n, c_total = xc.shape[0], xc.shape[1]
    c = c_total // (2 * groups)
    # 1. (N*G, C/G, M), then the two halves of each group.
    xf = xc.flatten(2)  # (N, C, M); explicit sizes below, as -1 is ambiguous for N = 0
    m = xf.shape[2]
    xg = xf.reshape(n * groups, c_total // groups, m)
    x0, x1 = xg.chunk(2, dim=1)
    # 2. Channel branch: global average pool, per-channel affine, sigmoid gate.
    s = _spatial_mean(x0).unsqueeze(-1)  # (N*G, c, 1)
    x0 = x0 * torch.sigmoid(cweight.reshape(1, c, 1) * s + cbias.reshape(1, c, 1))
    # 3. Spatial branch: GroupNorm(c, c) (one channel per group), affine, sigmoid gate.
    gn = _plane_group_norm(x1, c, gn_weight.to(xc.dtype), gn_bias.to(xc.dtype), eps)
    x1 = x1 * torch.sigmoid(sweight.reshape(1, c, 1) * gn + sbias.reshape(1, c, 1))
    # 4. Concatenate and view back; 5. channel shuffle with 2 groups.
    y = torch.cat([x0, x1], dim=1).reshape(n, c_total, m)
    return channel_shuffle(y, 2).reshape(x.shape).to(out_dtype)


def sa_coefficients(
    mean: Tensor,
    var: Tensor,
    cweight: Tensor,
    cbias: Tensor,
    sweight: Tensor,
    sbias: Tensor,
    gn_weight: Tensor,
    gn_bias: Tensor,
    eps: float,
) -> Tuple[Tensor, Tensor]:
    """Per-channel gate coefficients ``A, B`` (SA-NET.md section 5) from plane statistics.

    ``mean``/``var`` have shape (N * G, 2, c) (population variance over spatial positions);
    returns ``A, B`` of the same shape so that the gate is ``sigmoid(A * (x - mean) + B)``.
    Centring first keeps tiny planes exact: with one pixel, ``1/sqrt(var + eps)`` is huge
    and ``A * x`` would cancel against ``B`` in the uncentred form.
    """
    # In the statistics' dtype (fp32 at least): bf16 parameters' products would round there.
    dt = mean.dtype
    cw, cb = cweight.reshape(-1).to(dt), cbias.reshape(-1).to(dt)
    sw, sb = sweight.reshape(-1).to(dt), sbias.reshape(-1).to(dt)
    gn_weight, gn_bias = gn_weight.to(dt), gn_bias.to(dt)
    m0 = mean[:, 0]
    rstd = torch.rsqrt(var[:, 1] + eps)
    a_spatial = sw * gn_weight * rstd
    a = torch.stack([torch.zeros_like(m0), a_spatial], dim=1)
    b = torch.stack([cw * m0 + cb, (sw * gn_bias + sb).expand_as(m0)], dim=1)
    return a, b


def shuffle_attention_torch(
    x: Tensor,
    cweight: Tensor,
    cbias: Tensor,
    sweight: Tensor,
    sbias: Tensor,
    gn_weight: Tensor,
    gn_bias: Tensor,
    groups: int,
    eps: float = 1e-5,
) -> Tensor:
    """Per-channel form of SA in eager PyTorch ops (same function as the reference). Checks its
    arguments as :class:`ShuffleAttention` does."""
    if not torch.jit.is_scripting():  # not scriptable; a scripted module checked G when built
        _check_sa_args("shuffle_attention_torch", x,
                       (cweight, cbias, sweight, sbias, gn_weight, gn_bias), groups, eps)
    return _shuffle_attention_torch(
        x, cweight, cbias, sweight, sbias, gn_weight, gn_bias, groups, eps)


def _shuffle_attention_torch(
    x: Tensor,
    cweight: Tensor,
    cbias: Tensor,
    sweight: Tensor,
    sbias: Tensor,
    gn_weight: Tensor,
    gn_bias: Tensor,
    groups: int,
    eps: float = 1e-5,
) -> Tensor:
    # Unchecked: ShuffleAttention calls this after its own checks (they run on every call).
    n, c_total = x.shape[0], x.shape[1]
    c = c_total // (2 * groups)
    # x keeps its shape: the statistics reduce over the spatial dims, the per-plane
    # coefficients broadcast against them and the shuffle is a channel gather. (Merging H and W
    # into one dim and splitting it back put guards on symbolic sizes that torch.export can't
    # prove, so a height and width of one Dim, or one dynamic side, failed to export.) No
    # tensor above 4-D for 4-D input, for converters that stop at 4-D.
    xc = x.to(_compute_dtype(x))
    # The mean from its own reduction: var_mean's is NaN for a plane holding an inf, where the
    # channel branch's pooled value is inf (and its gate saturates, as in the reference).
    var = _spatial_var_mean(xc)[0]  # (N, C)
    mean = _spatial_mean(xc)  # (N, C)
    a, b = sa_coefficients(mean.reshape(n * groups, 2, c), var.reshape(n * groups, 2, c),
                           cweight, cbias, sweight, sbias, gn_weight, gn_bias, eps)
    # The channel branch's slope is 0 by construction (its gate depends on the mean only): its
    # deviations are not used, so that an inf pixel gives no 0 * inf = NaN across its plane.
    branch = torch.arange(2, device=xc.device).reshape(1, 2, 1).expand(n * groups, 2, c)
    spatial = _per_plane(branch.reshape(n, c_total) == 1, xc)
    dev = xc - _per_plane(mean, xc)
    # Second pass: the fp32 mean is off by a rounding, which the spatial slope (up to
    # 1/sqrt(eps) on a constant plane) would spread over the whole plane; its own mean removes it.
    dev = torch.where(spatial, dev - _per_plane(_spatial_mean(dev), xc), 0.0)
    gate = torch.addcmul(_per_plane(b.reshape(n, c_total), xc), _per_plane(a.reshape(n, c_total), xc), dev)
    y = xc * torch.sigmoid(gate)
    # Channel order g*C/G + branch*c + j, then the 2-group shuffle: out[:, 2k + i] = y[:, i*C/2 + k].
    perm = torch.arange(c_total, device=xc.device).reshape(2, c_total // 2).t().reshape(c_total)
    return y.index_select(1, perm).to(x.dtype)

"""Fused Shuffle Attention, alone or as the tail of a residual block (BN -> SA -> add -> ReLU)."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn
from torch.nn.modules import module as _nn_module

from ..errors import SanetError
from .cpu_ext import load_cpu_ext
from .sa_op import KERNELS, _like, sa_op, torch_update_running_stats

__all__ = [
    "shuffle_attention_fused",
    "fused_sa_supported",
    "bn_shuffle_attention",
    "fused_bn_sa_supported",
    "needs_pytorch_ops",
    "has_hooks",
]

# fp16/bf16 on the CPU: read as they are, computed in fp32, rounded once (csrc/sa_io.h).
_CPU_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
_CUDA_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_HALF_DTYPES = (torch.float16, torch.bfloat16)


# Evaluated once at trace time under torch.compile (building/loading can't be traced).
@torch.compiler.assume_constant_result
def _cpu_ext_ok() -> bool:
    return load_cpu_ext() is not None


@torch.compiler.assume_constant_result
def _triton_ok() -> bool:
    from .triton_sa import triton_available

    return triton_available()


def fused_sa_supported(x: Tensor, *tensors: Optional[Tensor]) -> bool:
    """Whether a fused kernel exists for ``x``'s device and dtype (and can be loaded), and
    ``tensors`` (the parameters the kernel would read with ``x``; None skipped) are on
    ``x``'s device. (The op raises on a misplaced tensor; callers with a fallback ask first.)"""
    dev = x.device
    if dev.type == "cpu":
        ok = x.dtype in _CPU_DTYPES and _cpu_ext_ok()
    elif dev.type == "cuda":
        ok = x.dtype in _CUDA_DTYPES and _triton_ok()
    else:
        return False
    for t in tensors:
        if t is not None and t.device != dev:
            return False
    return ok


def no_fused_kernel_reason(x: Tensor) -> str:
    """Why :func:`fused_sa_supported` says no for ``x``: for the error of an explicit
    ``impl="fused"``, which has no fallback."""
    what = f"no fused kernel for {x.device.type} {x.dtype} input"
    if x.device.type == "cpu":
        if x.dtype not in _CPU_DTYPES:
            return f"{what} (the CPU kernels take float32, float64, float16 and bfloat16)"
        from .cpu_ext import cpu_ext_status

        return f"{what}: the C++ extension is not loaded ({cpu_ext_status()['error']})"
    if x.device.type == "cuda":
        if x.dtype not in _CUDA_DTYPES:
            return f"{what} (the CUDA kernels take float32, float16 and bfloat16)"
        return f"{what}: Triton is not available"
    return f"{what} (fused kernels exist for CPU and CUDA)"


def needs_pytorch_ops() -> bool:
    """Whether SA must run as PyTorch ops instead of the fused op, because

    * a graph is being recorded to run without sanet (``torch.jit.trace``, ``torch.export``,
      ONNX export) or by ``torch.fx`` (which records PyTorch ops only): the saved TorchScript
      file, ExportedProgram or ONNX model then loads anywhere; or
    * a ``torch.func`` transform (``grad``, ``vmap``, ``jvp``...) or forward-mode AD is active:
      the kernels have no batching or forward-derivative rule.

    ``torch.compile`` and ordinary (double) backward keep the fused op."""
    return (
        torch.jit.is_tracing()
        or torch.compiler.is_exporting()
        or torch.fx._symbolic_trace.is_fx_symbolic_tracing()
        or torch.onnx.is_in_onnx_export()
        or torch._C._are_functorch_transforms_active()
        or torch.autograd.forward_ad._current_level >= 0
    )


def has_hooks(*modules: nn.Module) -> bool:
    """Whether calling these modules would run hooks (theirs or global ones): forward hooks
    (activation capture, ``torch.nn.utils.prune``, old-style weight/spectral norm) and
    module backward hooks. A fused op that replaces the module calls would skip them.
    (``FlopCounterMode`` registers global hooks too, to attribute work to modules: under it
    the layers run PyTorch ops, module by module.)"""
    m = _nn_module  # the global hook registries live in this module
    if (m._global_forward_hooks or m._global_forward_pre_hooks or m._global_backward_hooks
            or m._global_backward_pre_hooks):
        return True
    return any(mod._forward_hooks or mod._forward_pre_hooks or mod._backward_hooks or mod._backward_pre_hooks
               for mod in modules)


_forward_ad = torch.autograd.forward_ad
_FUSED_IMPLS = ("auto", "fused")


def eager_cpu_sa_inference(x: Tensor, sa: nn.Module) -> Optional[Tensor]:
    """``sa(x)`` (``sa`` a ``ShuffleAttention``) from the fused CPU kernel, when nothing but
    the kernel is needed: eager mode, autograd off, a plain CPU tensor of a kernel dtype with
    1 to 3 spatial dims and ``sa.channels`` channels, impl "auto" or "fused", plain
    parameters on the CPU, no hooks, and nothing recording or transforming (trace, export,
    torch.func, forward AD, dispatch modes). None otherwise: the layer's general path then
    decides, and raises its errors.

    Why a path of its own: it asks the general path's questions in a few Python calls instead
    of about thirty. With the caches cold, as they are after the convolution in front of SA,
    those calls cost a visible part of a small layer's forward on a slow 2-core host
    (docs/benchmarks.md, "The layer's call path")."""
    # is_compiling first: torch.compile traces this as a constant and skips the rest. Tracing
    # before the shape checks: jit.trace warns of a traced size compared with an int.
    if (torch.compiler.is_compiling() or torch.is_grad_enabled() or type(x) is not Tensor or not x.is_cpu
            or sa.impl not in _FUSED_IMPLS or torch._C._is_tracing() or x.dtype not in _CPU_DTYPES
            or not 3 <= x.dim() <= 5 or x.shape[1] != sa.channels or torch._C._len_torch_dispatch_stack()
            or torch._C._are_functorch_transforms_active() or _forward_ad._current_level >= 0
            or torch.compiler.is_exporting() or not _cpu_ext_ok()):
        return None
    # The dicts Module.__getattr__ reads (a parametrized or removed parameter is not in them).
    p = sa._parameters
    gn = sa._modules.get("gn")
    if gn is None or has_hooks(gn):
        return None
    g = gn._parameters
    params = (p.get("cweight"), p.get("cbias"), p.get("sweight"), p.get("sbias"), g.get("weight"), g.get("bias"))
    for t in params:
        if t is None or not t.is_cpu:
            return None
    out = KERNELS["cpu"][0](x.contiguous(), None, *params, sa.groups, gn.eps, None, None, None, None,
                            False, 0.0, False)[0]
    return _like(out, x)


def _sa_params(sa: nn.Module):
    return sa.cweight, sa.cbias, sa.sweight, sa.sbias, sa.gn.weight, sa.gn.bias


def shuffle_attention_fused(
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
    """Shuffle Attention with the fused kernels (same function as the reference) on (N, C, L),
    (N, C, H, W) or (N, C, D, H, W) input; checks its arguments (input, G, parameter sizes,
    eps) with the module's errors. Where a graph must hold PyTorch ops (tracing, export, fx)
    or ``torch.func`` runs, it computes the per-channel form in PyTorch ops, as
    ``ShuffleAttention(impl="fused")`` does."""
    from ..layers.sa_functional import _check_sa_args, _shuffle_attention_torch  # layers import ops: late

    params = (cweight, cbias, sweight, sbias, gn_weight, gn_bias)
    # The ranks of the other forms: the kernels would take (N, C) too, but double backward
    # and torch.func take the PyTorch form, which would not.
    _check_sa_args("shuffle_attention_fused", x, params, groups, eps)
    if needs_pytorch_ops():
        return _shuffle_attention_torch(x, *params, groups, eps)
    if not fused_sa_supported(x):
        raise SanetError(f"shuffle_attention_fused: {no_fused_kernel_reason(x)}; use "
                         "sanet.shuffle_attention_torch, or ShuffleAttention(impl='auto'), which falls back")
    return _shuffle_attention_fused(x, *params, groups, eps)


def _shuffle_attention_fused(x: Tensor, cweight: Tensor, cbias: Tensor, sweight: Tensor, sbias: Tensor,
                             gn_weight: Tensor, gn_bias: Tensor, groups: int, eps: float = 1e-5) -> Tensor:
    # Unchecked: for ShuffleAttention, whose forward checked x and whose __init__ checked G.
    return sa_op(x, None, cweight, cbias, sweight, sbias, gn_weight, gn_bias,
                 groups, eps, None, None, None, None, False, 0.0, False)[0]


def fused_bn_sa_supported(x: Tensor, bn: nn.Module, sa: nn.Module, shortcut: Optional[Tensor] = None) -> bool:
    """BN+SA(+add+ReLU) fusion needs a plain BatchNorm2d on 4-D input, a fused kernel for
    ``x`` (CPU or CUDA), BatchNorm's dtype as ``bn(x)`` allows, a shortcut of x's shape and
    dtype (``x + shortcut`` would otherwise broadcast or promote), and the shortcut, SA and
    the BatchNorm on x's device: elsewhere the modules one by one give PyTorch's own errors."""
    # One tensor per module: Module.to()/.cuda() move all of a module's tensors together.
    # (A tensor moved on its own still meets the op's device check: an error, not a crash.)
    return _fusable(x, bn, sa, shortcut) and fused_sa_supported(x, shortcut, sa.cweight, _bn_tensor(bn))


def _bn_tensor(bn: nn.BatchNorm2d) -> Optional[Tensor]:
    return bn.running_mean if bn.weight is None else bn.weight


def _fusable(x: Tensor, bn: nn.Module, sa: nn.Module, shortcut: Optional[Tensor]) -> bool:
    """:func:`fused_bn_sa_supported` but for the kernel and where the tensors are."""
    if type(bn) is not nn.BatchNorm2d or getattr(sa, "impl", None) not in ("auto", "fused"):
        return False
    ref = _bn_tensor(bn)
    bn_dtype = None if ref is None else ref.dtype
    return (
        x.dim() == 4  # (bn(x) refuses other ranks)
        and x.numel() > 0  # empty batches: nn.BatchNorm2d's own handling (statistics untouched)
        # bn(x)'s dtype rule: BatchNorm's dtype, or fp32 BatchNorm on fp16/bf16 input (AMP)
        and (bn_dtype in (None, x.dtype) or (bn_dtype == torch.float32 and x.dtype in _HALF_DTYPES))
        and (shortcut is None or (shortcut.dtype == x.dtype and shortcut.shape == x.shape))  # no broadcasting
    )


def bn_shuffle_attention(
    x: Tensor,
    bn: nn.BatchNorm2d,
    sa: nn.Module,
    shortcut: Optional[Tensor] = None,
    *,
    relu: bool = False,
) -> Tensor:
    """``relu(sa(bn(x)) + shortcut)`` in one pass (shortcut and ReLU optional).

    BatchNorm behaves exactly as ``bn(x)`` would: batch statistics in training (running
    statistics updated once, with the module's momentum), running statistics in eval.
    Backward recomputes ``bn(x)`` from ``x`` instead of keeping it. Where the op can't run
    (see :func:`fused_bn_sa_supported`; tracing, export, fx, ``torch.func``) or the modules
    have hooks (which the op would skip), the modules are called one by one: the same
    function, with their own errors for what they refuse.
    """
    # (A tensor on another device than x goes to the op, whose error names it.)
    if (needs_pytorch_ops() or has_hooks(bn, sa, *sa.children()) or not _fusable(x, bn, sa, shortcut)
            or not fused_sa_supported(x)):
        y = sa(bn(x)) if shortcut is None else sa(bn(x)) + shortcut
        return torch.relu(y) if relu else y
    return _bn_shuffle_attention(x, bn, sa, shortcut, relu=relu)


def _bn_shuffle_attention(x: Tensor, bn: nn.BatchNorm2d, sa: nn.Module, shortcut: Optional[Tensor] = None,
                          *, relu: bool = False) -> Tensor:
    # Unchecked: for the SA blocks, which asked fused_bn_sa_supported (and more) first.
    n = x.shape[0]
    m = x.numel() // max(1, n * x.shape[1])
    use_batch_stats = bn.training or bn.running_mean is None
    if use_batch_stats and n * m <= 1:
        raise ValueError(
            f"Expected more than 1 value per channel when training, got input size {list(x.shape)}")
    if bn.training and bn.track_running_stats:  # updated after the op, which doesn't check them
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            t = getattr(bn, name)
            if t is not None and t.device != x.device:
                raise SanetError(
                    f"bn_shuffle_attention: bn.{name} is on {t.device} but the input x is on {x.device}; "
                    f"put the modules and the input on one device (module.to({str(x.device)!r}) or "
                    f"x.to({str(t.device)!r}))")
            if t is not None and name != "num_batches_tracked" and t.numel() != x.shape[1]:
                raise ValueError(f"bn_shuffle_attention: bn.{name} holds {t.numel()} values but x has "
                                 f"{x.shape[1]} channels (a BatchNorm2d({x.shape[1]}) is needed)")
    out, _, _, bmean, bvar = sa_op(
        x, shortcut, *_sa_params(sa),
        sa.groups, sa.gn.eps, bn.weight, bn.bias, None if use_batch_stats else bn.running_mean,
        None if use_batch_stats else bn.running_var, use_batch_stats, bn.eps, relu)
    if bn.training and bn.track_running_stats:
        _update_running_stats(bn, bmean, bvar, n * m)
    return out


@torch.no_grad()
def _update_running_stats(bn: nn.BatchNorm2d, bmean: Tensor, bvar: Tensor, count: int) -> None:
    # The device's kernel (one launch on CUDA), or PyTorch ops where torch.compile traces.
    update = torch_update_running_stats if torch.compiler.is_compiling() else KERNELS[bmean.device.type][2]
    update(bmean, bvar, bn.running_mean, bn.running_var, bn.num_batches_tracked, bn.momentum, count)

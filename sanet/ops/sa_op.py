"""The fused SA kernels as one differentiable op: C++ on CPU, Triton on CUDA.

On (N, C, *) input ``x`` (N * C planes of any spatial shape, any layout) the op computes::

    z   = x                          or BatchNorm(x) (batch or given running statistics)
    s   = ShuffleAttention(z)        (per-channel gate, then the 2-group shuffle)
    out = s (+ shortcut) (ReLU)

and returns ``(out, plane mean, plane var, batch mean, batch var)`` (statistics of ``x`` per
(n, c) plane, float64; the batch statistics are empty unless BatchNorm is in training mode).
Backward keeps only ``x``, the per-plane statistics, BatchNorm's per-channel statistics and,
with the ReLU, ``out`` (which the next layer keeps anyway): never a full-size intermediate.

Two entry points compute it, sharing the autograd rule:

* :func:`sa_op` (what the layers call): in eager mode an ``autograd.Function`` that calls the
  kernels directly (or, without grad, the kernel alone), about 10 microseconds of Python per
  call instead of ~70 through the dispatcher (which matters on a GPU, where the kernels
  themselves take tens of microseconds); under ``torch.compile``, ``torch.jit.trace`` and
  any ``TorchDispatchMode`` the custom op below. (The layers themselves use PyTorch ops
  under ``jit.trace``/``torch.export``/ONNX export: see ``fused.needs_pytorch_ops``.)
* ``torch.ops.sanet.sa_forward`` / ``sa_backward``, registered with :mod:`torch.library`
  (autograd via ``register_autograd``, shapes via ``register_fake``), so that
  ``torch.compile`` traces the kernels as opaque ops.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from ..errors import SanetError
from .cpu_ext import load_cpu_ext

__all__ = ["sa_op", "sa_forward", "sa_backward", "KERNELS", "torch_update_running_stats", "check_devices"]

_Out = Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]


def param_grads_dtype(params) -> torch.dtype:
    """The dtype of the kernels' (6, c) block of gate-parameter gradients: float32, or a wider
    parameter dtype. Each row is cast to its own parameter's dtype afterwards: with fp16 gates
    and an fp32 GroupNorm (norm layers kept in fp32), gn.weight's gradient must not pass
    through fp16 (it overflowed to inf). (Not float64 always: for fp32 layers the op's output
    dtype stays what it was, which graphs that torch.compile cached on disk still expect.)"""
    dtype = torch.float32
    for p in params:
        dtype = torch.promote_types(dtype, p.dtype)
    return dtype


def _cpu_ext():
    ext = load_cpu_ext()
    if ext is None:
        raise SanetError("sanet: the fused CPU kernel is unavailable; see sanet.ops.cpu_ext_status()")
    return ext


# fp16/bf16 input (CPU autocast gives SA the convolution's bf16 output) goes to the kernels as
# it is: they read it into float lanes, compute as the fp32 kernels do and round the outputs
# once (sa_io.h), as the Triton kernels compute half input in fp32. (Before, fp32 copies of
# x, shortcut, grad and out around the fp32 kernels cost a bf16 layer more than the kernel:
# docs/benchmarks.md.) Autograd keeps the half-precision x.
def _cpu_forward(x: Tensor, shortcut: Optional[Tensor], *args) -> _Out:
    return tuple(_cpu_ext().sa_forward(x, shortcut, *args))


def _cpu_backward(grad: Tensor, x: Tensor, out: Optional[Tensor], *args) -> _Out:
    gx, gpre, gparams, dw, db = _cpu_ext().sa_backward(grad, x, out, *args)
    if gpre is None:  # the kernel returns an undefined tensor without ReLU
        gpre = gx.new_empty((0,))
    return gx, gpre, gparams, dw, db


def _triton(name: str):
    def call(*args):
        from . import triton_sa  # imports triton: only when a CUDA tensor arrives

        return getattr(triton_sa, name)(*args)
    return call


def torch_update_running_stats(bmean: Tensor, bvar: Tensor, running_mean: Tensor, running_var: Tensor,
                               num_batches_tracked: Tensor, momentum: Optional[float], count: int) -> None:
    """``nn.BatchNorm``'s running-statistics update from the fused op's batch mean and biased
    variance: unbiased variance, momentum or (``momentum=None``) cumulative average."""
    num_batches_tracked.add_(1)
    factor = momentum if momentum is not None else 1.0 / float(num_batches_tracked)
    running_mean.lerp_(bmean.to(running_mean.dtype), factor)
    running_var.lerp_((bvar * (count / (count - 1))).to(running_var.dtype), factor)


#: device type -> (forward, backward, BatchNorm running-statistics update) of the op, each
#: with the arguments of ``sa_forward``, ``sa_backward`` and ``torch_update_running_stats``.
#: (The tests point "cpu" at the Triton kernels to run them under TRITON_INTERPRET=1.)
KERNELS = {
    "cpu": (_cpu_forward, _cpu_backward, torch_update_running_stats),
    "cuda": (_triton("triton_sa_forward"), _triton("triton_sa_backward"), _triton("triton_update_running_stats")),
}


def _like(out: Tensor, x: Tensor) -> Tensor:
    """The kernels' contiguous result in ``x``'s layout, as ``torch.empty_like(x)`` lays it
    out (channels_last stays channels_last), so the fake kernel's strides are the real ones."""
    if x.is_contiguous():
        return out
    res = torch.empty_like(x)
    return out if res.is_contiguous() else res.copy_(out)


#: The op's tensor arguments after ``x``, by position in ``sa_forward``'s (None: not a tensor).
_ARG_NAMES = ("shortcut", "cweight", "cbias", "sweight", "sbias", "gn_weight", "gn_bias", None, None,
              "bn_weight", "bn_bias", "bn_mean", "bn_var")


def check_devices(x: Tensor, shortcut: Optional[Tensor], cw: Tensor, cb: Tensor, sw: Tensor, sb: Tensor,
                  gw: Tensor, gb: Tensor, groups: int, eps: float, bw: Optional[Tensor], bb: Optional[Tensor],
                  bm: Optional[Tensor], bv: Optional[Tensor], *_) -> None:
    """Raise if a tensor argument of the op (arguments as ``sa_forward``'s) is not on ``x``'s
    device: the kernels read every one of them with ``x`` (the C++ kernel through host
    pointers, which for CUDA or meta tensors would crash or read garbage)."""
    dev = x.device
    # Spelled out: this runs on every call, and a loop costs twice as much (~1 us).
    if not (cw.device != dev or cb.device != dev or sw.device != dev or sb.device != dev
            or gw.device != dev or gb.device != dev or (shortcut is not None and shortcut.device != dev)
            or (bw is not None and bw.device != dev) or (bb is not None and bb.device != dev)
            or (bm is not None and bm.device != dev) or (bv is not None and bv.device != dev)):
        return
    for name, t in zip(_ARG_NAMES, (shortcut, cw, cb, sw, sb, gw, gb, groups, eps, bw, bb, bm, bv)):
        if name is not None and t is not None and t.device != dev:
            raise SanetError(
                f"sanet's fused Shuffle Attention op: {name} is on {t.device} but the input x is on "
                f"{dev}; put the module and its input on one device (module.to({str(dev)!r}) or "
                f"x.to({str(t.device)!r}))")


def _forward_impl(x: Tensor, shortcut: Optional[Tensor], *args) -> _Out:
    check_devices(x, shortcut, *args)
    # The kernels walk contiguous planes. The op takes any layout and returns x's, so autograd
    # saves the tensors the layers around keep anyway (a channels_last x and out), not copies.
    out, *stats = KERNELS[x.device.type][0](x.contiguous(), None if shortcut is None else shortcut.contiguous(),
                                            *args)
    return (_like(out, x), *stats)


def _backward_impl(grad: Tensor, x: Tensor, out: Optional[Tensor], *args) -> _Out:
    return KERNELS[grad.device.type][1](grad.contiguous(), x.contiguous(),
                                        None if out is None else out.contiguous(), *args)


@torch.library.custom_op("sanet::sa_forward", mutates_args=(), device_types=("cpu", "cuda"))
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
    """Returns (out, plane mean, plane var, batch mean, batch var). BatchNorm is fused when
    ``bn_train`` or when its running statistics ``bn_mean``/``bn_var`` are given."""
    return _forward_impl(x, shortcut, cweight, cbias, sweight, sbias, gn_weight, gn_bias, groups, eps,
                         bn_weight, bn_bias, bn_mean, bn_var, bn_train, bn_eps, relu)


@sa_forward.register_fake
def _sa_forward_fake(x, shortcut, cweight, cbias, sweight, sbias, gn_weight, gn_bias, groups, eps,
                     bn_weight, bn_bias, bn_mean, bn_var, bn_train, bn_eps, relu):
    # Fake tensors keep their devices: torch.compile reports a misplaced tensor while tracing.
    check_devices(x, shortcut, cweight, cbias, sweight, sbias, gn_weight, gn_bias, groups, eps,
                  bn_weight, bn_bias, bn_mean, bn_var)
    n, c = x.shape[0], x.shape[1]
    stats = x.new_empty((n, c), dtype=torch.float64)
    bstats = x.new_empty((c if bn_train else 0,), dtype=torch.float64)
    return torch.empty_like(x), stats, stats.clone(), bstats, bstats.clone()


@torch.library.custom_op("sanet::sa_backward", mutates_args=(), device_types=("cpu", "cuda"))
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
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Returns (grad x, grad before the ReLU (empty without ``out``), the six gate parameters'
    gradients as one (6, C/(2G)) tensor in ``param_grads_dtype`` (rows in the order of the
    arguments), d bn_weight, d bn_bias (in bn_weight's dtype)); BatchNorm is part of the op
    when ``bn_mean``/``bn_var`` (the statistics forward used) are given."""
    return _backward_impl(grad, x, out, pmean, pvar, cweight, cbias, sweight, sbias, gn_weight, gn_bias,
                          groups, eps, bn_weight, bn_bias, bn_mean, bn_var, bn_train, bn_eps)


@sa_backward.register_fake
def _sa_backward_fake(grad, x, out, pmean, pvar, cweight, cbias, sweight, sbias, gn_weight, gn_bias,
                      groups, eps, bn_weight, bn_bias, bn_mean, bn_var, bn_train, bn_eps):
    c = x.shape[1]
    bn = x.new_empty((c if bn_mean is not None else 0,),
                     dtype=torch.float32 if bn_weight is None else bn_weight.dtype)
    gpre = x.new_empty(x.shape) if out is not None else x.new_empty((0,))  # contiguous, as the kernels'
    gp_dtype = param_grads_dtype((cweight, cbias, sweight, sbias, gn_weight, gn_bias))
    return x.new_empty(x.shape), gpre, cweight.new_empty((6, cweight.numel()), dtype=gp_dtype), bn, bn.clone()


# ---------------------------------------------------------------- autograd (shared)

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


def _is_batched(t: Tensor) -> bool:
    """A vmap-batched tensor (torch.func's, or autograd's own for is_grads_batched): no storage."""
    functorch = torch._C._functorch
    return functorch.is_batchedtensor(t) or functorch.is_legacy_batchedtensor(t)


def _backward(ctx, g_out: Tensor, backward_fn) -> tuple:
    x, out, pmean, pvar, *params, bn_weight, bn_bias, bn_mean, bn_var = ctx.saved_tensors
    if torch.is_grad_enabled():  # backward(create_graph=True): gradients must be differentiable
        return _backward_differentiable(ctx, g_out, x, out, params, bn_weight, bn_bias, bn_mean, bn_var)
    if _is_batched(g_out):
        # A batch of output gradients (autograd.grad(is_grads_batched=True), jacobian(vectorize=True))
        # arrives under vmap, which the kernels can't take: differentiate the PyTorch ops instead.
        with torch.enable_grad():  # to record the recomputation; its gradients are plain
            return _backward_differentiable(ctx, g_out, x, out, params, bn_weight, bn_bias, bn_mean, bn_var,
                                            create_graph=False)
    gx, gpre, gparams, dbw, dbb = backward_fn(
        g_out, x, out, pmean, pvar, *params, ctx.groups, ctx.eps, bn_weight, bn_bias,
        bn_mean, bn_var, ctx.bn_train, ctx.bn_eps)
    g_shortcut = None
    if ctx.has_shortcut:
        g_shortcut = gpre if out is not None else g_out
    g_bn_w = dbw if ctx.has_bn and bn_weight is not None else None
    g_bn_b = dbb if ctx.has_bn and bn_bias is not None else None
    g_params = [g.to(p.dtype).view(p.shape) for g, p in zip(gparams.unbind(0), params)]  # any shape of c values
    return (gx, g_shortcut, *g_params, None, None, g_bn_w, g_bn_b, None, None, None, None, None)


def _backward_differentiable(ctx, g_out: Tensor, x: Tensor, out: Optional[Tensor], params, bn_weight,
                             bn_bias, bn_mean, bn_var, create_graph: bool = True) -> tuple:
    """Backward for double differentiation (gradient penalties, Hessian-vector products).

    The kernels' gradients are plain tensors, so autograd could not differentiate them again:
    recompute ``sa(bn(x))`` in PyTorch ops (the saved inputs still carry their graph) and
    differentiate that with ``create_graph=True``. The ReLU enters as its mask from ``out``
    (its second derivative is zero), the shortcut's gradient is the masked ``g_out``.
    """
    import torch.nn.functional as F

    from ..layers.sa_functional import shuffle_attention_torch  # layers import ops: import late

    g = g_out if out is None else g_out * (out > 0).to(g_out.dtype)
    z = x
    if ctx.has_bn:  # training: batch statistics recomputed; eval: the running statistics forward used
        z = F.batch_norm(x, None if ctx.bn_train else bn_mean, None if ctx.bn_train else bn_var,
                         bn_weight, bn_bias, training=ctx.bn_train, eps=ctx.bn_eps)
    s = shuffle_attention_torch(z, *params, ctx.groups, ctx.eps)
    inputs = [x, *params, bn_weight, bn_bias]
    needed = [t is not None and t.requires_grad for t in inputs]
    wrt = [t for t, n in zip(inputs, needed) if n]  # empty when only the shortcut needs a gradient
    found = iter(torch.autograd.grad(s, wrt, g, create_graph=create_graph, allow_unused=True) if wrt else ())
    gx, *g_params, g_bn_w, g_bn_b = [next(found) if n else None for n in needed]
    return (gx, g if ctx.has_shortcut else None, *g_params, None, None, g_bn_w, g_bn_b,
            None, None, None, None, None)


sa_forward.register_autograd(lambda ctx, g_out, *_: _backward(ctx, g_out, sa_backward),
                             setup_context=_setup_context)


class _SAFunction(torch.autograd.Function):
    """Eager-mode twin of the custom op: the same kernels and autograd rule, no dispatcher.
    (``forward(ctx, ...)`` rather than a separate ``setup_context``: with one, ``apply``
    runs ``inspect.signature`` on every call.)"""

    @staticmethod
    def forward(ctx, *inputs) -> _Out:
        output = _forward_impl(*inputs)
        _setup_context(ctx, inputs, output)
        return output

    @staticmethod
    def backward(ctx, g_out, *_):
        return _backward(ctx, g_out, _backward_impl)


def sa_op(x: Tensor, shortcut: Optional[Tensor], cweight: Tensor, cbias: Tensor, sweight: Tensor,
          sbias: Tensor, gn_weight: Tensor, gn_bias: Tensor, groups: int, eps: float,
          bn_weight: Optional[Tensor], bn_bias: Optional[Tensor], bn_mean: Optional[Tensor],
          bn_var: Optional[Tensor], bn_train: bool, bn_eps: float, relu: bool) -> _Out:
    """The fused op (see the module docstring), differentiable; arguments as ``sa_forward``."""
    args = (x, shortcut, cweight, cbias, sweight, sbias, gn_weight, gn_bias, groups, eps, bn_weight,
            bn_bias, bn_mean, bn_var, bn_train, bn_eps, relu)
    if torch.compiler.is_compiling() or torch.jit.is_tracing() or torch._C._len_torch_dispatch_stack():
        # Through the dispatcher: compile and trace record the op, and dispatch modes (fake
        # tensors, memory trackers) see it. (FlopCounterMode's global module hooks make the
        # layers run PyTorch ops instead: see fused.has_hooks.)
        return sa_forward(*args)
    if not torch.is_grad_enabled():
        # Nothing to record: skip autograd.Function's bookkeeping (tens of microseconds
        # when caches are cold, as they are after the convolution in front of SA).
        return _forward_impl(*args)
    return _SAFunction.apply(*args)

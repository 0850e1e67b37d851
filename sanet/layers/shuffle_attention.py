"""The Shuffle Attention layer (Zhang & Yang, SA-Net, ICASSP 2021, arXiv:2102.00240)."""
from __future__ import annotations

from typing import Optional

import torch
import torch.fx
from torch import Tensor, nn

from ..errors import SanetError
from ..ops import fused_sa_supported, has_hooks, needs_pytorch_ops
from ..ops.arg_checks import check_eps
from ..ops.fused import _shuffle_attention_fused  # unchecked: forward checks x, __init__ checked G
from ..ops.fused import eager_cpu_sa_inference, no_fused_kernel_reason
from .groups import check_sa_groups, fit_sa_groups
from .sa_functional import (  # the unchecked forms: forward checks x once, __init__ checked G
    _compute_dtype,
    _shuffle_attention_reference,
    _shuffle_attention_torch,
    channel_shuffle,
    check_sa_input,
)

__all__ = ["ShuffleAttention", "SA_IMPLS"]

# Recorded as graph nodes by torch.fx instead of being traced (they branch on shapes, dtypes).
torch.fx.wrap("check_sa_input")
torch.fx.wrap("_compute_dtype")

#: ``impl`` choices: "auto" picks the fused kernel where one exists for the input (CPU
#: via the C++ extension, half precision computed in fp32; CUDA via Triton) and the authors' formulation elsewhere
#: (measured faster, and lighter on memory, than the per-channel form in PyTorch ops), and
#: "torch" where a graph must hold PyTorch ops (tracing, export, fx) or torch.func runs.
SA_IMPLS = ("auto", "fused", "torch", "reference")


class ShuffleAttention(nn.Module):
    """Shuffle Attention (SA-NET.md section 1).

    Splits the C channels into ``groups`` groups, each into a channel-attention half (global
    average pool -> per-channel affine -> sigmoid gate) and a spatial-attention half
    (GroupNorm(c, c) -> per-channel affine -> sigmoid gate), concatenates, and shuffles the
    channels with 2 groups. Gate parameters (length ``c = C / (2G)``) are shared by all
    groups; one layer has ``3C/G`` parameters and every gate starts at ``sigmoid(1)``.

    Parameter names and shapes are the authors' (``cweight, cbias, sweight, sbias`` of shape
    (1, c, 1, 1), ``gn.weight, gn.bias`` of shape (c,)), so their checkpoints load unchanged.
    Accepts (N, C, L), (N, C, H, W) and (N, C, D, H, W) inputs.

    Args:
        channels: input (= output) channels C; must be divisible by ``2 * groups``.
        groups: G, number of groups (paper default 64). See :func:`sanet.fit_sa_groups`
            for narrow layers.
        impl: "auto" (default: fused kernel when available, else "reference"; "torch" under
            tracing, export, fx and torch.func), "fused" (fused
            kernel, error if unavailable for the input), "torch" (per-channel form in
            PyTorch ops), "reference" (the authors' formulation).
        eps: GroupNorm epsilon (1e-5 as in the authors' ``nn.GroupNorm``).
    """

    def __init__(
        self,
        channels: int,
        groups: int = 64,
        *,
        impl: str = "auto",
        eps: float = 1e-5,
        device: Optional[torch.device] = None,
        dtype: Optional[torch.dtype] = None,
    ) -> None:
        super().__init__()
        check_sa_groups(channels, groups)
        if impl not in SA_IMPLS:
            raise ValueError(f"ShuffleAttention: impl must be one of {SA_IMPLS}, got {impl!r}")
        check_eps("ShuffleAttention", eps)
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise TypeError(f"ShuffleAttention: dtype must be a floating-point torch.dtype (float32, float64, "
                            f"float16 or bfloat16) or None, got {dtype!r}")
        dd = {"device": device, "dtype": dtype}
        channels, groups = int(channels), int(groups)  # plain ints for TorchScript and the kernels
        self.channels = channels
        self.groups = groups
        self.impl = impl
        c = channels // (2 * groups)
        self.cweight = nn.Parameter(torch.zeros(1, c, 1, 1, **dd))
        self.cbias = nn.Parameter(torch.ones(1, c, 1, 1, **dd))
        self.sweight = nn.Parameter(torch.zeros(1, c, 1, 1, **dd))
        self.sbias = nn.Parameter(torch.ones(1, c, 1, 1, **dd))
        self.gn = nn.GroupNorm(c, c, eps=float(eps), **dd)

    @classmethod
    def fitted(cls, channels: int, groups: int = 64, **kwargs) -> "ShuffleAttention":
        """SA with the largest valid G not above ``groups`` (for narrow layers)."""
        return cls(channels, fit_sa_groups(channels, groups), **kwargs)

    def reset_parameters(self) -> None:
        """Initial values of the authors' code: every gate is ``sigmoid(1)``."""
        with torch.no_grad():
            self.cweight.zero_()
            self.cbias.fill_(1.0)
            self.sweight.zero_()
            self.sbias.fill_(1.0)
        self.gn.reset_parameters()

    def extra_repr(self) -> str:
        return f"{self.channels}, groups={self.groups}, impl={self.impl!r}"

    def forward(self, x: Tensor) -> Tensor:
        if not torch.jit.is_scripting():
            y = self._plain_inference(x)  # the common case in few Python calls, or None
            if y is not None:
                return y
        check_sa_input(x, self.channels)
        if torch.jit.is_scripting():
            # TorchScript can't call the custom kernels; both paths are exact.
            if self.impl == "reference":
                return _shuffle_attention_reference(
                    x, self.cweight, self.cbias, self.sweight, self.sbias,
                    self.gn.weight, self.gn.bias, self.groups, self.gn.eps)
            return _shuffle_attention_torch(
                x, self.cweight, self.cbias, self.sweight, self.sbias,
                self.gn.weight, self.gn.bias, self.groups, self.gn.eps)
        return self._forward_dispatch(x)

    @torch.jit.unused
    def _plain_inference(self, x: Tensor) -> Optional[Tensor]:
        return eager_cpu_sa_inference(x, self)

    @torch.jit.unused
    def _forward_dispatch(self, x: Tensor) -> Tensor:
        gn = self.gn  # one nn.Module.__getattr__ lookup (it costs more than has_hooks)
        impl = self.impl
        if impl not in SA_IMPLS:  # an impl set after construction (the constructor checks its own)
            raise ValueError(f"ShuffleAttention: impl must be one of {SA_IMPLS}, got {impl!r}")
        recording = needs_pytorch_ops()  # a graph is recorded: PyTorch ops, no layout copies
        # Every impl below reads gn's parameters without calling it. (Planes without pixels
        # have nothing to normalise, and nn.GroupNorm refuses them: no call, no hooks. Under
        # torch.fx, x is a Proxy whose sizes are not known yet: gn is recorded.)
        if has_hooks(gn) and (isinstance(x, torch.fx.Proxy) or x.shape[2:].numel() > 0):
            y = self._forward_calling_gn(x)
            return y if recording else _keep_layout(x, y)
        params = (self.cweight, self.cbias, self.sweight, self.sbias, gn.weight, gn.bias)
        if recording:
            fn = _IMPL_FNS["reference" if impl == "reference" else "torch"]
            return fn(x, *params, self.groups, gn.eps)
        if impl == "auto":
            # Parameters on another device than x: the reference, for PyTorch's device error.
            impl = "fused" if fused_sa_supported(x, *params) else "reference"
        elif impl == "fused" and not fused_sa_supported(x):
            raise SanetError(f"ShuffleAttention(impl='fused'): {no_fused_kernel_reason(x)}; use "
                             "impl='auto' to fall back to PyTorch ops")
        if impl == "fused":  # returns x's layout itself
            return _shuffle_attention_fused(x, *params, self.groups, gn.eps)
        return _keep_layout(x, _IMPL_FNS[impl](x, *params, self.groups, gn.eps))

    @torch.jit.unused
    def _forward_calling_gn(self, x: Tensor) -> Tensor:
        """The authors' formulation with ``self.gn`` called as a module, so that its hooks
        run (activation capture, ``torch.nn.utils.prune`` recomputing ``gn.weight``).

        Like the authors' code (and unlike the functional forms), it inherits ``nn.GroupNorm``'s
        refusal of one value per group (one sample, G = 1, 1x1 planes), with our message.
        """
        channels = x.shape[1]
        xc = x.to(_compute_dtype(x))
        # 1. (N*G, C/G, *spatial), then the two halves of each group. unflatten/flatten, not
        # reshape(N * G, -1, ...): -1 is ambiguous for N = 0, and torch.fx can't unpack sizes.
        xg = xc.unflatten(1, (self.groups, channels // self.groups)).flatten(0, 1)
        x0, x1 = xg.chunk(2, dim=1)
        # 2. Channel branch: global average pool, per-channel affine, sigmoid gate (on the
        # spatially flattened planes, so that any rank broadcasts against (1, c, 1)).
        x0 = x0.flatten(2)
        s = x0.mean(dim=-1, keepdim=True)
        x0 = x0 * torch.sigmoid(self.cweight.reshape(1, -1, 1) * s + self.cbias.reshape(1, -1, 1))
        if not isinstance(x, torch.fx.Proxy) and xg.shape[0] * x1.shape[2:].numel() == 1:
            # nn.GroupNorm's own message ("... per channel when training") names neither SA
            # nor why the module is called at all
            raise SanetError(
                f"ShuffleAttention: input {list(x.shape)} gives GroupNorm one value per group (batch 1, "
                "groups=1, one position), which nn.GroupNorm refuses; SA calls it as a module only because "
                "gn has hooks (or a global module hook is set, e.g. by FlopCounterMode). Remove the hooks "
                "(SA computes this case without them), or give more than one sample or position")
        # 3. Spatial branch through the module, on the authors' (N*G, c, H, W) view. The input
        # gets the module's dtype: CPU group_norm refuses fp32 input with fp16 parameters.
        xs = self.gn(x1.to(self.gn.weight.dtype)).to(xc.dtype).flatten(2)
        x1 = x1.flatten(2)
        x1 = x1 * torch.sigmoid(self.sweight.reshape(1, -1, 1) * xs + self.sbias.reshape(1, -1, 1))
        # 4. Concatenate and view back; 5. channel shuffle with 2 groups.
        y = torch.cat([x0, x1], dim=1).reshape(x.shape)
        return channel_shuffle(y, 2).to(x.dtype)


_IMPL_FNS = {"reference": _shuffle_attention_reference, "torch": _shuffle_attention_torch}


def _keep_layout(x: Tensor, y: Tensor) -> Tensor:
    """``y`` in ``x``'s channels_last layout, as the fused kernels return it. The authors'
    reshapes give NCHW whatever the input: in a channels_last network every SA layer would
    hand the next one a layout it converts back (values are unchanged either way)."""
    if x.is_contiguous():
        return y
    for dim, layout in ((4, torch.channels_last), (5, torch.channels_last_3d)):
        if x.dim() == dim and x.is_contiguous(memory_format=layout):
            return y.contiguous(memory_format=layout)
    return y

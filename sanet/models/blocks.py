"""timm's ResNet blocks with Shuffle Attention at the authors' position.

The blocks reuse timm's ``Bottleneck``/``BasicBlock`` construction unchanged (timm builds
the attention layer from ``attn_layer``) and change two things:

* the attention layer is named ``sa`` as in the authors' code, so their checkpoints map
  one-to-one (timm calls it ``se``);
* ``forward`` runs the block's tail, ``bn -> SA -> (+ shortcut) -> ReLU``, as one fused op
  where the kernel supports it (:func:`sanet.ops.bn_shuffle_attention`): one pass over the
  activation instead of five, and backward keeps the conv output BatchNorm keeps anyway
  instead of BatchNorm's output too. Elsewhere (TorchScript, torch.fx, jit.trace, torch.export,
  ONNX export, other norm or activation layers, stochastic depth in
  training) it runs the same ops one by one.
"""
from __future__ import annotations

import inspect
from typing import Optional

import torch
from timm.models.resnet import BasicBlock, Bottleneck
from torch import Tensor, nn

from ..layers import ShuffleAttention
from ..ops import fused_bn_sa_supported, has_hooks, needs_pytorch_ops
from ..ops.fused import _bn_shuffle_attention

__all__ = ["SABottleneck", "SABasicBlock"]


class _SATailMixin:
    """Shared by both blocks: the authors' attribute name and the fused tail.

    TorchScript can't pass modules around, so each block names its tail modules in
    ``_tail_modules`` and writes the unfused tail inline.
    """

    @staticmethod
    def _with_sa_default(block: type, args: tuple, kwargs: dict) -> dict:
        """``kwargs`` with ``attn_layer=ShuffleAttention.fitted`` unless the caller set it
        (None included): timm's ResNet passes it only from ``block_args``, and timm's blocks
        default to no attention, so ``ResNet(block=SABottleneck, ...)`` would have built none."""
        bound = inspect.signature(block.__init__).bind_partial(None, *args, **kwargs)
        return kwargs if "attn_layer" in bound.arguments else dict(kwargs, attn_layer=ShuffleAttention.fitted)

    def _rename_attn(self) -> None:
        self.sa = self.se  # authors' attribute name; registered as a submodule
        del self.se

    @torch.jit.unused
    def _fused_tail(self, x: Tensor, shortcut: Tensor) -> Optional[Tensor]:
        """``relu(sa(bn(x)) + shortcut)`` as one op, or None where it can't fuse."""
        bn, act = self._tail_modules()
        if (
            self.sa is None
            or type(act) is not nn.ReLU
            or (self.drop_path is not None and self.training)
            or needs_pytorch_ops()
            # The fused op calls none of them. has_hooks sees a module's own hooks only, so
            # SA's child gn is named too (SA alone calls it when it has hooks).
            or has_hooks(bn, self.sa, act, *self.sa.children())
            or not fused_bn_sa_supported(x, bn, self.sa, shortcut)
        ):
            return None
        return _bn_shuffle_attention(x, bn, self.sa, shortcut, relu=True)


class SABottleneck(_SATailMixin, Bottleneck):
    """timm ``Bottleneck`` with SA after ``bn3`` (SA-NET.md section 2). ``attn_layer`` defaults
    to ``ShuffleAttention.fitted`` (G = 64, or the largest valid G below it)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **self._with_sa_default(Bottleneck, args, kwargs))
        self._rename_attn()

    @torch.jit.unused
    def _tail_modules(self):
        return self.bn3, self.act3

    def forward(self, x: Tensor) -> Tensor:
        shortcut = x
        x = self.act1(self.bn1(self.conv1(x)))
        x = self.aa(self.act2(self.drop_block(self.bn2(self.conv2(x)))))
        x = self.conv3(x)
        if self.downsample is not None:
            shortcut = self.downsample(shortcut)
        if not torch.jit.is_scripting():
            out = self._fused_tail(x, shortcut)
            if out is not None:
                return out
        x = self.bn3(x)
        if self.sa is not None:
            x = self.sa(x)
        if self.drop_path is not None:
            x = self.drop_path(x)
        return self.act3(x + shortcut)


class SABasicBlock(_SATailMixin, BasicBlock):
    """timm ``BasicBlock`` with SA after ``bn2`` (our choice; the authors released none).
    ``attn_layer`` defaults to ``ShuffleAttention.fitted`` (G = 64, or the largest valid G below it)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **self._with_sa_default(BasicBlock, args, kwargs))
        self._rename_attn()

    @torch.jit.unused
    def _tail_modules(self):
        return self.bn2, self.act2

    def forward(self, x: Tensor) -> Tensor:
        shortcut = x
        x = self.aa(self.act1(self.drop_block(self.bn1(self.conv1(x)))))
        x = self.conv2(x)
        if self.downsample is not None:
            shortcut = self.downsample(shortcut)
        if not torch.jit.is_scripting():
            out = self._fused_tail(x, shortcut)
            if out is not None:
                return out
        x = self.bn2(x)
        if self.sa is not None:
            x = self.sa(x)
        if self.drop_path is not None:
            x = self.drop_path(x)
        return self.act2(x + shortcut)

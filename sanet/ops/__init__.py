"""Fused kernels for Shuffle Attention: C++ (CPU) and Triton (CUDA), as PyTorch custom ops."""
from .cpu_ext import cpu_ext_status, load_cpu_ext
from .fused import (
    bn_shuffle_attention,
    fused_bn_sa_supported,
    fused_sa_supported,
    has_hooks,
    needs_pytorch_ops,
    shuffle_attention_fused,
)

__all__ = [
    "bn_shuffle_attention",
    "cpu_ext_status",
    "fused_bn_sa_supported",
    "fused_sa_supported",
    "has_hooks",
    "load_cpu_ext",
    "needs_pytorch_ops",
    "shuffle_attention_fused",
]

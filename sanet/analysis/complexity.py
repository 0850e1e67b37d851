"""Parameter and FLOP counts of models.

FLOPs come from :class:`torch.utils.flop_counter.FlopCounterMode`, which counts matrix
multiplications and convolutions only: it sees none of SA's work (pooling, GroupNorm,
sigmoid, products), so SA adds 0 FLOPs here; :func:`sa_elementwise_flops` gives a separate
estimate of that work. thop, the hook-based counter behind the paper's 2.76e-3 GFLOPs
(SA-NET.md section 2), counts per module type: of SA's modules it counts only the channel
branch's ``nn.AdaptiveAvgPool2d``, (HW + 1) per pooled value, i.e. C/2 * (HW + 1) per layer
and image (2.767 M for SA-ResNet-50 at 224x224: the paper's figure), and nothing for
``nn.GroupNorm``, ``nn.Sigmoid`` or the functional affine and products.
"""
from __future__ import annotations

from typing import Any, Dict, Sequence

import torch
from torch import nn

__all__ = ["count_params", "count_flops", "sa_elementwise_flops", "model_summary", "FLOP_COUNTER"]

FLOP_COUNTER = "torch.utils.flop_counter.FlopCounterMode (convolutions and matmuls; element-wise ops not counted)"


def count_params(model: nn.Module) -> Dict[str, int]:
    """Total parameters and those inside ShuffleAttention layers."""
    from sanet.layers import ShuffleAttention

    sa = sum(p.numel() for m in model.modules() if isinstance(m, ShuffleAttention) for p in m.parameters())
    return {"params": sum(p.numel() for p in model.parameters()), "sa_params": sa}


@torch.no_grad()
def count_flops(model: nn.Module, input_size: Sequence[int], batch_size: int = 1) -> int:
    """FLOPs of one forward pass (2 per multiply-add), by FlopCounterMode, on the model's device."""
    from torch.utils.flop_counter import FlopCounterMode

    device = next(model.parameters()).device
    x = torch.zeros((batch_size, *input_size), device=device)
    was_training = model.training
    model.eval()
    counter = FlopCounterMode(display=False)
    with counter:
        model(x)
    model.train(was_training)
    return int(counter.get_total_flops())


def sa_elementwise_flops(model: nn.Module, input_size: Sequence[int]) -> int:
    """Estimate of SA's element-wise FLOPs per image: ~10 per activation element it gates
    (statistics, affine, sigmoid, product), measured on the shapes a forward pass sees."""
    from sanet.layers import ShuffleAttention

    total = 0

    def hook(_m, inputs, _out):
        nonlocal total
        total += 10 * inputs[0][0].numel()

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, ShuffleAttention)]
    try:
        count_flops(model, input_size)
    finally:
        for h in handles:
            h.remove()
    return total


def model_summary(name: str, **kwargs: Any) -> Dict[str, Any]:
    """Parameters, FLOPs, input size and feature channels/strides of a registered model."""
    import timm

    import sanet  # noqa: F401

    model = timm.create_model(name, device="meta", **kwargs)
    cfg = model.pretrained_cfg
    input_size = tuple(cfg["input_size"])
    counts = count_params(model)
    flops = count_flops(model, input_size)
    info = getattr(model, "feature_info", [])
    return {
        "model": name,
        **counts,
        "input_size": list(input_size),
        "flops": flops,
        "macs": flops // 2,
        "gflops": round(flops / 1e9, 4),
        "sa_elementwise_flops_estimate": sa_elementwise_flops(model, input_size),
        "flop_counter": FLOP_COUNTER,
        "feature_channels": [f["num_chs"] for f in info],
        "feature_strides": [f["reduction"] for f in info],
        "feature_modules": [f["module"] for f in info],
        "num_classes": model.num_classes,
        "interpolation": cfg.get("interpolation"),
        "crop_pct": cfg.get("crop_pct"),
        "mean": list(cfg.get("mean", ())),
        "std": list(cfg.get("std", ())),
    }

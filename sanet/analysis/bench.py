"""Side-by-side benchmarks: SA implementations per layer, SA-ResNet vs ResNet per model.

Shared machines are noisy, so variants are timed interleaved (each round runs every
variant once, in a shuffled order). Times are reported as medians; a ratio between two
variants is the median over rounds of their per-round ratio (:func:`paired_ratio`), which
cancels the slow drifts of a shared machine that a ratio of medians keeps. Memory is measured, not timed: bytes saved for backward and peak
live bytes of a training step (see :mod:`sanet.analysis.memory`).
"""
from __future__ import annotations

import os
import platform
import random
import statistics
import time
from typing import Callable, Dict, List, Optional, Sequence

import torch
from torch import nn

from .memory import PeakMemoryTracker, saved_tensor_bytes

__all__ = ["time_interleaved", "paired_ratio", "layer_bench", "model_bench", "machine_info"]


def machine_info(device: torch.device) -> Dict[str, object]:
    info: Dict[str, object] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "device": str(device),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_interleaved(fns: Dict[str, Callable[[], object]], rounds: int, warmup: int = 2,
                     device: torch.device = torch.device("cpu"),
                     progress: Optional[Callable[[int], None]] = None) -> Dict[str, Dict[str, float]]:
    """Median/min/max milliseconds of each function, timed in shuffled interleaved rounds."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    samples: Dict[str, List[float]] = {k: [] for k in fns}
    rng = random.Random(0)
    for r in range(rounds):
        order = list(fns)
        rng.shuffle(order)
        for k in order:
            _sync(device)
            t0 = time.perf_counter()
            fns[k]()
            _sync(device)
            samples[k].append((time.perf_counter() - t0) * 1e3)
        if progress:
            progress(r)
    return {k: {"median_ms": statistics.median(v), "min_ms": min(v), "max_ms": max(v), "n": len(v),
                "samples_ms": v}
            for k, v in samples.items()}


def paired_ratio(times: Dict[str, Dict[str, object]], a: str, b: str) -> float:
    """Median over rounds of time(a) / time(b), both from the same :func:`time_interleaved` run."""
    return statistics.median(x / y for x, y in zip(times[a]["samples_ms"], times[b]["samples_ms"]))


def _peak_bytes(fn: Callable[[], object]) -> int:
    with PeakMemoryTracker() as tracker:
        fn()
    return tracker.peak


# ---------------------------------------------------------------- one SA layer

def layer_bench(shape: Sequence[int], impls: Sequence[str], *, rounds: int = 30, groups: int = 64,
                device: torch.device = torch.device("cpu"), seed: int = 0,
                progress: Optional[Callable[[int], None]] = None,
                dtype: torch.dtype = torch.float32) -> Dict[str, object]:
    """Forward and forward+backward of ShuffleAttention per ``impl``, and ``x.clone()``;
    input and parameters in ``dtype``."""
    from sanet.layers import ShuffleAttention, fit_sa_groups

    groups = fit_sa_groups(shape[1], groups)  # largest valid G not above the one asked for
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g).to(device, dtype)
    xg = x.clone().requires_grad_(True)
    grad = torch.randn(*shape, generator=g).to(device, dtype)
    layers: Dict[str, nn.Module] = {}
    for impl in impls:
        layer = ShuffleAttention(shape[1], groups, impl=impl).to(device)
        with torch.no_grad():  # trained-looking gates: the exp path runs on every channel
            for p in layer.parameters():
                p.copy_(torch.randn(p.shape, generator=g))
        layers[impl] = layer.to(dtype)

    def fwd(layer):
        def run():
            with torch.no_grad():
                return layer(x)
        return run

    def fwd_bwd(layer):
        def run():
            xg.grad = None
            layer.zero_grad(set_to_none=True)
            layer(xg).backward(grad)
        return run

    fns: Dict[str, Callable[[], object]] = {"clone": lambda: x.clone()}
    for impl, layer in layers.items():
        fns[f"{impl}/fwd"] = fwd(layer)
        fns[f"{impl}/fwd+bwd"] = fwd_bwd(layer)
    times = time_interleaved(fns, rounds, device=device, progress=progress)
    memory = {impl: {"saved_bytes": saved_tensor_bytes(lambda: layer(xg))["bytes"],
                     "peak_fwd_bwd_bytes": _peak_bytes(fwd_bwd(layer))}
              for impl, layer in layers.items()}
    return {"shape": list(shape), "groups": groups, "dtype": str(dtype).replace("torch.", ""),
            "input_bytes": x.numel() * x.element_size(),
            "times": times, "memory": memory}


# ---------------------------------------------------------------- whole models

def model_bench(names: Dict[str, Dict[str, object]], *, batch_size: int = 8, img_size: int = 224,
                rounds: int = 5, device: torch.device = torch.device("cpu"), seed: int = 0,
                progress: Optional[Callable[[int], None]] = None,
                amp: Optional[torch.dtype] = None) -> Dict[str, object]:
    """Inference and SGD training step of each model; saved-for-backward and peak bytes.

    ``names`` maps a label to ``{"model": timm name, **create_model kwargs}``. ``amp``: run
    forward passes under ``torch.autocast`` in that dtype (fp32 weights, as in AMP training).
    """
    import timm

    import sanet  # noqa: F401  (registers the SA models)

    torch.manual_seed(seed)
    x = torch.randn(batch_size, 3, img_size, img_size, device=device)
    target = torch.randint(0, 1000, (batch_size,), device=device)
    models, opts = {}, {}
    for label, spec in names.items():
        spec = dict(spec)
        torch.manual_seed(seed)
        models[label] = timm.create_model(spec.pop("model"), **spec).to(device)
        opts[label] = torch.optim.SGD(models[label].parameters(), lr=1e-3, momentum=0.9)
    loss_fn = nn.CrossEntropyLoss()

    def autocast():
        return torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None)

    def infer(m):
        def run():
            m.eval()
            with torch.no_grad(), autocast():
                return m(x)
        return run

    def loss(m):
        with autocast():
            return loss_fn(m(x), target)

    def train_step(m, opt):
        def run():
            m.train()
            opt.zero_grad(set_to_none=True)
            loss(m).backward()
            opt.step()
        return run

    fns: Dict[str, Callable[[], object]] = {}
    for label, m in models.items():
        fns[f"{label}/inference"] = infer(m)
        fns[f"{label}/train_step"] = train_step(m, opts[label])
    times = time_interleaved(fns, rounds, warmup=1, device=device, progress=progress)

    memory = {}
    for label, m in models.items():
        m.train()
        saved = saved_tensor_bytes(lambda: loss(m))
        memory[label] = {"saved_bytes": saved["bytes"], "saved_tensors": saved["tensors"],
                         "peak_train_step_bytes": _peak_bytes(train_step(m, opts[label]))}
    return {"batch_size": batch_size, "img_size": img_size, "amp": None if amp is None else str(amp),
            "times": times, "memory": memory}

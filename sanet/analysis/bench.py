"""Side-by-side benchmarks: SA implementations per layer, SA-ResNet vs ResNet per model.

Shared machines are noisy, so variants are timed interleaved (each round runs every
variant once, in a shuffled order). Times are reported as medians; a ratio between two
variants is the median over rounds of their per-round ratio (:func:`paired_ratio`), which
cancels the slow drifts of a shared machine that a ratio of medians keeps. Memory is measured,
not timed: bytes saved for backward (with and without the model's own weights) and peak live
bytes of a training step (see :mod:`sanet.analysis.memory`).
"""
from __future__ import annotations

import os
import platform
import random
import statistics
import subprocess
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import torch
from torch import nn

from .memory import PeakMemoryTracker, saved_tensor_bytes

__all__ = ["time_interleaved", "paired_ratio", "model_ratios", "layer_bench", "model_bench", "machine_info", "run_info",
           "make_sa_layers"]


def _cpu_model() -> Optional[str]:
    """The CPU's ``model name`` from /proc/cpuinfo (Linux), else None."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name":
                    return value.strip()
    except OSError:
        pass
    return None


def machine_info(device: torch.device) -> Dict[str, object]:
    """Python, torch, platform, CPU and device of this run."""
    info: Dict[str, object] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "device": str(device),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def _git_commit() -> Dict[str, object]:
    """Short commit of the repository sanet runs from, and whether tracked files differ from
    it; None for both where sanet is not run from a git checkout (an installed wheel) or git
    is missing. Never raises: a benchmark should not fail over its metadata."""
    root = Path(__file__).resolve().parents[2]  # the folder holding the sanet package

    def git(*argv: str) -> Optional[str]:
        try:
            done = subprocess.run(["git", "-C", str(root), *argv], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    top = git("rev-parse", "--show-toplevel")
    # Only the package's own checkout: an installed sanet inside some other repository (a
    # venv in a project folder) would otherwise report that repository's commit.
    if top is None or Path(top).resolve() != root:
        return {"git_commit": None, "git_dirty": None}
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"git_commit": git("rev-parse", "--short", "HEAD"),
            "git_dirty": None if status is None else bool(status)}


def run_info() -> Dict[str, object]:
    """Versions (sanet, timm, torch), git commit and the environment variables that move
    CPU timings, for a result file to say what produced it."""
    import timm

    import sanet

    return {"sanet": sanet.__version__, "timm": timm.__version__, "torch": torch.__version__,
            **_git_commit(),
            "env": {k: os.environ.get(k) for k in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS", "LD_PRELOAD")}}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_interleaved(fns: Dict[str, Callable[[], object]], rounds: int, warmup: int = 2,
                     device: torch.device = torch.device("cpu"),
                     progress: Optional[Callable[[int], None]] = None) -> Dict[str, Dict[str, float]]:
    """Median/min/max milliseconds of each function, timed in shuffled interleaved rounds."""
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
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

def make_sa_layers(channels: int, groups: int, impls: Sequence[str], generator: torch.Generator, *,
                   device: torch.device = torch.device("cpu"),
                   dtype: torch.dtype = torch.float32) -> Dict[str, nn.Module]:
    """One ShuffleAttention per ``impl``, all with the same random N(0, 1) parameters (drawn
    once from ``generator``): the implementations then compute the same function, and their
    times and memory compare like for like."""
    from sanet.layers import ShuffleAttention

    template = ShuffleAttention(channels, groups)
    with torch.no_grad():  # trained-looking gates: the exp path runs on every channel
        for p in template.parameters():
            p.copy_(torch.randn(p.shape, generator=generator))
    state = template.state_dict()
    layers: Dict[str, nn.Module] = {}
    for impl in impls:
        layer = ShuffleAttention(channels, groups, impl=impl)
        layer.load_state_dict(state)
        layers[impl] = layer.to(device, dtype)
    return layers


def layer_bench(shape: Sequence[int], impls: Sequence[str], *, rounds: int = 30, groups: int = 64,
                device: torch.device = torch.device("cpu"), seed: int = 0,
                progress: Optional[Callable[[int], None]] = None,
                dtype: torch.dtype = torch.float32) -> Dict[str, object]:
    """Forward and forward+backward of ShuffleAttention per ``impl``, and ``x.clone()``;
    input and parameters in ``dtype``, the same parameters for every impl.

    ``max_abs_diff`` in the result: each impl's largest forward difference from the first
    impl's on the benchmark's input (a check that they compute the same thing)."""
    from sanet.layers import fit_sa_groups

    groups = fit_sa_groups(shape[1], groups)  # largest valid G not above the one asked for
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g).to(device, dtype)
    xg = x.clone().requires_grad_(True)
    grad = torch.randn(*shape, generator=g).to(device, dtype)
    layers = make_sa_layers(shape[1], groups, impls, g, device=device, dtype=dtype)

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
    with torch.no_grad():
        outs = {impl: fwd(layer)().float() for impl, layer in layers.items()}
    first = next(iter(outs.values()), None)
    max_abs_diff = {impl: (o - first).abs().max().item() if o.numel() else 0.0 for impl, o in outs.items()}
    return {"shape": list(shape), "groups": groups, "dtype": str(dtype).replace("torch.", ""),
            "input_bytes": x.numel() * x.element_size(),
            "times": times, "memory": memory, "max_abs_diff": max_abs_diff}


# ---------------------------------------------------------------- whole models

def model_bench(names: Dict[str, Dict[str, object]], *, batch_size: int = 8, img_size: int = 224,
                rounds: int = 5, device: torch.device = torch.device("cpu"), seed: int = 0,
                progress: Optional[Callable[[int], None]] = None,
                amp: Optional[torch.dtype] = None) -> Dict[str, object]:
    """Inference and SGD training step of each model; saved-for-backward and peak bytes.

    ``saved_bytes`` counts every storage autograd keeps, the model's own parameters included
    (convolutions save their weights); ``saved_activation_bytes`` leaves out the storages of
    the model's parameters and buffers (autocast's low-precision weight copies stay in: the
    forward pass makes them). ``names`` maps a label to ``{"model": timm name, **create_model kwargs}``. ``amp``: run
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
        spec.setdefault("num_classes", 1000)  # the same head for all (some timm models have none)
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
        saved = saved_tensor_bytes(lambda: loss(m), exclude=[*m.parameters(), *m.buffers()])
        memory[label] = {"saved_bytes": saved["bytes"], "saved_activation_bytes": saved["activation_bytes"],
                         "saved_tensors": saved["tensors"],
                         "peak_train_step_bytes": _peak_bytes(train_step(m, opts[label]))}
    return {"batch_size": batch_size, "img_size": img_size, "amp": None if amp is None else str(amp),
            "times": times, "memory": memory}


def model_ratios(res: Dict, baseline: str) -> Dict[str, Dict[str, float]]:
    """Per model, against ``baseline``: inference and training-step time (per-round paired
    medians), saved-for-backward bytes (all, and activations only) and peak bytes."""
    t, mem = res["times"], res["memory"]
    b = mem[baseline]
    return {label: {"inference": paired_ratio(t, f"{label}/inference", f"{baseline}/inference"),
                    "train_step": paired_ratio(t, f"{label}/train_step", f"{baseline}/train_step"),
                    "saved": m["saved_bytes"] / b["saved_bytes"],
                    "saved_activations": m["saved_activation_bytes"] / b["saved_activation_bytes"],
                    "peak": m["peak_train_step_bytes"] / b["peak_train_step_bytes"]}
            for label, m in mem.items()}

"""Where SA's time goes on a GPU: host (Python + launch) cost per call, and a training step's
kernels. Run on a GPU machine from the repository root:

    python benchmarks/gpu_profile.py [--out DIR]

Prints a short summary; writes the profiler tables to DIR (default: the current folder).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import timm
import torch
from torch import nn
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

import sanet


def host_and_device_us(fn, n: int = 200):
    """Microseconds per call: enqueue time (host, no sync in the loop) and total (with sync)."""
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    t2 = time.perf_counter()
    return (t1 - t0) / n * 1e6, (t2 - t0) / n * 1e6


def layer_costs() -> None:
    from sanet.ops.triton_sa import triton_sa_forward

    print("per call, 8x256x56x56 fp32: host enqueue us / wall us (back to back, one sync at the end)")
    x = torch.randn(8, 256, 56, 56, device="cuda")
    xg = x.clone().requires_grad_(True)
    sa = sanet.ShuffleAttention(256).cuda()
    ref = sanet.ShuffleAttention(256, impl="reference").cuda()
    bn = nn.BatchNorm2d(256).cuda().train()
    x3 = x.reshape(8, 256, -1)
    xcl = x.to(memory_format=torch.channels_last).requires_grad_(True)
    params = [p.detach() for p in sa.parameters()]
    def no_grad(module):
        def run():
            with torch.no_grad():
                return module(x)
        return run

    cases = {
        "x.clone()": lambda: x.clone(),
        "x + x": lambda: x + x,
        "triton_sa_forward (kernel launch + allocations)": lambda: triton_sa_forward(x3, None, *params, 64, 1e-5),
        "SA fused, no grad": no_grad(sa),
        "SA reference, no grad": no_grad(ref),
        "SA fused fwd+bwd": lambda: sa(xg).sum().backward(),
        "SA fused fwd+bwd, channels_last input": lambda: sa(xcl).sum().backward(),
        "SA reference fwd+bwd": lambda: ref(xg).sum().backward(),
        "BN(train) fwd+bwd": lambda: bn(xg).sum().backward(),
        "BN+SA+add+ReLU fused (train) fwd+bwd": lambda: sanet.ops.bn_shuffle_attention(
            xg, bn, sa, x, relu=True).sum().backward(),
    }
    for name, fn in cases.items():
        host, wall = host_and_device_us(fn)
        print(f"  {name:<48} {host:8.1f} {wall:8.1f}")


def train_steps():
    """(name, SGD training step at batch 64, fp32) for ResNet-50 and SA-ResNet-50."""
    x = torch.randn(64, 3, 224, 224, device="cuda")
    y = torch.randint(0, 1000, (64,), device="cuda")
    for name in ("resnet50", "sa_resnet50"):
        model = timm.create_model(name).cuda().train()
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

        def step():
            opt.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()

        yield name, step


def step_profile(out: Path) -> None:
    for name, step in train_steps():
        host, wall = host_and_device_us(step, n=10)
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(3):
                step()
            torch.cuda.synchronize()
        events = prof.key_averages()
        # Kernels only: an operator's (or autograd.Function's) self device time is its
        # kernels' time, counted again.
        gpu_us = sum(e.self_device_time_total for e in events if e.device_type == DeviceType.CUDA) / 3
        print(f"{name}: train step batch 64 fp32: host enqueue {host / 1e3:.1f} ms, wall {wall / 1e3:.1f} ms, "
              f"GPU kernel time {gpu_us / 1e3:.1f} ms")
        (out / f"profile-{name}.txt").write_text(
            events.table(sort_by="self_device_time_total", row_limit=25) + "\n"
            + events.table(sort_by="self_cpu_time_total", row_limit=25))


def graphed_steps() -> None:
    """A training step captured whole in a CUDA graph (PyTorch's "whole network capture"
    recipe): what the step costs once the host no longer enqueues each kernel."""
    for name, step in train_steps():
        try:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(3):
                    step()
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                step()
            host, wall = host_and_device_us(graph.replay, n=20)
            print(f"{name}: train step batch 64 fp32 as one CUDA graph: wall {wall / 1e3:.2f} ms per replay")
        except Exception as e:  # report and go on: the eager numbers above still stand
            print(f"{name}: CUDA graph capture failed: {type(e).__name__}: {e}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("."), help="folder for the profiler tables (default: .)")
    args = p.parse_args()
    if not torch.cuda.is_available():
        # Every measurement here is of CUDA kernels and streams: nothing to fall back to.
        print("gpu_profile.py: no CUDA device is available (torch.cuda.is_available() is false); "
              "run it on a GPU machine", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    print(torch.cuda.get_device_name(), "torch", torch.__version__)
    layer_costs()
    step_profile(args.out)
    graphed_steps()
    return 0


if __name__ == "__main__":
    sys.exit(main())

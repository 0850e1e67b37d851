"""What ``--amp`` costs on the CPU: one model's inference and SGD training step in fp32, under
bf16 autocast and under fp16 autocast, timed interleaved in one process (ratios vs fp32 are
per-round paired medians). It backs the warning ``sanet train``/``sanet eval`` give for
``--amp fp16`` on a CPU.

    .venv/bin/python benchmarks/amp_cpu.py --threads 2 --rounds 3 [--model sa_resnet50] [--json]
"""
from __future__ import annotations

import argparse
import copy
from typing import Callable, Dict, Optional

import torch
from torch import nn

from sanet.analysis.bench import machine_info, paired_ratio, run_info, time_interleaved
from sanet.cli.bench import _at_least_one
from sanet.cli.common import print_json

AMPS: Dict[str, Optional[torch.dtype]] = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def _fns(model: nn.Module, x: torch.Tensor, target: torch.Tensor,
         dtype: Optional[torch.dtype]) -> Dict[str, Callable[[], object]]:
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

    def autocast():
        return torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None)

    def inference():
        model.eval()
        with torch.no_grad(), autocast():
            return model(x)

    def train_step():
        model.train()
        opt.zero_grad(set_to_none=True)
        with autocast():
            loss = nn.functional.cross_entropy(model(x), target)
        loss.backward()
        opt.step()

    return {"inference": inference, "train_step": train_step}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="sa_resnet50", help="timm model name (default sa_resnet50)")
    p.add_argument("--batch-size", type=_at_least_one, default=8, help="images per step (default 8)")
    p.add_argument("--img-size", type=_at_least_one, default=224, help="image side in pixels (default 224)")
    p.add_argument("--rounds", type=_at_least_one, default=3, help="timing rounds (default 3)")
    p.add_argument("--threads", type=_at_least_one, default=None, help="torch threads (default: torch's)")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    import timm

    import sanet  # noqa: F401  (registers the SA models)

    torch.manual_seed(0)
    base = timm.create_model(args.model, num_classes=1000)
    x = torch.randn(args.batch_size, 3, args.img_size, args.img_size)
    target = torch.randint(0, 1000, (args.batch_size,))
    fns: Dict[str, Callable[[], object]] = {}
    for amp, dtype in AMPS.items():  # a copy each: the same weights, its own optimizer steps
        for what, fn in _fns(copy.deepcopy(base), x, target, dtype).items():
            fns[f"{amp}/{what}"] = fn
    times = time_interleaved(fns, args.rounds, warmup=1)
    ratios = {f"{amp}/{what}": paired_ratio(times, f"{amp}/{what}", f"fp32/{what}")
              for amp in AMPS for what in ("inference", "train_step")}
    res = {"args": vars(args), "machine": machine_info(torch.device("cpu")), "run": run_info(),
           "times": times, "ratios_vs_fp32": ratios}
    if args.json:
        print_json(res)
        return 0
    m = res["machine"]
    print(f"{args.model}, batch {args.batch_size} at {args.img_size}px, {m['threads']} torch threads, "
          f"{m['cpu_capability']}, torch {m['torch']} (ratios vs fp32: per-round paired medians)")
    print(f"{'amp':<6}{'infer ms':>10}{'ratio':>8}{'train ms':>10}{'ratio':>8}")
    for amp in AMPS:
        inf, tr = times[f"{amp}/inference"]["median_ms"], times[f"{amp}/train_step"]["median_ms"]
        print(f"{amp:<6}{inf:>10.1f}{ratios[f'{amp}/inference']:>8.2f}{tr:>10.1f}"
              f"{ratios[f'{amp}/train_step']:>8.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

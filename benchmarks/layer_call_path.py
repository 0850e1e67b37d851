"""What the Python on the way to the kernel costs: one ShuffleAttention layer's inference
forward (``torch.no_grad()``, CPU) through the short path for plain inference
(``sanet.ops.fused.eager_cpu_sa_inference``), through the general dispatch (the short path
switched off), and the kernel called directly, next to the authors' formulation and
``x.clone()``, timed interleaved in one process (ratios are per-round paired medians).
Each round runs the reference too, so every call finds caches as a layer in a network
does: cold.

    .venv/bin/python benchmarks/layer_call_path.py --threads 2 --rounds 60 [--shapes 8x1024x14x14] [--json]
"""
from __future__ import annotations

import argparse
from typing import Callable, Dict, List

import torch

import sanet
from sanet.analysis.bench import machine_info, paired_ratio, run_info, time_interleaved
from sanet.cli.bench import _at_least_one, _shape
from sanet.cli.common import print_json
from sanet.layers import shuffle_attention as sa_module
from sanet.ops import load_cpu_ext, sa_op

_SHORT = sa_module.eager_cpu_sa_inference


def _no_short_path(x, sa):
    return None


def _fns(shape: List[int], groups: int) -> Dict[str, Callable[[], object]]:
    gen = torch.Generator().manual_seed(0)
    sa = sanet.ShuffleAttention(shape[1], groups).eval()
    with torch.no_grad():  # trained-looking gates: the sigmoid runs on every spatial plane
        for p in sa.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
    ref = sanet.ShuffleAttention(shape[1], groups, impl="reference").eval()
    ref.load_state_dict(sa.state_dict())
    x = torch.randn(shape, generator=gen)
    params = (sa.cweight, sa.cbias, sa.sweight, sa.sbias, sa.gn.weight, sa.gn.bias)

    def layer(short: bool) -> Callable[[], object]:
        def run():
            sa_module.eager_cpu_sa_inference = _SHORT if short else _no_short_path  # both pay the switch
            with torch.no_grad():
                return sa(x)
        return run

    def kernel():
        with torch.no_grad():
            return sa_op.KERNELS["cpu"][0](x, None, *params, groups, sa.gn.eps, None, None, None, None,
                                           False, 0.0, False)[0]

    def reference():
        with torch.no_grad():
            return ref(x)

    return {"short": layer(True), "general": layer(False), "kernel": kernel, "reference": reference,
            "clone": x.clone}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", nargs="+", metavar="NxCxHxW", default=["8x1024x14x14", "8x256x56x56"],
                   help="layer input shapes NxCxHxW (or 1-D, 3-D; default 8x1024x14x14 8x256x56x56)")
    p.add_argument("--groups", type=_at_least_one, default=64, help="G (default 64)")
    p.add_argument("--rounds", type=_at_least_one, default=60, help="timing rounds (default 60)")
    p.add_argument("--threads", type=_at_least_one, default=None, help="torch threads (default: torch's)")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if load_cpu_ext() is None:
        p.error("the fused CPU kernels are not available here (see `sanet ext`)")
    try:
        shapes = [_shape(s) for s in args.shapes]  # sanet bench's parser and errors
    except ValueError as exc:
        p.error(f"--shapes: {exc}")
    for shape in shapes:
        if shape[1] % (2 * args.groups):
            p.error(f"--shapes: {shape[1]} channels don't divide into 2 x {args.groups} groups; valid --groups: "
                    f"{sanet.valid_sa_groups(shape[1])}")
    layers = []
    try:
        for shape in shapes:
            times = time_interleaved(_fns(shape, args.groups), args.rounds)
            ratios = {"general/short": paired_ratio(times, "general", "short"),
                      "short/kernel": paired_ratio(times, "short", "kernel"),
                      "general/kernel": paired_ratio(times, "general", "kernel"),
                      "reference/short": paired_ratio(times, "reference", "short"),
                      "reference/general": paired_ratio(times, "reference", "general"),
                      "short/clone": paired_ratio(times, "short", "clone")}
            layers.append({"shape": shape, "times": times, "ratios": ratios})
    finally:
        sa_module.eager_cpu_sa_inference = _SHORT
    res = {"args": vars(args), "machine": machine_info(torch.device("cpu")), "run": run_info(), "layers": layers}
    if args.json:
        print_json(res)
        return 0
    m = res["machine"]
    print(f"{m['threads']} torch threads, {m['cpu_capability']}, torch {m['torch']}, G={args.groups} "
          "(paired medians of per-round ratios)")
    for layer in layers:
        t, r = layer["times"], layer["ratios"]
        print("x".join(map(str, layer["shape"])) + ": " + ", ".join(
            f"{k} {t[k]['median_ms']:.3f} ms" for k in t))
        print("  " + ", ".join(f"{k} {v:.3f}" for k, v in r.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

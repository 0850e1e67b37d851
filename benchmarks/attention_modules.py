"""SA next to the attention modules the paper compares with, on the same ResNet-50.

SE, ECA and CBAM come from timm (``resnet50`` with ``block_args=dict(attn_layer=...)``,
which is how timm builds seresnet50/ecaresnet50); SA is ours, with the fused kernels and
with the authors' formulation. Reports parameters, inference and SGD training step time
(interleaved; ratios vs plain resnet50 are per-round paired medians) and bytes saved for
backward (all, and without the model's own parameters and buffers). The JSON holds the
ratios the table prints, the arguments, versions and git commit.

    .venv/bin/python benchmarks/attention_modules.py --threads 2 --rounds 10 [--json] [--output F]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from sanet.analysis.bench import machine_info, model_bench, model_ratios, run_info
from sanet.checkpoint import write_json_atomic
from sanet.cli.bench import _at_least_one
from sanet.cli.common import print_json
from sanet.ops import fused_sa_supported

MODELS = {
    "resnet50": {"model": "resnet50"},
    "se": {"model": "resnet50", "block_args": {"attn_layer": "se"}},
    "eca": {"model": "resnet50", "block_args": {"attn_layer": "eca"}},
    "cbam": {"model": "resnet50", "block_args": {"attn_layer": "cbam"}},
    "sa (fused)": {"model": "sa_resnet50"},
    "sa (reference)": {"model": "sa_resnet50", "sa_impl": "reference"},
}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch-size", type=_at_least_one, default=8, help="images per step (default 8)")
    p.add_argument("--img-size", type=_at_least_one, default=224, help="image side in pixels (default 224)")
    p.add_argument("--rounds", type=_at_least_one, default=5, help="timing rounds (default 5)")
    p.add_argument("--threads", type=_at_least_one, default=None, help="torch threads (default: torch's)")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")
    p.add_argument("--output", type=Path, default=None, help="also write the JSON result here")
    args = p.parse_args()
    from sanet.cli.bench import check_output_path, check_trainable_batch

    try:  # before the timing, as `sanet bench` does: its results would be lost at the end
        check_trainable_batch(args.batch_size, args.img_size)
        if args.output is not None:
            check_output_path(args.output)
    except ValueError as exc:
        p.error(str(exc))
    if args.threads:
        torch.set_num_threads(args.threads)
    import timm

    import sanet  # noqa: F401

    models, notes = dict(MODELS), []
    if not fused_sa_supported(torch.empty(1, 2, 1)):
        # impl="auto" would run the authors' formulation under the fused row's name
        del models["sa (fused)"]
        notes.append("no fused SA kernel on this CPU (see `sanet ext`): the 'sa (fused)' row is left out")
        print(f"note: {notes[-1]}", file=sys.stderr)
    params = {}
    for label, spec in models.items():
        spec = dict(spec)
        model = timm.create_model(spec.pop("model"), device="meta", **spec)
        params[label] = sum(q.numel() for q in model.parameters())
    res = model_bench(models, batch_size=args.batch_size, img_size=args.img_size, rounds=args.rounds)
    res["params"] = params
    res["machine"] = machine_info(torch.device("cpu"))
    res["run"] = run_info()
    res["fused_kernel_available"], res["notes"] = "sa (fused)" in models, notes
    res["args"] = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    t, mem = res["times"], res["memory"]
    # The same paired ratios the table prints, so that a result file holds them too.
    res["ratios"] = model_ratios(res, "resnet50")
    if args.output:
        write_json_atomic(res, args.output)
    if args.json:
        print_json(res)
        return 0
    print(f"ResNet-50 + attention, batch {args.batch_size} at {args.img_size}px, "
          f"{res['machine']['threads']} threads (ratios vs resnet50: per-round paired medians)")
    print(f"{'module':<16}{'params':>12}{'infer ms':>10}{'ratio':>7}{'train ms':>10}{'ratio':>7}{'saved MiB':>11}"
          f"{'ratio':>7}{'act MiB':>9}{'ratio':>7}")
    for label in models:
        inf, tr = t[f"{label}/inference"]["median_ms"], t[f"{label}/train_step"]["median_ms"]
        r = res["ratios"][label]
        print(f"{label:<16}{params[label]:>12,}{inf:>10.1f}{r['inference']:>7.3f}{tr:>10.1f}{r['train_step']:>7.3f}"
              f"{mem[label]['saved_bytes'] / 2**20:>11.1f}{r['saved']:>7.3f}"
              f"{mem[label]['saved_activation_bytes'] / 2**20:>9.1f}{r['saved_activations']:>7.3f}")
    print("(saved: every storage autograd keeps, weights included; act: without the model's parameters and buffers)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``sanet bench``: SA layer and SA-ResNet-50 benchmarks, measured side by side."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Dict, List

from .common import add_json_flag, print_json

DEFAULT_SHAPES = ["8x256x56x56", "8x1024x14x14"]
MIB = 2 ** 20
DTYPES = {"float32": "float32", "float16": "float16", "bfloat16": "bfloat16", "fp16": "float16",
          "bf16": "bfloat16"}


def add_parser(sub, name: str) -> argparse.ArgumentParser:
    p = sub.add_parser(
        name, help="benchmark SA layers and SA-ResNet-50 (ratios, memory)",
        description="Time one SA layer per implementation (reference = the authors' formulation, "
                    "torch = per-channel form in PyTorch ops, fused = our kernels) next to x.clone(), "
                    "and SA-ResNet-50 (fused and reference SA) next to timm's resnet50: inference, "
                    "SGD training step, bytes saved for backward, peak live bytes. Variants run "
                    "interleaved in one process; ratios are per-round paired medians (see docs/benchmarks.md).")
    p.add_argument("--shapes", nargs="*", default=DEFAULT_SHAPES, metavar="NxCxHxW",
                   help=f"layer input shapes (default: {' '.join(DEFAULT_SHAPES)}); 3-D/5-D shapes work too")
    p.add_argument("--impls", nargs="*", default=["reference", "torch", "fused"],
                   help="layer implementations to time (default: reference torch fused)")
    p.add_argument("--rounds", type=int, default=30, help="timing rounds per layer shape (default 30)")
    p.add_argument("--model", default="sa_resnet50", help="SA model for the model table (default sa_resnet50)")
    p.add_argument("--baseline", default="resnet50", help="plain model to compare with (default resnet50)")
    p.add_argument("--batch-size", type=int, default=8, help="model batch size (default 8)")
    p.add_argument("--img-size", type=int, default=224, help="model input size (default 224)")
    p.add_argument("--model-rounds", type=int, default=7, help="timing rounds for models (default 7)")
    p.add_argument("--skip-layers", action="store_true", help="only the model table")
    p.add_argument("--skip-models", action="store_true", help="only the layer table")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's default)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="device (default cpu)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32",
                   help="layers: input and parameters in this dtype; models: forward passes under "
                        "torch.autocast in this dtype, fp32 weights (default float32: no autocast)")
    p.add_argument("--output", type=Path, default=None, help="also write the JSON result to this file")
    add_json_flag(p)
    return p


def _shape(text: str) -> List[int]:
    try:
        dims = [int(d) for d in text.lower().split("x")]
    except ValueError:
        raise ValueError(f"bad shape {text!r}; expected e.g. 8x256x56x56") from None
    if not 3 <= len(dims) <= 5 or min(dims) <= 0:
        raise ValueError(f"bad shape {text!r}; expected 3 to 5 positive dims, e.g. 8x256x56x56")
    return dims


def _layer_text(res: Dict) -> List[str]:
    from sanet.analysis.bench import paired_ratio

    t, mem = res["times"], res["memory"]
    has_ref = "reference/fwd" in t
    lines = [f"SA layer {'x'.join(map(str, res['shape']))}, G={res['groups']}, {res['dtype']} "
             f"(x.clone(): {t['clone']['median_ms']:.3f} ms; ratios are per-round paired medians)",
             f"  {'impl':<11}{'fwd ms':>9}{'fwd+bwd ms':>12}{'fwd x ref':>11}{'f+b x ref':>11}"
             f"{'fwd/clone':>11}{'saved MiB':>11}{'peak MiB':>10}"]
    for impl in mem:
        f, fb = t[f"{impl}/fwd"]["median_ms"], t[f"{impl}/fwd+bwd"]["median_ms"]
        sp = f"{paired_ratio(t, 'reference/fwd', f'{impl}/fwd'):.2f}x" if has_ref else "-"
        spb = f"{paired_ratio(t, 'reference/fwd+bwd', f'{impl}/fwd+bwd'):.2f}x" if has_ref else "-"
        lines.append(f"  {impl:<11}{f:>9.3f}{fb:>12.3f}{sp:>11}{spb:>11}"
                     f"{paired_ratio(t, f'{impl}/fwd', 'clone'):>10.2f}x"
                     f"{mem[impl]['saved_bytes'] / MIB:>11.1f}{mem[impl]['peak_fwd_bwd_bytes'] / MIB:>10.1f}")
    return lines


def _model_text(res: Dict, baseline: str) -> List[str]:
    from sanet.analysis.bench import paired_ratio

    t, mem = res["times"], res["memory"]
    b_saved, b_peak = mem[baseline]["saved_bytes"], mem[baseline]["peak_train_step_bytes"]
    amp = f", autocast {res['amp'].replace('torch.', '')}" if res["amp"] else ""
    lines = [f"Models, batch {res['batch_size']} at {res['img_size']}px{amp} (ratios vs {baseline}; "
             "time ratios are per-round paired medians)",
             f"  {'model':<24}{'infer ms':>10}{'ratio':>7}{'train ms':>10}{'ratio':>7}"
             f"{'saved MiB':>11}{'ratio':>7}{'peak MiB':>10}{'ratio':>7}"]
    for label, m in mem.items():
        inf, tr = t[f"{label}/inference"]["median_ms"], t[f"{label}/train_step"]["median_ms"]
        r_inf = paired_ratio(t, f"{label}/inference", f"{baseline}/inference")
        r_tr = paired_ratio(t, f"{label}/train_step", f"{baseline}/train_step")
        lines.append(f"  {label:<24}{inf:>10.1f}{r_inf:>7.3f}{tr:>10.1f}{r_tr:>7.3f}"
                     f"{m['saved_bytes'] / MIB:>11.1f}{m['saved_bytes'] / b_saved:>7.3f}"
                     f"{m['peak_train_step_bytes'] / MIB:>10.1f}{m['peak_train_step_bytes'] / b_peak:>7.3f}")
    return lines


def run(args: argparse.Namespace) -> int:
    import torch
    from tqdm import tqdm

    from sanet.analysis.bench import layer_bench, machine_info, model_bench
    from sanet.ops import fused_sa_supported

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = getattr(torch, DTYPES[args.dtype])
    shapes = [_shape(s) for s in args.shapes]
    result: Dict = {"machine": machine_info(device), "layers": [], "models": None}
    quiet = args.json
    impls = list(args.impls)
    if "fused" in impls and not fused_sa_supported(torch.empty(1, 2, 1, device=device, dtype=dtype)):
        impls.remove("fused")
        print(f"sanet bench: no fused kernel for {device.type} {args.dtype}; timing {', '.join(impls)} only",
              file=sys.stderr)
    if not args.skip_layers:
        for shape in shapes:
            bar = tqdm(total=args.rounds, desc=f"layer {'x'.join(map(str, shape))}", disable=quiet, leave=False)
            result["layers"].append(layer_bench(shape, impls, rounds=args.rounds, device=device,
                                                progress=lambda _: bar.update(), dtype=dtype))
            bar.close()
    if not args.skip_models:
        specs = {
            args.baseline: {"model": args.baseline},
            args.model: {"model": args.model},
            f"{args.model}[reference]": {"model": args.model, "sa_impl": "reference"},
        }
        bar = tqdm(total=args.model_rounds, desc="models", disable=quiet, leave=False)
        result["models"] = model_bench(specs, batch_size=args.batch_size, img_size=args.img_size, rounds=args.model_rounds,
                                       device=device, progress=lambda _: bar.update(),
                                       amp=None if dtype == torch.float32 else dtype)
        bar.close()
    if args.output:
        args.output.write_text(json.dumps(result, indent=2) + "\n")
    if args.json:
        print_json(result)
        return 0
    m = result["machine"]
    print(f"{m['processor']}, {m['cpu_count']} CPUs, {m['threads']} torch threads, "
          f"{m['cpu_capability']}, torch {m['torch']}, device {m['device']}"
          + (f" ({m['gpu']})" if "gpu" in m else "") + f", {args.dtype}")
    for res in result["layers"]:
        print("\n".join(_layer_text(res)))
    if result["models"]:
        print("\n".join(_model_text(result["models"], args.baseline)))
    return 0

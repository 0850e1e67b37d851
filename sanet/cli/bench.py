"""``sanet bench``: SA layer and SA-ResNet-50 benchmarks, measured side by side."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Dict, List

from ..errors import SanetError
from ..layers import SA_IMPLS
from .common import add_json_flag, check_model_name, print_json

DEFAULT_SHAPES = ["8x256x56x56", "8x1024x14x14"]
MIB = 2 ** 20
DTYPES = {"float32": "float32", "float16": "float16", "bfloat16": "bfloat16", "fp16": "float16",
          "bf16": "bfloat16"}


def _at_least_one(text: str) -> int:
    """argparse type: an int >= 1 (0 rounds would leave nothing to take a median of)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def add_parser(sub, name: str) -> argparse.ArgumentParser:
    p = sub.add_parser(
        name, help="benchmark SA layers and SA-ResNet-50 (ratios, memory)",
        description="Time one SA layer per implementation (reference = the authors' formulation, "
                    "torch = per-channel form in PyTorch ops, fused = our kernels) next to x.clone(), "
                    "and SA-ResNet-50 (fused and reference SA) next to timm's resnet50: inference, "
                    "SGD training step, bytes saved for backward, peak bytes of live op outputs in the step. Variants run "
                    "interleaved in one process; ratios are per-round paired medians (see docs/benchmarks.md).")
    p.add_argument("--shapes", nargs="*", default=DEFAULT_SHAPES, metavar="NxCxHxW",
                   help=f"layer input shapes (default: {' '.join(DEFAULT_SHAPES)}); 3-D/5-D shapes work too")
    p.add_argument("--impls", nargs="+", default=["reference", "torch", "fused"], choices=SA_IMPLS,
                   help="layer implementations to time (default: reference torch fused)")
    p.add_argument("--rounds", type=_at_least_one, default=30, help="timing rounds per layer shape (default 30)")
    p.add_argument("--model", default="sa_resnet50",
                   help="SA model for the model table, an sa_* model (default sa_resnet50)")
    p.add_argument("--baseline", default="resnet50", help="plain model to compare with (default resnet50)")
    p.add_argument("--batch-size", type=_at_least_one, default=8, help="model batch size (default 8)")
    p.add_argument("--img-size", type=_at_least_one, default=224, help="model input size (default 224)")
    p.add_argument("--model-rounds", type=_at_least_one, default=7, help="timing rounds for models (default 7)")
    p.add_argument("--skip-layers", action="store_true", help="only the model table")
    p.add_argument("--skip-models", action="store_true", help="only the layer table")
    p.add_argument("--threads", type=_at_least_one, default=None, help="torch threads (default: torch's default)")
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
    if dims[1] % 2:
        raise ValueError(f"bad shape {text!r}: SA splits the channels into 2 x G groups, so the channel "
                         f"count (the 2nd dim, {dims[1]}) must be even")
    return dims


def layer_ratios(res: Dict) -> Dict[str, Dict[str, object]]:
    """Per impl: speed-up over the authors' formulation (forward, forward+backward; None
    without a reference row) and forward time over ``x.clone()``'s, as per-round paired
    medians. The text table prints these; the JSON keeps them as ``ratios``."""
    from sanet.analysis.bench import paired_ratio

    t = res["times"]
    has_ref = "reference/fwd" in t
    return {impl: {"fwd_x_ref": paired_ratio(t, "reference/fwd", f"{impl}/fwd") if has_ref else None,
                   "fwd_bwd_x_ref": paired_ratio(t, "reference/fwd+bwd", f"{impl}/fwd+bwd") if has_ref else None,
                   "fwd_over_clone": paired_ratio(t, f"{impl}/fwd", "clone")}
            for impl in res["memory"]}


def _x(r) -> str:
    return "-" if r is None else f"{r:.2f}x"


def _layer_text(res: Dict) -> List[str]:
    t, mem, ratios = res["times"], res["memory"], res["ratios"]
    lines = [f"SA layer {'x'.join(map(str, res['shape']))}, G={res['groups']}, {res['dtype']} "
             f"(x.clone(): {t['clone']['median_ms']:.3f} ms; ratios are per-round paired medians)",
             f"  {'impl':<11}{'fwd ms':>9}{'fwd+bwd ms':>12}{'fwd x ref':>11}{'f+b x ref':>11}"
             f"{'fwd/clone':>11}{'saved MiB':>11}{'peak MiB':>10}"]
    for impl in mem:
        f, fb = t[f"{impl}/fwd"]["median_ms"], t[f"{impl}/fwd+bwd"]["median_ms"]
        r = ratios[impl]
        lines.append(f"  {impl:<11}{f:>9.3f}{fb:>12.3f}{_x(r['fwd_x_ref']):>11}{_x(r['fwd_bwd_x_ref']):>11}"
                     f"{_x(r['fwd_over_clone']):>11}"
                     f"{mem[impl]['saved_bytes'] / MIB:>11.1f}{mem[impl]['peak_fwd_bwd_bytes'] / MIB:>10.1f}")
    return lines


def _model_text(res: Dict, baseline: str) -> List[str]:
    t, mem, ratios = res["times"], res["memory"], res["ratios"]
    amp = f", autocast {res['amp'].replace('torch.', '')}" if res["amp"] else ""
    lines = [f"Models, batch {res['batch_size']} at {res['img_size']}px{amp} (ratios vs {baseline}; "
             "time ratios are per-round paired medians; saved = all bytes autograd keeps, "
             "weights included; act = without the model's parameters and buffers)",
             f"  {'model':<26}{'infer ms':>10}{'ratio':>7}{'train ms':>10}{'ratio':>7}"
             f"{'saved MiB':>11}{'ratio':>7}{'act MiB':>9}{'ratio':>7}{'peak MiB':>10}{'ratio':>7}"]
    for label, m in mem.items():
        inf, tr = t[f"{label}/inference"]["median_ms"], t[f"{label}/train_step"]["median_ms"]
        r = ratios[label]
        lines.append(f"  {label:<26}{inf:>10.1f}{r['inference']:>7.3f}{tr:>10.1f}{r['train_step']:>7.3f}"
                     f"{m['saved_bytes'] / MIB:>11.1f}{r['saved']:>7.3f}"
                     f"{m['saved_activation_bytes'] / MIB:>9.1f}{r['saved_activations']:>7.3f}"
                     f"{m['peak_train_step_bytes'] / MIB:>10.1f}{r['peak']:>7.3f}")
    for label, why in res.get("dropped", {}).items():
        lines.append(f"  ({label}: not run: {why})")
    return lines


def _check_models(args: argparse.Namespace) -> None:
    """--model must be an SA model (its rows are the fused and the reference SA), --baseline
    any timm model other than it."""
    from sanet.models import SA_MODELS

    check_model_name(args.baseline)
    check_model_name(args.model)
    if args.model.split(".")[0] not in SA_MODELS:  # a pretrained tag (.authors_in1k) is fine
        raise ValueError(f"--model {args.model!r} is not an SA model (the table runs it with the fused "
                         f"and the reference SA); SA models: {', '.join(SA_MODELS)}. "
                         "Any timm model works as --baseline.")
    from timm.models import get_arch_name, get_pretrained_cfg

    if get_arch_name(args.model) == get_arch_name(args.baseline):
        raise ValueError(f"--model {args.model!r} and --baseline {args.baseline!r} are the same architecture; "
                         "compare two different models")
    check_trainable_batch(args.batch_size, args.img_size)
    cfg = get_pretrained_cfg(args.baseline)
    size = getattr(cfg, "input_size", None)
    if getattr(cfg, "fixed_input_size", False) and size and tuple(size[1:]) != (args.img_size, args.img_size):
        raise ValueError(f"--baseline {args.baseline} takes only {size[1]}x{size[2]} input; pass "
                         f"--img-size {size[1]} or choose another baseline")


def check_trainable_batch(batch_size: int, img_size: int) -> None:
    """A ResNet training step at this batch and image size has two values per channel in its
    last stage's BatchNorm (stride 32), which training mode needs."""
    last = -(-img_size // 32)  # the last stage's feature map side
    if batch_size * last * last < 2:
        raise ValueError(f"--batch-size {batch_size} at --img-size {img_size} leaves one value per "
                         "channel in the last stage's BatchNorm (1x1 maps), which can't train; use "
                         "--batch-size 2 or more, or --img-size 33 or more")


def check_output_path(path: Path) -> None:
    """--output is written at the end: a path that can't take it is refused before the timing."""
    if path.is_dir():
        raise ValueError(f"--output {path} is a folder; give a .json file path")
    existing = next(p for p in (path.parent, *path.parent.absolute().parents) if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"--output {path}: {existing} is not a writable folder; choose another path")


def _json_args(args: argparse.Namespace) -> Dict[str, object]:
    return {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if not k.startswith("_")}


def run(args: argparse.Namespace) -> int:
    import torch
    from tqdm import tqdm

    from sanet.analysis.bench import layer_bench, machine_info, model_bench, model_ratios, run_info
    from sanet.checkpoint import write_json_atomic
    from sanet.ops import fused_sa_supported

    if args.device == "cuda" and not torch.cuda.is_available():
        raise SanetError("--device cuda: no CUDA device is available (use --device cpu)")
    if args.skip_layers and args.skip_models:
        raise ValueError("--skip-layers and --skip-models together leave nothing to time; pass at most one")
    if not args.skip_layers and not args.shapes:
        raise ValueError("--shapes needs at least one NxCxHxW shape (or pass --skip-layers)")
    if not args.skip_models:
        _check_models(args)
    shapes = [] if args.skip_layers else [_shape(s) for s in args.shapes]
    if args.output:
        check_output_path(args.output)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = getattr(torch, DTYPES[args.dtype])
    # The models take this dtype too (autocast), so SA inside them has a kernel exactly when
    # a layer in this dtype has one.
    fused_ok = fused_sa_supported(torch.empty(1, 2, 1, device=device, dtype=dtype))
    why = f"no fused SA kernel for {device.type} {DTYPES[args.dtype]}"
    if device.type == "cpu" and dtype == torch.float32 and not fused_ok:
        from sanet.ops import cpu_ext_status

        why += f" (the C++ extension is not loaded: {str(cpu_ext_status()['error'])[:200]}; see `sanet ext`)"
    notes: List[str] = []
    impls = list(args.impls)
    if not args.skip_layers and "fused" in impls and not fused_ok:
        impls.remove("fused")
        if not impls:  # only x.clone() would be timed: the layer tables would measure nothing asked for
            raise ValueError(f"--impls fused: {why}; add reference/torch to --impls, or --skip-layers")
        notes.append(f"{why}: layers timed with {', '.join(impls)}")
    dropped: Dict[str, str] = {}
    if not args.skip_models and not fused_ok:
        # impl="auto" would run the authors' formulation there: a second [reference] row
        # under the fused default's name.
        dropped[args.model] = (f"{why}; with sa_impl='auto' it would run the authors' formulation, "
                               f"as the {args.model}[reference] row does")
        notes.append(f"{why}: model table without the fused {args.model} row")
    for note in notes:
        print(f"sanet bench: {note}", file=sys.stderr)
    result: Dict = {"args": _json_args(args), "run": run_info(), "machine": machine_info(device),
                    "fused_kernel_available": fused_ok, "notes": notes, "layers": [], "models": None}
    quiet = True if args.json else None  # None: tqdm draws only on a terminal (not into logs)
    if not args.skip_layers:
        for shape in shapes:
            bar = tqdm(total=args.rounds, desc=f"layer {'x'.join(map(str, shape))}", disable=quiet, leave=False)
            res = layer_bench(shape, impls, rounds=args.rounds, device=device,
                              progress=lambda _: bar.update(), dtype=dtype)
            bar.close()
            res["ratios"] = layer_ratios(res)
            result["layers"].append(res)
    if not args.skip_models:
        specs = {args.baseline: {"model": args.baseline}}
        if args.model not in dropped:
            specs[args.model] = {"model": args.model}
        specs[f"{args.model}[reference]"] = {"model": args.model, "sa_impl": "reference"}
        bar = tqdm(total=args.model_rounds, desc="models", disable=quiet, leave=False)
        res = model_bench(specs, batch_size=args.batch_size, img_size=args.img_size, rounds=args.model_rounds,
                          device=device, progress=lambda _: bar.update(),
                          amp=None if dtype == torch.float32 else dtype)
        bar.close()
        res["baseline"] = args.baseline
        res["dropped"] = dropped
        res["ratios"] = model_ratios(res, args.baseline)
        result["models"] = res
    if args.output:
        write_json_atomic(result, args.output)
    if args.json:
        print_json(result)
        return 0
    m, r = result["machine"], result["run"]
    commit = f", commit {r['git_commit']}{'+changes' if r['git_dirty'] else ''}" if r["git_commit"] else ""
    print(f"{m['cpu_model'] or m['processor']}, {m['cpu_count']} CPUs, {m['threads']} torch threads, "
          f"{m['cpu_capability']}, torch {m['torch']}, device {m['device']}"
          + (f" ({m['gpu']})" if "gpu" in m else "") + f", {args.dtype}; sanet {r['sanet']}{commit}")
    for res in result["layers"]:
        print("\n".join(_layer_text(res)))
    if result["models"]:
        print("\n".join(_model_text(result["models"], args.baseline)))
    return 0

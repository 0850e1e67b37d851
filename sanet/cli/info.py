"""``sanet info MODEL``: parameters, FLOPs, input size and feature maps of one model."""
from __future__ import annotations

import argparse

from .common import add_json_flag, check_model_name, print_json


def add_parser(sub, name: str) -> argparse.ArgumentParser:
    p = sub.add_parser(name, help="parameters, FLOPs and features of one model",
                       description="Print a model's parameter count (total and SA), MACs/FLOPs at its "
                                   "default input size (counter named in the output), input settings, "
                                   "feature channels/strides and where its weights come from.")
    p.add_argument("model", help="model name, e.g. sa_resnet50 (see `sanet models`)")
    p.add_argument("--num-classes", type=int, default=None,
                   help="classifier size (default: the model's own, 1000 for the SA family)")
    add_json_flag(p)
    return p


def run(args: argparse.Namespace) -> int:
    from sanet.analysis import model_summary
    from sanet.models import SA_MODELS, weights_help

    check_model_name(args.model)
    if args.num_classes is not None and args.num_classes < 0:
        raise ValueError(f"--num-classes must be 0 (no classifier) or more, got {args.num_classes}")
    kwargs = {} if args.num_classes is None else {"num_classes": args.num_classes}
    info = model_summary(args.model, **kwargs)
    base = args.model.split(".")[0]  # without a pretrained tag
    if base in SA_MODELS:
        info["weights"] = weights_help(base)
    if args.json:
        print_json(info)
        return 0
    print(f"{info['model']}")
    print(f"  parameters:      {info['params']:,} (SA: {info['sa_params']:,})")
    print(f"  MACs / FLOPs:    {info['macs'] / 1e9:.3f} G / {info['flops'] / 1e9:.3f} G at "
          f"{'x'.join(map(str, info['input_size']))}")
    print(f"                   counter: {info['flop_counter']}")
    if info.get("sa_params"):  # (a timm model without SA has no SA element-wise work)
        print(f"  SA element-wise: ~{info['sa_elementwise_flops_estimate'] / 1e6:.1f} MFLOPs (estimate, not in "
              "the count above)")
    print(f"  input:           {'x'.join(map(str, info['input_size']))}, {info['interpolation']}, "
          f"crop_pct {info['crop_pct']}, mean {info['mean']}, std {info['std']}")
    feats = ", ".join(f"{m}: {c}ch /{s}" for m, c, s in zip(
        info["feature_modules"], info["feature_channels"], info["feature_strides"]))
    print(f"  features:        {feats}")
    if "weights" in info:
        print(f"  weights:         {info['weights']}")
    return 0

"""``sanet predict --model M (--checkpoint C | --pretrained-file F) IMAGE...``: top-k classes."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any, Dict, List

from .common import add_json_flag, check_model_name, print_json


def add_parser(sub, name: str) -> argparse.ArgumentParser:
    from .evaluate import add_model_source

    p = sub.add_parser(
        name, help="top-k classes of images",
        description="Classify images: the top-k classes with softmax probabilities. Labels are the "
                    "checkpoint's class names, ImageNet's class names for 1000-class weights, "
                    "else 'class <index>'.",
        epilog="example: sanet predict --checkpoint runs/digits/best.pt img1.png img2.png --json")
    add_model_source(p)
    p.add_argument("images", nargs="+", type=Path, metavar="IMAGE", help="image files")
    p.add_argument("--topk", "--top-k", "-k", dest="topk", type=int, default=5, help="classes to show per image (5)")
    p.add_argument("--batch-size", "-b", type=int, default=32,
                   help="images read and classified at a time (32): memory stays that of one batch")
    p.add_argument("--skip-bad-images", action="store_true",
                   help="report image files that can't be decoded (an \"error\" entry in --json) and go on "
                        "with the others, instead of stopping at the first (a missing path or a folder is "
                        "still an error, before the model loads)")
    add_json_flag(p)
    return p


def run(args: argparse.Namespace) -> int:
    import torch

    from sanet.engine.data import UnreadableImageError
    from sanet.engine.distributed import resolve_device
    from sanet.engine.modeling import load_for_inference
    from sanet.engine.predict import (check_image_paths, eval_transform, read_images, read_readable_images,
                                      topk_predictions)

    from .evaluate import note_unused_ema

    if os.environ.get("WORLD_SIZE", "1").strip() not in ("", "1"):  # each process would print it all
        raise ValueError("sanet predict runs in one process: start it without torchrun (sanet eval shards a "
                         "folder of class folders over processes)")
    if args.model:
        check_model_name(args.model)
    if args.topk < 1:
        raise ValueError(f"--topk must be at least 1, got {args.topk}")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {args.batch_size}")
    check_image_paths(args.images)  # before loading the model
    loaded = load_for_inference(args.model, checkpoint=args.checkpoint, pretrained_file=args.pretrained_file,
                                use_ema=args.ema)
    note_unused_ema(loaded, "sanet predict", args.checkpoint or args.pretrained_file)
    num_classes = getattr(loaded.model, "num_classes", None)
    if isinstance(num_classes, int) and args.topk > num_classes:  # said, so fewer lines are no surprise
        print(f"sanet predict: --topk {args.topk} is more than the model's {num_classes} classes; showing all "
              f"{num_classes}", file=sys.stderr)
    transform = eval_transform(loaded.model, loaded.data_args, args.img_size, args.crop_pct)
    device = resolve_device(args.device)
    model = loaded.model.to(device)
    entries: List[Dict[str, Any]] = []  # per image, in the order given: its top-k or why not
    for start in range(0, len(args.images), args.batch_size):
        paths = args.images[start:start + args.batch_size]
        if args.skip_bad_images:
            batch, errors = read_readable_images(paths, transform)
        else:  # the first unreadable file is an error naming it
            batch, errors = read_images(paths, transform), [None] * len(paths)
        tops = iter([])
        if batch is not None:
            with torch.inference_mode():
                tops = iter(topk_predictions(model, batch.to(device), args.topk, loaded.class_names))
        entries += [{"image": str(path), "error": error} if error else {"image": str(path), "top": next(tops)}
                    for path, error in zip(paths, errors)]
    skipped = sum("error" in e for e in entries)
    if skipped == len(entries):
        raise UnreadableImageError(f"none of the {skipped} images could be read, e.g. {entries[0]['error']}")
    if skipped:
        print(f"sanet predict: skipped {skipped} unreadable image(s) of {len(entries)}", file=sys.stderr)
    if args.json:
        print_json({"model": loaded.name, "weights": str(args.checkpoint or args.pretrained_file), "ema": loaded.ema,
                    "skipped": skipped, "predictions": entries})
        return 0
    for entry in entries:
        print(entry["image"])
        if "error" in entry:
            print(f"  skipped: {entry['error']}")
            continue
        for top in entry["top"]:
            print(f"  {100 * top['prob']:6.2f}%  {top['label']}")
    return 0

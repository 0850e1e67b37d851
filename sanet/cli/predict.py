"""``sanet predict --model M (--checkpoint C | --pretrained-file F) IMAGE...``: top-k classes."""
from __future__ import annotations

import argparse
import os
from pathlib import Path

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
    add_json_flag(p)
    return p


def run(args: argparse.Namespace) -> int:
    import torch

    from sanet.engine.distributed import resolve_device
    from sanet.engine.modeling import load_for_inference
    from sanet.engine.predict import check_image_paths, eval_transform, read_images, topk_predictions

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
    transform = eval_transform(loaded.model, loaded.data_args, args.img_size, args.crop_pct)
    device = resolve_device(args.device)
    model, results = loaded.model.to(device), []
    for start in range(0, len(args.images), args.batch_size):
        batch = read_images(args.images[start:start + args.batch_size], transform)
        with torch.inference_mode():
            results += topk_predictions(model, batch.to(device), args.topk, loaded.class_names)
    if args.json:
        print_json({"model": loaded.name, "weights": str(args.checkpoint or args.pretrained_file), "ema": loaded.ema,
                    "predictions": [{"image": str(path), "top": top} for path, top in zip(args.images, results)]})
        return 0
    for path, top in zip(args.images, results):
        print(path)
        for entry in top:
            print(f"  {100 * entry['prob']:6.2f}%  {entry['label']}")
    return 0

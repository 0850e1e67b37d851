"""``sanet eval --model M (--checkpoint C | --pretrained-file F) --data DIR``: top-1/top-5."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..engine.config import AMP_CHOICES
from .common import add_json_flag, check_model_name, print_json


def add_model_source(p: argparse.ArgumentParser) -> None:
    """--model / --checkpoint / --pretrained-file / --ema (shared with ``sanet predict``)."""
    p.add_argument("--model", default=None,
                   help="architecture, e.g. sa_resnet50 (default with --checkpoint: the one it was trained as)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", type=Path, help="a `sanet train` checkpoint (last.pt / best.pt)")
    src.add_argument("--pretrained-file", type=Path,
                     help="any weights file: the authors' .pth.tar, a .safetensors from `sanet convert` "
                          "(it names its model), ...; a `sanet train` checkpoint is read as with --checkpoint. "
                          "The SA group count is read off the weights")
    p.add_argument("--ema", action="store_true",
                   help="use the file's EMA weights (sanet train --model-ema runs, whose best.pt is chosen by "
                        "the EMA's top-1; timm train.py's 'state_dict_ema') instead of the model's")
    p.add_argument("--img-size", type=int, default=None, help="crop size (default: training's, else the model's)")
    p.add_argument("--crop-pct", type=float, default=None,
                   help="center-crop fraction (default: training's, else the model's, e.g. 0.875)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="device (auto)")


def note_unused_ema(loaded, command: str, path: Path) -> None:
    """Say on stderr that the file also holds EMA weights, which --ema would use."""
    if loaded.unused_ema:
        print(f"{command}: note: {path} also holds EMA weights ('{loaded.unused_ema}'); these are the model's "
              "weights; --ema uses the EMA's", file=sys.stderr)


def add_parser(sub, name: str) -> argparse.ArgumentParser:
    from sanet.engine.config import default_workers

    p = sub.add_parser(
        name, help="top-1/top-5 accuracy and loss on an ImageFolder",
        description="Evaluate a model on one ImageFolder (DIR/<class>/<image>, e.g. ImageNet's val/): "
                    "top-1 and top-5 accuracy (percent), mean cross-entropy loss, image count and "
                    "throughput. Class folders are matched to the model's classes by name (the "
                    "checkpoint's class names, or ImageNet WordNet ids for 1000-class weights). "
                    "Files are read with weights_only=True. Works under torchrun (sharded).",
        epilog="example: sanet eval --model sa_resnet50 --pretrained-file sa_resnet50.pth.tar "
               "--data /imagenet/val --json")
    add_model_source(p)
    p.add_argument("--data", required=True, type=Path, help="ImageFolder to evaluate (DIR/<class>/<image>)")
    p.add_argument("--batch-size", "-b", type=int, default=64, help="images per batch (64)")
    p.add_argument("--workers", "-j", type=int, default=default_workers(),
                   help="data loading processes (default: 4, or the CPU count if lower)")
    p.add_argument("--amp", choices=AMP_CHOICES, default="none", help="mixed precision (none)")
    p.add_argument("--channels-last", action="store_true", help="channels_last memory format")
    p.add_argument("--skip-bad-images", action="store_true", help="skip and count unreadable images")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bar (drawn only when stderr is a terminal anyway)")
    add_json_flag(p)
    return p


def run(args: argparse.Namespace) -> int:
    import torch

    from sanet.engine.data import build_eval_loader, open_image_folder
    from sanet.engine.distributed import check_same_images, cleanup_distributed, init_distributed
    from sanet.engine.evaluate import evaluate, slow_amp_note
    from sanet.engine.modeling import load_for_inference
    from sanet.engine.predict import eval_transform, target_map_for

    if args.model:
        check_model_name(args.model)
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.workers < 0:
        raise ValueError(f"--workers must be 0 or more, got {args.workers}")
    loaded = load_for_inference(args.model, checkpoint=args.checkpoint, pretrained_file=args.pretrained_file,
                                use_ema=args.ema)
    dataset = open_image_folder(args.data, "evaluation", skip_bad=args.skip_bad_images,
                                transform=eval_transform(loaded.model, loaded.data_args, args.img_size, args.crop_pct))
    if {"train", "val"} <= set(dataset.classes):
        raise ValueError(f"{args.data} holds train/ and val/, a `sanet train --data` folder; evaluate "
                         f"one split of it, e.g. --data {args.data / 'val'}")
    target_map = target_map_for(dataset.classes, loaded.class_names, loaded.model.num_classes)
    ctx = init_distributed(args.device)
    try:
        note = slow_amp_note(ctx.device, args.amp)
        if note and ctx.is_main:
            print(f"warning: {note}", file=sys.stderr, flush=True)
        check_same_images(ctx, {"evaluation": dataset})
        model = loaded.model.to(ctx.device)
        if args.channels_last:
            model = model.to(memory_format=torch.channels_last)
        loader = build_eval_loader(dataset, args.batch_size, workers=args.workers, ctx=ctx)
        metrics = evaluate(model, loader, ctx, amp=args.amp, channels_last=args.channels_last,
                           target_map=target_map, progress=not (args.no_progress or args.json))
    finally:
        cleanup_distributed()
    if not ctx.is_main:
        return 0
    if metrics["images"] == 0:  # every image was unreadable and skipped: there is no score
        raise ValueError(f"no image of {args.data} could be read ({metrics['skipped']} skipped as "
                         "unreadable): nothing was evaluated")
    if metrics["nonfinite"]:  # NaN outputs still rank somewhere: the accuracy would be made up
        raise ValueError(f"the model's outputs hold NaN or inf for {metrics['nonfinite']} of {metrics['images']} "
                         f"images, so no score is reported: the weights "
                         f"({args.checkpoint or args.pretrained_file}) hold NaN/inf or overflow"
                         + {"fp16": " under --amp fp16 (try --amp bf16 or none)",
                            "bf16": " under --amp bf16 (try --amp none)"}.get(args.amp, ""))
    result = {"top1": round(metrics["top1"], 4), "top5": round(metrics["top5"], 4),
              "loss": round(metrics["loss"], 6), "images": metrics["images"],
              "skipped": metrics["skipped"], "images_per_s": round(metrics["images_per_s"], 1),
              "model": loaded.name, "weights": str(args.checkpoint or args.pretrained_file),
              "ema": loaded.ema, "data": str(args.data)}
    note_unused_ema(loaded, "sanet eval", args.checkpoint or args.pretrained_file)
    if args.json:
        print_json(result)
    else:
        skipped = f" ({result['skipped']} unreadable skipped)" if result["skipped"] else ""
        which = " (EMA weights)" if loaded.ema else ""
        print(f"{loaded.name}{which} on {args.data}: top-1 {result['top1']:.2f}%  top-5 {result['top5']:.2f}%  "
              f"loss {result['loss']:.4f}  {result['images']} images{skipped}  "
              f"{result['images_per_s']:.0f} img/s")
    return 0

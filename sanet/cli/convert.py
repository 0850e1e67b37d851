"""``sanet convert IN OUT.safetensors --model M``: authors' checkpoint -> our format."""
from __future__ import annotations

import argparse
from pathlib import Path

from .common import add_json_flag, check_model_name, print_json


def add_parser(sub, name: str) -> argparse.ArgumentParser:
    p = sub.add_parser(
        name, help="convert a checkpoint to safetensors (+ model card)",
        description="Read a checkpoint in the authors' layout (sa_resnet50.pth.tar: 'state_dict' with "
                    "'module.' keys) or ours, check it strictly against the model (its classifier "
                    "size, input channels and SA group count read off the weights), and write "
                    "OUT.safetensors plus OUT.json (model, source file, sha256, parameter count). "
                    "The input is read with torch.load(weights_only=True): no pickled code runs.")
    p.add_argument("input", type=Path, help="checkpoint file (.pth/.pth.tar/.pt/.safetensors)")
    p.add_argument("output", type=Path, help="output .safetensors file")
    p.add_argument("--model", required=True, help="architecture, e.g. sa_resnet50")
    p.add_argument("--num-classes", type=int, default=None,
                   help="classifier size of the checkpoint (default: read from its fc layer)")
    add_json_flag(p)
    return p


def run(args: argparse.Namespace) -> int:
    import timm

    from sanet.checkpoint import load_state_dict_file, model_card, save_safetensors, write_json_atomic
    from sanet.models import check_state_dict
    from sanet.models.checkpoint_filter import cfg_from_weights, with_sa_groups_of

    check_model_name(args.model)
    if args.output.suffix != ".safetensors":
        raise ValueError(f"output must end in .safetensors, got {args.output}")
    state_dict = load_state_dict_file(args.input)
    # The model the file holds: its classifier size and input channels (e.g. a 1-channel stem)
    found = cfg_from_weights(state_dict)
    kwargs = {"num_classes": args.num_classes if args.num_classes is not None else found.get("num_classes")}
    if "input_size" in found:
        kwargs["in_chans"] = found["input_size"][0]
    kwargs = with_sa_groups_of(state_dict, args.model, {k: v for k, v in kwargs.items() if v is not None})
    model = timm.create_model(args.model, device="meta", **kwargs)
    check_state_dict(state_dict, model, source=str(args.input))
    in_chans = found["input_size"][0] if "input_size" in found else 3
    metadata = {"model": args.model, "num_classes": str(model.num_classes), "in_chans": str(in_chans),
                "source": args.input.name}
    if "sa_groups" in kwargs:  # a non-default G: the file needs it to be rebuilt
        metadata["sa_groups"] = str(kwargs["sa_groups"])
    save_safetensors(state_dict, args.output, metadata=metadata)
    card = model_card(args.model, args.input, args.output, sum(p.numel() for p in model.parameters()))
    card["num_classes"] = model.num_classes
    card["in_chans"] = in_chans
    if "sa_groups" in kwargs:
        card["sa_groups"] = kwargs["sa_groups"]
    card_path = args.output.with_suffix(".json")
    write_json_atomic(card, card_path)
    if args.json:
        print_json(dict(card, card_file=str(card_path)))
    else:
        print(f"wrote {args.output} ({card['num_params']:,} parameters) and {card_path}")
    return 0

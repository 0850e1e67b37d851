"""``sanet convert IN OUT.safetensors --model M``: authors' checkpoint -> our format."""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any, Dict

from .common import add_json_flag, check_model_name, print_json


def add_parser(sub, name: str) -> argparse.ArgumentParser:
    p = sub.add_parser(
        name, help="convert a checkpoint to safetensors (+ model card)",
        description="Read a checkpoint in the authors' layout (sa_resnet50.pth.tar: 'state_dict' with "
                    "'module.' keys) or ours, check it strictly against the model (its classifier "
                    "size, input channels and SA group count read off the weights), and write "
                    "OUT.safetensors plus OUT.json (model, source file, sha256, parameter count). A sanet "
                    "train checkpoint keeps its class names, image size, crop and model kwargs in "
                    "the safetensors metadata, for sanet eval/predict (a file sanet convert wrote converts "
                    "again with them). "
                    "The input is read with torch.load(weights_only=True): no pickled code runs.")
    p.add_argument("input", type=Path, help="checkpoint file (.pth/.pth.tar/.pt/.safetensors)")
    p.add_argument("output", type=Path, help="output .safetensors file (its folder is created if missing); the "
                                             "model card OUT.json is written beside it")
    p.add_argument("--model", required=True, help="architecture, e.g. sa_resnet50")
    p.add_argument("--num-classes", type=int, default=None,
                   help="classifier size of the checkpoint (default: read from its fc layer)")
    p.add_argument("--ema", action="store_true",
                   help="convert the checkpoint's EMA weights instead of its model weights: a sanet train "
                        "checkpoint's (--model-ema runs; their best.pt is chosen by the EMA's top-1) or a "
                        "timm train.py checkpoint's ('state_dict_ema')")
    add_json_flag(p)
    return p


def _run_metadata(checkpoint: Any) -> Dict[str, Any]:
    """The run's class names, data settings and model kwargs (``RUN_METADATA``), if
    ``checkpoint`` is a ``sanet train`` checkpoint (empty otherwise)."""
    if not (isinstance(checkpoint, dict) and isinstance(checkpoint.get("model"), dict)
            and "class_names" in checkpoint):
        return {}
    args = checkpoint.get("args") if isinstance(checkpoint.get("args"), dict) else {}
    found = {"class_names": [str(c) for c in checkpoint["class_names"]],
             **{k: args.get(k) for k in ("img_size", "crop_pct", "interpolation")},
             "model_kwargs": dict(args.get("model_kwargs") or {})}
    return {k: v for k, v in found.items() if v not in (None, {})}


def _converted_metadata(path: Path) -> Dict[str, Any]:
    """What an earlier ``sanet convert`` recorded in a safetensors input: the run's
    ``RUN_METADATA`` (decoded) and which weights it holds, carried into the new file."""
    from sanet.checkpoint import converted_run_metadata, safetensors_metadata

    meta = safetensors_metadata(path)
    found = converted_run_metadata(path)
    if meta.get("weights") in ("model", "ema"):
        found["weights"] = meta["weights"]
    if meta.get("model"):
        found["model"] = meta["model"]
    return found


def run(args: argparse.Namespace) -> int:
    import timm

    import sanet
    from sanet.checkpoint import RUN_METADATA, SANET_MARK, load_checkpoint_file, model_card, save_safetensors, \
        state_dict_from, write_json_atomic
    from sanet.engine.modeling import check_checkpoint_model
    from sanet.models import check_state_dict, strip_prefix
    from sanet.models.checkpoint_filter import cfg_from_weights, ema_key_of, with_sa_groups_of

    check_model_name(args.model)
    if args.output.suffix != ".safetensors":  # (".safetensors" alone is a name without a suffix)
        raise ValueError(f"output must be a file name ending in .safetensors (e.g. {args.model}.safetensors), "
                         f"got {args.output}")
    if args.num_classes is not None and args.num_classes < 0:
        raise ValueError(f"--num-classes must be 0 (no classifier) or more, got {args.num_classes}")
    card_path = args.output.with_suffix(".json")
    for written in (args.output, card_path):
        # Both checked before anything is written: a card that can't be written after the
        # weights were would leave half a conversion behind.
        if written.is_dir():
            raise ValueError(f"cannot write {written}{' (the model card)' if written == card_path else ''}: "
                             "it is a folder")
        if written.is_file() and args.input.is_file() and os.path.samefile(written, args.input):
            raise ValueError(f"{written} (written by convert{', the model card' if written == card_path else ''}) "
                             "is the input file: converting would replace the source; write to another file")
    checkpoint = load_checkpoint_file(args.input)
    run_info = _run_metadata(checkpoint)
    is_run = bool(run_info)
    earlier = _converted_metadata(args.input)  # a file sanet convert wrote: its records carry over
    recorded = earlier.pop("model", None)
    arch = checkpoint.get("arch") if isinstance(checkpoint, dict) and not run_info else None  # the authors' layout
    if not recorded and isinstance(arch, str) and timm.is_model(arch):
        recorded = arch
    if recorded and timm.models.get_arch_name(recorded) != timm.models.get_arch_name(args.model):
        raise ValueError(f"--model {args.model}: {args.input} says it holds {recorded} weights; "
                         f"pass --model {recorded}")
    ema_key = ema_key_of(checkpoint)
    if args.ema and ema_key is None:
        already = " (it was converted with --ema: it holds the EMA's weights already)" \
            if earlier.get("weights") == "ema" else ""
        raise ValueError(f"--ema: {args.input} holds no EMA weights (sanet train checkpoints of --model-ema "
                         f"runs keep them under 'model_ema', timm's train.py under 'state_dict_ema'){already}")
    if not run_info:
        run_info = {k: v for k, v in earlier.items() if k != "weights"}
    state_dict = strip_prefix(checkpoint[ema_key]) if args.ema else state_dict_from(checkpoint, args.input)
    if ema_key is not None and not args.ema:
        why = "its run's best.pt is chosen by their top-1" if is_run else \
            "timm's load_checkpoint would pick them by default"
        print(f"sanet convert: note: {args.input} also holds EMA weights ('{ema_key}': {why}); converted the "
              "model's weights; --ema converts the EMA's", file=sys.stderr)
    if is_run:  # a sanet train checkpoint names its architecture
        check_checkpoint_model(checkpoint, args.model, str(args.input))
    # The model the file holds: its classifier size and input channels (e.g. a 1-channel stem),
    # built with the run's model kwargs if it is a run's
    pretrained_cfg = timm.models.get_pretrained_cfg(args.model)  # the model's own layer names
    classifier, first_conv = (getattr(pretrained_cfg, k, None) for k in ("classifier", "first_conv"))
    found = cfg_from_weights(state_dict, classifier if isinstance(classifier, str) else None,
                             first_conv if isinstance(first_conv, str) else None)
    kwargs = dict(run_info.get("model_kwargs", {}))
    kwargs["num_classes"] = args.num_classes if args.num_classes is not None else found.get("num_classes")
    if "input_size" in found:
        kwargs["in_chans"] = found["input_size"][0]
    kwargs = with_sa_groups_of(state_dict, args.model, {k: v for k, v in kwargs.items() if v is not None})
    model = timm.create_model(args.model, device="meta", **kwargs)
    state_dict = check_state_dict(state_dict, model, source=str(args.input))
    in_chans = found["input_size"][0] if "input_size" in found else 3
    metadata = {"model": args.model, "num_classes": str(model.num_classes), "in_chans": str(in_chans),
                "source": args.input.name, SANET_MARK: sanet.__version__}
    if "sa_groups" in kwargs:  # a non-default G: the file needs it to be rebuilt
        metadata["sa_groups"] = str(kwargs["sa_groups"])
    metadata.update({k: json.dumps(run_info[k]) for k in RUN_METADATA if k in run_info})
    if is_run or ema_key is not None or "weights" in earlier:
        metadata["weights"] = "ema" if args.ema else earlier.get("weights", "model")
    save_safetensors(state_dict, args.output, metadata=metadata)
    card = model_card(args.model, args.input, args.output, sum(p.numel() for p in model.parameters()))
    card["num_classes"] = model.num_classes
    card["in_chans"] = in_chans
    if "sa_groups" in kwargs:
        card["sa_groups"] = kwargs["sa_groups"]
    card.update(run_info)
    if "weights" in metadata:
        card["weights"] = metadata["weights"]
    write_json_atomic(card, card_path)
    if args.json:
        print_json(dict(card, card_file=str(card_path)))
    else:
        print(f"wrote {args.output} ({card['num_params']:,} parameters) and {card_path}")
    return 0

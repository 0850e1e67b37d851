"""``sanet train`` arguments: defaults are the authors' ImageNet recipe (SA-NET.md section 3).

The parsed arguments are stored in every checkpoint as plain data (:func:`plain_args`), so a
checkpoint loads with ``weights_only=True`` and tells how it was made.
"""
from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any, Dict

__all__ = ["add_train_args", "plain_args", "to_plain", "validate_train_args", "RUN_CONTROL_KEYS", "AMP_CHOICES",
           "SCHED_CHOICES", "COMPILE_MODES", "default_workers"]

AMP_CHOICES = ("none", "bf16", "fp16")
SCHED_CHOICES = ("step", "cosine")
#: torch.compile's modes (``torch.compile(mode=...)``).
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
#: The resize modes timm's transforms accept for both training and evaluation.
INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "box", "hamming", "lanczos")

#: Arguments that say how to run, not what to train: a resume compares every other saved
#: argument (resolved defaults included) and reports the ones that differ.
RUN_CONTROL_KEYS = frozenset({"command", "compile", "compile_mode", "data", "debug", "device", "epochs", "json",
                              "no_progress", "output", "overwrite", "pretrained_file", "resume", "workers"})


def default_workers() -> int:
    import os

    return min(4, os.cpu_count() or 1)


class ModelKwargs(argparse.Action):
    """``K=V ...`` -> dict, values read as Python literals where they parse (``32`` -> int,
    ``True``, ``(1, 2)``), else kept as strings: timm's ``ParseKwargs`` rule, with a usage
    error instead of a traceback for an item without ``=``."""

    def __call__(self, parser, namespace, values, option_string=None):
        import ast

        kwargs = {}
        for item in values:
            key, sep, value = item.partition("=")
            if not sep or not key:
                parser.error(f"{option_string}: {item!r} is not K=V (e.g. sa_groups=32)")
            if key in kwargs:  # a typo more often than an intent: which one was meant?
                parser.error(f"{option_string}: {key} is given twice; give each keyword once")
            try:
                kwargs[key] = ast.literal_eval(value)
            except (ValueError, SyntaxError):
                kwargs[key] = value
        setattr(namespace, self.dest, kwargs)


def path_arg(text: str) -> Path:
    """A path option's value; an empty one (an unset shell variable, ``--output "$RUN"``)
    would be Path("."), the current folder."""
    if not text.strip():
        raise argparse.ArgumentTypeError("empty path (an unset shell variable?); give a folder")
    return Path(text)


def add_train_args(p: argparse.ArgumentParser) -> None:
    """All ``sanet train`` options, grouped for ``--help``."""
    req = p.add_argument_group("what to train")
    req.add_argument("--model", required=True, help="model name, e.g. sa_resnet50 (see `sanet models`)")
    req.add_argument("--data", required=True, type=path_arg,
                     help="folder with train/ and val/ in ImageFolder layout (DATA/train/<class>/<img>)")
    req.add_argument("--output", required=True, type=path_arg,
                     help="run folder: last.pt, best.pt, log.csv, tb/ (TensorBoard), curves.png")
    req.add_argument("--pretrained-file", type=path_arg, default=None,
                     help="start from these weights (authors' .pth.tar, safetensors, or a sanet "
                          "checkpoint); the classifier is re-initialised if the class count differs")
    req.add_argument("--model-kwargs", nargs="*", default={}, action=ModelKwargs, metavar="K=V",
                     help="extra timm.create_model arguments, e.g. sa_groups=32 norm_layer=groupnorm1")
    req.add_argument("--drop-path", type=float, default=0.0, help="stochastic depth rate (default 0)")

    sched = p.add_argument_group("schedule and optimizer (defaults: the authors' recipe)")
    sched.add_argument("--epochs", type=int, default=90, help="epochs (default 90)")
    sched.add_argument("--batch-size", "-b", type=int, default=256,
                       help="images per process per step (default 256); the global batch is "
                            "batch-size x processes x accum-steps")
    sched.add_argument("--lr", type=float, default=None,
                       help="learning rate (default: --lr-base scaled to the global batch)")
    sched.add_argument("--lr-base", type=float, default=0.1, help="lr per --lr-base-size images (0.1)")
    sched.add_argument("--lr-base-size", type=int, default=256, help="batch size of --lr-base (256)")
    sched.add_argument("--opt", default="momentum",
                       help="timm optimizer name (default 'momentum': torch SGD with classical "
                            "momentum, as the authors; timm's 'sgd' is Nesterov; 'adamw', 'lamb', ...)")
    sched.add_argument("--momentum", type=float, default=0.9, help="SGD momentum (0.9)")
    sched.add_argument("--weight-decay", "--wd", type=float, default=1e-4, help="weight decay (1e-4)")
    sched.add_argument("--no-wd-norm", action="store_true",
                       help="no weight decay on norm layers, biases and SA gate parameters "
                            "(the authors decay all parameters)")
    sched.add_argument("--sched", choices=SCHED_CHOICES, default="step",
                       help="lr schedule: step (x decay-rate every decay-epochs; default) or cosine")
    sched.add_argument("--decay-epochs", type=float, default=30, help="step schedule period (30)")
    sched.add_argument("--decay-rate", type=float, default=0.1, help="step schedule factor (0.1)")
    sched.add_argument("--warmup-epochs", type=float, default=0, help="linear warmup epochs (0)")
    sched.add_argument("--warmup-lr", type=float, default=1e-6, help="lr at the start of warmup (1e-6)")
    sched.add_argument("--min-lr", type=float, default=0.0, help="cosine schedule floor (0)")
    sched.add_argument("--accum-steps", type=int, default=1,
                       help="gradient accumulation: micro-batches per optimizer step (1)")
    sched.add_argument("--clip-grad", type=float, default=None, help="clip the gradient norm to this")
    sched.add_argument("--smoothing", type=float, default=0.0, help="label smoothing (0)")
    sched.add_argument("--mixup", type=float, default=0.0, help="mixup alpha (0: off)")
    sched.add_argument("--cutmix", type=float, default=0.0, help="cutmix alpha (0: off)")
    sched.add_argument("--mixup-prob", type=float, default=1.0, help="probability of mixup/cutmix per batch (1.0)")
    sched.add_argument("--mixup-switch-prob", type=float, default=0.5,
                       help="probability of cutmix instead of mixup when both are on (0.5)")
    sched.add_argument("--model-ema", action="store_true", help="keep an EMA of the weights (timm ModelEmaV3)")
    sched.add_argument("--model-ema-decay", type=float, default=0.9998, help="EMA decay (0.9998)")
    sched.add_argument("--model-ema-warmup", action="store_true",
                       help="timm's use_warmup: decay min(D, 1 - update^(-2/3)) at update 1, 2, ... (0 at the "
                            "first: the EMA starts as a copy of the weights), so 0.99 after 1,000 "
                            "updates and 0.999 after ~32,000; for short runs and fine-tuning, where 0.9998 "
                            "keeps the EMA near the start")

    data = p.add_argument_group("data and augmentation")
    data.add_argument("--img-size", type=int, default=None,
                      help="train/eval crop size (default: the model's input size, 224 for the SA-ResNets, 64 for "
                           "sa_resnet_test)")
    data.add_argument("--crop-pct", type=float, default=None,
                      help="eval center-crop fraction (default: the model's; 0.875 for the SA-ResNets: resize 256, "
                           "crop 224)")
    data.add_argument("--interpolation", choices=INTERPOLATIONS, default=None,
                      help="resize interpolation (default: the model's)")
    data.add_argument("--scale", type=float, nargs=2, default=(0.08, 1.0), metavar=("MIN", "MAX"),
                      help="RandomResizedCrop area range (0.08 1.0)")
    data.add_argument("--ratio", type=float, nargs=2, default=(3 / 4, 4 / 3), metavar=("MIN", "MAX"),
                      help="RandomResizedCrop aspect range (0.75 1.333)")
    data.add_argument("--hflip", type=float, default=0.5, help="horizontal flip probability (0.5)")
    data.add_argument("--color-jitter", type=float, default=0.0, help="color jitter strength (0: off)")
    data.add_argument("--aa", default=None, help="timm AutoAugment/RandAugment policy, e.g. rand-m9-mstd0.5")
    data.add_argument("--reprob", type=float, default=0.0, help="random erasing probability (0)")
    data.add_argument("--workers", "-j", type=int, default=default_workers(),
                      help="data loading processes per rank (default: 4, or the CPU count if lower)")
    data.add_argument("--skip-bad-images", action="store_true",
                      help="skip and count unreadable images instead of stopping with an error")

    run = p.add_argument_group("run")
    run.add_argument("--seed", type=int, default=0, help="random seed (0)")
    run.add_argument("--deterministic", action="store_true",
                     help="deterministic algorithms; on CPU a resumed run then ends with bit-identical weights")
    run.add_argument("--resume", action="store_true",
                     help="continue from OUTPUT/last.pt (repeat the run's options: they come from the command "
                          "line, and any that differ from the saved ones are reported)")
    run.add_argument("--overwrite", action="store_true",
                     help="start afresh even if OUTPUT already holds a run (otherwise an error)")
    run.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="device (auto)")
    run.add_argument("--amp", choices=AMP_CHOICES, default="none", help="mixed precision (none)")
    run.add_argument("--channels-last", action="store_true", help="channels_last memory format")
    run.add_argument("--compile", action="store_true", help="torch.compile the model")
    run.add_argument("--compile-mode", choices=COMPILE_MODES, default=None,
                     help="torch.compile mode (implies --compile; default: torch's default)")
    run.add_argument("--sync-bn", action="store_true",
                     help="SyncBatchNorm across GPUs under torchrun (CUDA only)")
    run.add_argument("--no-progress", action="store_true",
                     help="no progress bars (drawn only when stderr is a terminal anyway)")


def to_plain(value: Any) -> Any:
    """Lists, dicts, str, int, float, bool, None and tensors only: what ``weights_only=True``
    loads. Everything else (Paths, str subclasses such as TorchVersion, ...) becomes str."""
    import torch

    if isinstance(value, torch.Tensor) or value is None or type(value) in (bool, int, float, str):
        return value
    if isinstance(value, (tuple, list)):
        return [to_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): to_plain(v) for k, v in value.items()}
    return str(value)


def plain_args(args: argparse.Namespace) -> Dict[str, Any]:
    """The arguments as plain data (no Paths or tuples): safe under ``weights_only=True``."""
    return {k: to_plain(v) for k, v in vars(args).items() if not k.startswith("_") and not callable(v)}


#: Bounds on image size and crop_pct: timm's eval transform resizes every image to
#: size / crop_pct pixels before the crop, and a crop_pct of 1e-4 asked for 320,000-pixel
#: sides (the machine's memory filled until the process was killed, without a message).
MAX_IMG_SIZE = 4096
MIN_CROP_PCT = 0.25

#: (argument, test, what is valid): checked in order by :func:`validate_train_args`.
_CHECKS = (
    ("epochs", lambda v: v >= 1, "at least 1"),
    ("drop_path", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("batch_size", lambda v: v >= 2, "at least 2 (BatchNorm's batch statistics and mixup need two "
     "images; --accum-steps makes a larger batch from small steps)"),
    ("accum_steps", lambda v: v >= 1, "at least 1"),
    ("workers", lambda v: v >= 0, "0 or more"),
    ("img_size", lambda v: v is None or 8 <= v <= MAX_IMG_SIZE, f"in [8, {MAX_IMG_SIZE}] pixels"),
    ("lr", lambda v: v is None or v > 0, "positive"),
    ("lr_base", lambda v: v > 0, "positive"),
    ("weight_decay", lambda v: v >= 0, "0 or more"),
    ("smoothing", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("hflip", lambda v: 0 <= v <= 1, "a probability in [0, 1]"),
    ("model_ema_decay", lambda v: 0 < v < 1, "in (0, 1)"),
    ("seed", lambda v: 0 <= v < 2**32, "in [0, 2**32)"),
    ("scale", lambda v: 0 < v[0] <= v[1] <= 1, "0 < MIN <= MAX <= 1"),
    ("ratio", lambda v: 0 < v[0] <= v[1], "0 < MIN <= MAX"),
    ("crop_pct", lambda v: v is None or v >= MIN_CROP_PCT,
     f"at least {MIN_CROP_PCT} (eval resizes to img_size / crop_pct before the crop; above 1 pads)"),
    ("lr_base_size", lambda v: v >= 1, "at least 1"),
    ("momentum", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("decay_epochs", lambda v: v > 0, "positive"),
    ("decay_rate", lambda v: 0 < v <= 1, "in (0, 1]"),
    ("warmup_epochs", lambda v: v >= 0, "0 or more"),
    ("warmup_lr", lambda v: v >= 0, "0 or more"),
    ("min_lr", lambda v: v >= 0, "0 or more"),
    ("clip_grad", lambda v: v is None or v > 0, "positive"),
    ("mixup", lambda v: v >= 0, "0 (off) or a positive alpha"),
    ("cutmix", lambda v: v >= 0, "0 (off) or a positive alpha"),
    ("mixup_prob", lambda v: 0 <= v <= 1, "a probability in [0, 1]"),
    ("mixup_switch_prob", lambda v: 0 <= v <= 1, "a probability in [0, 1]"),
    ("reprob", lambda v: 0 <= v <= 1, "a probability in [0, 1]"),
    ("color_jitter", lambda v: v >= 0, "0 (off) or more"),
)


#: create_model kwargs that --model-kwargs may not set: another option owns them, or they
#: would load other weights (a download) or build a model without a classifier.
_OWNED_MODEL_KWARGS = {
    "num_classes": "the class folders of --data set it",
    "drop_path_rate": "use --drop-path",
    "pretrained": "use --pretrained-file FILE (nothing is downloaded)",
    "pretrained_cfg": "use --pretrained-file FILE (pretrained_cfg_overlay={...} sets data settings such as mean/std)",
    "checkpoint_path": "use --pretrained-file FILE",
    "features_only": "sanet train trains a classifier",
}


def validate_train_args(args: argparse.Namespace) -> None:
    """Raise ValueError naming the first invalid option and what is valid."""
    for name, value in vars(args).items():  # inf passes "positive"; nan every comparison's negation
        values = value if isinstance(value, (tuple, list)) else (value,)
        if any(isinstance(v, float) and not math.isfinite(v) for v in values):
            raise ValueError(f"--{name.replace('_', '-')} must be a finite number, got {value}")
    for name, ok, valid in _CHECKS:
        value = getattr(args, name)
        if not ok(value):
            raise ValueError(f"--{name.replace('_', '-')} must be {valid}, got {value}")
    for key in args.model_kwargs or {}:
        if key in _OWNED_MODEL_KWARGS:
            raise ValueError(f"--model-kwargs may not set {key}: {_OWNED_MODEL_KWARGS[key]}")
    from .modeling import overlay_weight_sources

    overlay = (args.model_kwargs or {}).get("pretrained_cfg_overlay")
    if overlay is not None and not isinstance(overlay, dict):
        raise ValueError(f"--model-kwargs pretrained_cfg_overlay must be a dict literal, e.g. "
                         f"\"pretrained_cfg_overlay={{'mean': (0.5, 0.5, 0.5)}}\" (quoted for the shell), "
                         f"got {overlay!r}")
    sources = overlay_weight_sources(args.model_kwargs or {})
    if sources:
        raise ValueError(f"--model-kwargs pretrained_cfg_overlay may set data settings (mean, std, crop_pct, ...), "
                         f"not where weights come from ({', '.join(sources)}): use --pretrained-file FILE")
    if (args.mixup > 0 or args.cutmix > 0) and args.batch_size % 2:
        raise ValueError(f"--mixup/--cutmix pair images within a batch: --batch-size must be even, "
                         f"got {args.batch_size}")
    if args.compile_mode:
        args.compile = True  # the saved args say the run was compiled
    if args.resume and args.overwrite:
        raise ValueError("--resume and --overwrite contradict each other; pass one")
    if args.aa:
        _check_aa_policy(args.aa)
    _check_optimizer(args.opt)


def _check_optimizer(opt: str) -> None:
    """A name timm knows ("lookahead_" + one of them too), and one that builds here: some need
    CUDA or a package (bitsandbytes, apex), which timm says with an AssertionError or
    ImportError from inside training."""
    import torch
    from timm.optim import create_optimizer_v2, list_optimizers

    name = opt.lower()
    base = name[len("lookahead_"):] if name.startswith("lookahead_") else name
    if base not in list_optimizers():
        raise ValueError(f"unknown --opt {opt!r}; timm optimizers: {', '.join(list_optimizers())} (each may "
                         "be prefixed with lookahead_)")
    try:
        create_optimizer_v2([torch.nn.Parameter(torch.zeros(1))], opt=opt, lr=0.1)
    except Exception as exc:
        raise ValueError(f"--opt {opt!r} can't be used here ({type(exc).__name__}: {exc})") from None


def _check_aa_policy(policy: str) -> None:
    """timm parses --aa only when it builds the transform (after the data and model are
    loaded), with an AssertionError or KeyError: build a small one now for a clear message."""
    import re

    from timm.data import create_transform

    # timm skips a section without a number ("rand-mX") and asserts on an unknown key (gone
    # under python -O): the sections of its two parsed grammars, checked here instead
    keys = {"rand": ("mstd", "mmax", "inc", "m", "n", "p"), "augmix": ("mstd", "m", "w", "d", "a", "b")}
    kind, *sections = policy.split("-")
    for section in sections if kind in keys else []:
        if not (kind == "rand" and section.startswith("t")) and \
                not re.fullmatch(rf"({'|'.join(keys[kind])})\d[\d.]*", section):
            raise ValueError(f"--aa {policy!r}: section {section!r} is not one timm's {kind} policy reads (a "
                             f"key of {', '.join(keys[kind])} followed by a number"
                             f"{', or t<transforms>' if kind == 'rand' else ''}); e.g. rand-m9-mstd0.5-inc1")
    try:
        create_transform(32, is_training=True, auto_augment=policy)
    except Exception as exc:
        raise ValueError(f"--aa {policy!r} is not a policy timm knows ({type(exc).__name__}: {exc}); e.g. "
                         "rand-m9-mstd0.5-inc1 (RandAugment), augmix-m5-w4-d2 (AugMix), original or v0 "
                         "(AutoAugment)") from None

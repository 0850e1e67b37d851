"""``fit(args)``: the whole ``sanet train`` run, on one process or under ``torchrun``.

Order of events per epoch: reseed from (seed, epoch, rank) -> train -> evaluate on val ->
rank 0 writes CSV/TensorBoard, ``last.pt``, then ``best.pt`` (if best). A resume loads
``last.pt`` and starts at the next epoch, so with ``--deterministic`` on CPU it ends with the
same weights as a run that was never interrupted (``save_training_checkpoint`` says why the
files go in that order).
"""
from __future__ import annotations

import argparse
import datetime
import math
import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional

import torch

from .config import RUN_CONTROL_KEYS, plain_args, to_plain, validate_train_args
from .data import build_eval_loader, build_train_loader, build_transform, open_train_val, reseed_loader
from .distributed import DistContext, broadcast_buffers, check_same_images, cleanup_distributed, init_distributed
from .evaluate import evaluate, slow_amp_note
from .logs import RunLogger, load_plotting, plot_curves
from .loop import NonFiniteLossError, TrainState, train_one_epoch
from .modeling import create_train_model, to_channels_last
from .optim import build_mixup, build_optimizer, build_scheduler, build_train_loss, check_schedule_lrs, resolve_lr
from .run_dir import check_not_busy, check_output, check_output_outside_data, claim_output
from .state import load_resume_checkpoint, optional_state, restore_best_checkpoint, save_training_checkpoint, \
    seed_epoch, seed_everything

__all__ = ["fit"]


@contextmanager
def deterministic_mode(enabled: bool, device: torch.device) -> Iterator[None]:
    """Deterministic algorithms for the run, restoring the previous global setting after."""
    prev = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
            torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    if enabled:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # required by deterministic cuBLAS
        # CUDA has ops without deterministic kernels (e.g. adaptive pooling backward): warn there
        torch.use_deterministic_algorithms(True, warn_only=device.type == "cuda")
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    elif device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(prev[0], warn_only=prev[1])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = prev[2], prev[3]


def fit(args: argparse.Namespace) -> Dict[str, Any]:
    """Train as ``args`` say; returns a summary (best/last accuracy, paths, timing)."""
    validate_train_args(args)
    ctx = init_distributed(args.device)
    try:
        with deterministic_mode(args.deterministic, ctx.device):
            return _fit(args, ctx)
    finally:
        cleanup_distributed()


def _say(ctx: DistContext, *parts: Any) -> None:
    if ctx.is_main:
        print(*parts, flush=True)


def _warn(ctx: DistContext, message: str) -> None:
    """A warning line, on stderr (as the notes are): stdout keeps the run's own lines."""
    if ctx.is_main:
        print(f"warning: {message}", file=sys.stderr, flush=True)


def _sa_groups_from(args: argparse.Namespace, state_dict: Dict[str, torch.Tensor]) -> None:
    """Put the SA group count of ``state_dict`` into ``args.model_kwargs`` where they name none
    and it is not the model's default, so that the run's checkpoints say how to rebuild it
    (``sanet eval``/``predict``/``--resume`` build the model from the saved args)."""
    from sanet.models import strip_prefix, with_sa_groups_of

    kwargs = dict(args.model_kwargs or {})
    if "sa_groups" in kwargs:
        return
    try:
        found = with_sa_groups_of(strip_prefix(state_dict), args.model, kwargs)
    except TypeError:  # kwargs the model does not take: create_train_model reports them
        return
    if "sa_groups" in found:
        args.model_kwargs = found


def _build_model(args: argparse.Namespace, num_classes: int, ctx: DistContext,
                 resume_ckpt: Optional[Dict[str, Any]] = None):
    if args.sync_bn and ctx.device.type != "cuda":
        raise ValueError("--sync-bn needs CUDA: PyTorch's SyncBatchNorm has no CPU implementation")
    if resume_ckpt is not None and isinstance(resume_ckpt.get("model"), dict):
        before = dict(args.model_kwargs or {})
        _sa_groups_from(args, resume_ckpt["model"])  # runs saved before sanet stored an inferred G
        saved = resume_ckpt.get("args")
        if isinstance(saved, dict) and args.model_kwargs != before and dict(saved.get("model_kwargs") or {}) == before:
            saved["model_kwargs"] = dict(args.model_kwargs)  # read off the weights: not an option that changed
    # A resume loads last.pt's weights over it: the --pretrained-file of the original command
    # is not read again (it may be gone; G was read off last.pt above).
    pretrained_file = args.pretrained_file if resume_ckpt is None else None
    model = create_train_model(args.model, num_classes, pretrained_file=pretrained_file,
                               drop_path=args.drop_path, model_kwargs=args.model_kwargs)
    if pretrained_file is not None:
        # create_train_model built the G of the file's SA weights (e.g. a run trained with
        # --model-kwargs sa_groups=2): record it with the run's arguments
        _sa_groups_from(args, model.state_dict())
    first_conv = (getattr(model, "pretrained_cfg", None) or {}).get("first_conv")
    in_chans = getattr(model.get_submodule(first_conv), "in_channels", 3) if isinstance(first_conv, str) else 3
    if in_chans != 3:
        if pretrained_file is not None and "in_chans" not in (args.model_kwargs or {}):
            # the stem came from the file's first conv: timm's adapt_input_conv converts it
            fix = (f"{pretrained_file}'s first conv takes {in_chans} channels; add --model-kwargs in_chans=3 "
                   "to convert it for RGB")
        else:
            fix = "build it with 3 input channels (drop in_chans from --model-kwargs)"
        raise ValueError(f"{args.model} takes {in_chans}-channel input, but sanet train loads every image "
                         f"as RGB (grayscale ones converted): {fix}")
    if args.sync_bn and ctx.distributed:
        # SA blocks whose BatchNorm is a SyncBatchNorm run unfused: the fused op would take
        # this process's batch statistics only (sanet.ops.fused._fusable)
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    elif args.sync_bn:
        _warn(ctx, "--sync-bn has nothing to synchronise in a single process (start the run with torchrun "
                   "across GPUs); BatchNorm stays as it is")
    model.to(ctx.device)
    if args.channels_last:
        to_channels_last(model)
    return model


def _data_config(args: argparse.Namespace, model) -> Dict[str, Any]:
    """timm's data config from the model's pretrained_cfg, overridden by the flags; the
    resolved values go back into ``args`` so checkpoints (and ``sanet eval``) know them."""
    from timm.data import resolve_data_config

    overrides = {"crop_pct": args.crop_pct, "interpolation": args.interpolation}
    built = _built_input_size(model)
    size = args.img_size or built  # timm keeps the registry's size in the cfg of a ViT built for another
    if size:
        overrides["input_size"] = (3, size, size)
    cfg = resolve_data_config({k: v for k, v in overrides.items() if v is not None}, model=model)
    _check_input_size(model, cfg["input_size"], built, explicit=bool(args.img_size))
    args.img_size, args.crop_pct = cfg["input_size"][-1], cfg["crop_pct"]
    args.interpolation = cfg["interpolation"]
    return cfg


def _built_input_size(model) -> Optional[int]:
    """The square input size a fixed-size model (timm's ``fixed_input_size``: ViTs and the
    like) was built for, where it says (``patch_embed.img_size``); None otherwise."""
    if not (getattr(model, "pretrained_cfg", None) or {}).get("fixed_input_size"):
        return None
    size = getattr(getattr(model, "patch_embed", None), "img_size", None)
    size = tuple(size) if isinstance(size, (tuple, list)) else (size,)
    return int(size[0]) if len(size) in (1, 2) and len(set(size)) == 1 and isinstance(size[0], int) else None


def _check_input_size(model, input_size, built: Optional[int], *, explicit: bool) -> None:
    """Fixed-size models fail in the first step on another size: say so, and what to pass,
    before the output folder is touched (one forward pass of a zero image, in eval mode)."""
    if not (getattr(model, "pretrained_cfg", None) or {}).get("fixed_input_size"):
        return  # convolutional nets take any size
    from sanet.errors import is_out_of_memory

    param = next(model.parameters(), None)
    was_training = model.training
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(1, *input_size, device=param.device if param is not None else None))
    except (AssertionError, RuntimeError, ValueError) as exc:
        if is_out_of_memory(exc):
            raise
        size = input_size[-1]
        if explicit:
            advice = (f"build it for that size with --model-kwargs img_size={size}"
                      + (f", or train at --img-size {built}" if built else ""))
        else:
            advice = "pass --img-size with the size it was built for (--model-kwargs img_size=N builds it for N)"
        raise ValueError(f"{model.pretrained_cfg.get('architecture', 'the model')} takes a fixed input size "
                         f"and failed on {size}x{size} images "
                         f"({str(exc).splitlines()[0] if str(exc) else type(exc).__name__}); {advice}") from None
    finally:
        model.train(was_training)


#: The param-group entries that this run's options set (--lr and the schedule's start,
#: --momentum, --weight-decay, as --no-wd-norm splits it).
_RUN_GROUP_OPTIONS = ("lr", "initial_lr", "momentum", "weight_decay")


def _resume(args, ckpt: Dict[str, Any], state: TrainState, ctx: DistContext, updates_per_epoch: int) -> None:
    from sanet.models import check_state_dict

    path = args.output / "last.pt"
    check_state_dict(ckpt["model"], state.raw, source=str(path))
    has_ema = ckpt.get("model_ema") is not None
    if (state.ema is not None) != has_ema:  # best.pt is chosen by EMA top-1 in EMA runs
        raise ValueError(f"--resume: {path} was trained {'with' if has_ema else 'without'} --model-ema; "
                         f"resume it {'with' if has_ema else 'without'} --model-ema (or start a new run)")
    saved_args = ckpt.get("args") or {}
    for key, flag in (("opt", "--opt"), ("no_wd_norm", "--no-wd-norm")):
        # the optimizer's state (momentum buffers, Adam moments) is per optimizer and param group
        if key in saved_args and saved_args[key] != getattr(args, key):
            raise ValueError(f"--resume: {path} was trained with {key}={saved_args[key]!r}, this run has "
                             f"{getattr(args, key)!r}; the optimizer state does not carry over: resume "
                             f"with the same {flag}, or start a new run (--pretrained-file {path} to "
                             "fine-tune from its weights)")
    state.raw.load_state_dict(ckpt["model"])
    # The loaded param groups would bring back the old run's lr, momentum and weight decay;
    # this run's options win (a changed value is reported below). Only those: the rest of a
    # group is the optimizer's own state (timm's Lookahead counts its steps in the group,
    # and a resume that reset it put the slow-weight syncs at other steps).
    options = [{k: v for k, v in group.items() if k in _RUN_GROUP_OPTIONS}
               for group in state.optimizer.param_groups]
    try:
        state.optimizer.load_state_dict(ckpt["optimizer"])
    except (ValueError, KeyError) as exc:
        raise ValueError(f"--resume: the optimizer state in {path} does not fit this run's optimizer "
                         f"({type(exc).__name__}: {exc}); resume with the options it was trained with") from None
    for group, opts in zip(state.optimizer.param_groups, options):
        group.update(opts)
    if ckpt.get("scaler") is not None:
        state.scaler.load_state_dict(ckpt["scaler"])
    if state.ema is not None:
        state.ema.module.load_state_dict(ckpt["model_ema"])
    state.updates = int(ckpt["updates"])
    # The schedule is rebuilt from the arguments and set to the start of the next epoch (as
    # timm's train script does), not loaded: timm schedules are functions of the position, and
    # this stays right when --epochs, the batch size or the process count change on resume.
    state.scheduler.step_update(num_updates=int(ckpt["epoch"]) * updates_per_epoch)
    saved, now = saved_args, plain_args(args)
    changed = [k for k in saved if k not in RUN_CONTROL_KEYS and saved[k] != now.get(k)]
    if changed:
        _warn(ctx, "resuming with different " + ", ".join(
            f"{k} ({saved[k]} -> {now.get(k)})" for k in changed))
    if (args.sched != "step" and saved.get("sched") == args.sched and saved.get("epochs") not in (None, args.epochs)
            and args.epochs > int(ckpt["epoch"])):  # (else nothing is trained: said elsewhere)
        # --epochs may change on resume (to train longer), but a cosine curve is drawn over all
        # epochs: rebuilt for the new count, it is at another height at the same epoch.
        _warn(ctx, f"--epochs {saved['epochs']} -> {args.epochs}: the {args.sched} schedule is now drawn "
                   f"over {args.epochs} epochs, so the learning rate jumps at epoch {int(ckpt['epoch']) + 1} to where "
                   f"that schedule has it (the step schedule is the same for any --epochs)")


def _epoch_line(row: Dict[str, Any], epochs: int, is_best: bool, eta_s: float) -> str:
    ema = f"  ema top-1 {row['val_top1_ema']:6.2f}" if "val_top1_ema" in row else ""
    return (f"epoch {row['epoch']:>3}/{epochs}  train loss {row['train_loss']:.4f}  val loss "
            f"{row['val_loss']:.4f}  top-1 {row['val_top1']:6.2f}  top-5 {row['val_top5']:6.2f}{ema}  "
            f"lr {row['lr']:.3g}  {row['train_images_per_s']:.0f} img/s  "
            f"ETA {datetime.timedelta(seconds=round(eta_s))}{'  *best' if is_best else ''}")


def _resolve_lr(args: argparse.Namespace, ctx: DistContext) -> float:
    """The global batch (all processes, accumulation included) and the lr scaled to it, into ``args``."""
    args.global_batch = args.batch_size * ctx.world_size * args.accum_steps
    args.lr_resolved = resolve_lr(args.lr, args.lr_base, args.lr_base_size, args.global_batch)
    return args.lr_resolved


def _build_state(args: argparse.Namespace, model, ctx: DistContext, num_classes: int,
                 updates_per_epoch: int) -> TrainState:
    """Optimizer, schedule, loss, mixup, AMP scaler and EMA for ``model`` (timm's)."""
    from timm.utils import ModelEmaV3

    _resolve_lr(args, ctx)
    optimizer = build_optimizer(model, args.opt, lr=args.lr_resolved, weight_decay=args.weight_decay,
                                momentum=args.momentum, no_wd_norm=args.no_wd_norm)
    mixup = build_mixup(mixup=args.mixup, cutmix=args.cutmix, prob=args.mixup_prob,
                        switch_prob=args.mixup_switch_prob, smoothing=args.smoothing, num_classes=num_classes)
    return TrainState(
        model=model, raw=model, ddp=None, optimizer=optimizer,
        scheduler=build_scheduler(optimizer, args.sched, epochs=args.epochs, updates_per_epoch=updates_per_epoch,
                                  decay_epochs=args.decay_epochs, decay_rate=args.decay_rate,
                                  warmup_epochs=args.warmup_epochs, warmup_lr=args.warmup_lr,
                                  min_lr=args.min_lr),
        loss_fn=build_train_loss(mixup_active=mixup is not None, smoothing=args.smoothing).to(ctx.device),
        scaler=torch.amp.GradScaler(ctx.device.type, enabled=args.amp == "fp16"),
        mixup=mixup, ema=ModelEmaV3(model, decay=args.model_ema_decay, use_warmup=args.model_ema_warmup)
        if args.model_ema else None,
        accum_steps=args.accum_steps, clip_grad=args.clip_grad, amp=args.amp,
        channels_last=args.channels_last, skip_bad_images=args.skip_bad_images)


def _wrap(state: TrainState, args: argparse.Namespace, ctx: DistContext) -> None:
    """DDP (one device per process), then optionally torch.compile."""
    if ctx.distributed:
        state.ddp = torch.nn.parallel.DistributedDataParallel(
            state.raw, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)
        state.model = state.ddp
    if args.compile or args.compile_mode:
        state.model = torch.compile(state.model, mode=args.compile_mode)


def _validate(state: TrainState, loader, ctx: DistContext, args: argparse.Namespace,
              progress: bool) -> Dict[str, Any]:
    """Validation metrics of the model (and of its EMA) for the epoch's log row.

    Runs the plain module, not the DDP wrapper: DDP's forward may broadcast buffers (a
    collective), and ranks hold different numbers of val batches.
    """
    broadcast_buffers(state.raw, ctx)
    if state.ema is not None:
        broadcast_buffers(state.ema.module, ctx)
    val = evaluate(state.raw, loader, ctx, amp=args.amp, channels_last=args.channels_last,
                   progress=progress, desc="val")
    if val["images"] == 0:  # all skipped as unreadable: a top-1 of 0 would be recorded as a score
        raise ValueError(f"no image of {Path(args.data) / 'val'} could be read ({val['skipped']} skipped as "
                         "unreadable): there is nothing to validate on")
    row = dict(val_loss=val["loss"], val_top1=val["top1"], val_top5=val["top5"],
               val_images=val["images"], val_skipped=val["skipped"])
    if state.ema is not None:
        ema = evaluate(state.ema.module, loader, ctx, amp=args.amp, channels_last=args.channels_last,
                       progress=progress, desc="val ema")
        row.update(val_loss_ema=ema["loss"], val_top1_ema=ema["top1"], val_top5_ema=ema["top5"])
    return row


def _check_weights_finite(state: TrainState, out: Path, epoch: int) -> None:
    """A finite loss can still come with non-finite gradients; never checkpoint such weights."""
    bad = [name for name, p in state.raw.named_parameters() if not torch.isfinite(p).all()]
    if bad:
        raise NonFiniteLossError(
            f"weights became NaN/inf during epoch {epoch + 1} (e.g. {', '.join(bad[:3])}); "
            f"training stopped. {_kept_message(out, epoch)}")


def _check_val_loss_finite(row: Dict[str, Any], out: Path, epoch: int) -> None:
    """Finite weights can still give non-finite outputs (BatchNorm's running statistics
    overflow in eval mode): such an epoch's top-1 means nothing and must not become best.pt."""
    for key in ("val_loss", "val_loss_ema"):
        if key in row and not math.isfinite(row[key]):
            raise NonFiniteLossError(
                f"{'EMA ' if key.endswith('ema') else ''}validation loss is {row[key]} after epoch {epoch + 1}: "
                "the model's outputs are not finite (e.g. BatchNorm running statistics overflowed; try a lower "
                f"--lr or --clip-grad); training stopped. {_kept_message(out, epoch)}")


def _fit(args: argparse.Namespace, ctx: DistContext) -> Dict[str, Any]:
    out = Path(args.output)
    check_schedule_lrs(args, _resolve_lr(args, ctx))
    check_output_outside_data(out, Path(args.data))
    check_output(out, resume=args.resume, overwrite=args.overwrite, writable=ctx.is_main)  # rank 0 writes
    if ctx.is_main:
        check_not_busy(out)
    train_ds, val_ds = open_train_val(args.data, args.skip_bad_images)
    check_same_images(ctx, {"training": train_ds, "validation": val_ds})
    class_names: List[str] = list(train_ds.classes)
    ckpt = load_resume_checkpoint(out, args.model, class_names) if args.resume else None

    seed_everything(args.seed)  # same initial weights on every rank and every run
    model = _build_model(args, len(class_names), ctx, ckpt)
    cfg = _data_config(args, model)
    aug = dict(scale=tuple(args.scale), ratio=tuple(args.ratio), hflip=args.hflip,
               color_jitter=args.color_jitter, auto_augment=args.aa, re_prob=args.reprob)
    train_ds.transform = build_transform(cfg, is_training=True, aug=aug)
    val_ds.transform = build_transform(cfg, is_training=False)
    train_loader = build_train_loader(train_ds, args.batch_size, workers=args.workers, ctx=ctx, seed=args.seed)
    val_loader = build_eval_loader(val_ds, args.batch_size, workers=args.workers, ctx=ctx)
    if args.accum_steps > len(train_loader):
        # the learning rate is scaled to batch x processes x accum-steps images per update
        raise ValueError(f"--accum-steps {args.accum_steps} exceeds the {len(train_loader)} batches of an "
                         f"epoch (per process); use at most {len(train_loader)}")
    updates_per_epoch = math.ceil(len(train_loader) / args.accum_steps)
    state = _build_state(args, model, ctx, len(class_names), updates_per_epoch)
    # OUT is locked for the run; until its first last.pt, a failure puts back the run that
    # --overwrite moved aside.
    with claim_output(out, overwrite=args.overwrite, main=ctx.is_main, say=lambda note: _say(ctx, note)) \
            as checkpointed:
        start_epoch, best, best_epoch, history = 0, -1.0, 0, []
        if ckpt is not None:
            _resume(args, ckpt, state, ctx, updates_per_epoch)
            start_epoch, history = int(ckpt["epoch"]), list(ckpt.get("history") or [])
            best, best_epoch = float(ckpt.get("best_top1", -1.0)), int(ckpt.get("best_epoch", 0))
            _say(ctx, f"resumed {out / 'last.pt'}: {start_epoch} epoch(s) done, best top-1 {best:.2f}")
            if ctx.is_main and restore_best_checkpoint(out, ckpt):
                _say(ctx, f"restored {out / 'best.pt'} from last.pt (its best epoch; the run was "
                          "interrupted before writing best.pt)")
            if start_epoch >= args.epochs:
                _warn(ctx, f"{out / 'last.pt'} has {start_epoch} epoch(s) done and --epochs is "
                           f"{args.epochs}: nothing to train (raise --epochs to continue)")
        _wrap(state, args, ctx)
        if note := slow_amp_note(ctx.device, args.amp):
            _warn(ctx, note)
        _say(ctx, f"{args.model}: {len(train_ds)} train / {len(val_ds)} val images, {len(class_names)} classes; "
                  f"{ctx.world_size} process(es) on {ctx.device.type}, global batch "
                  f"{args.global_batch}, lr {args.lr_resolved:.4g}, "
                  f"{updates_per_epoch} updates/epoch, img {args.img_size}")

        # (nothing to train: the run's log, TensorBoard events and curves stay as they are)
        title = f"{args.model} on {Path(args.data).name}"
        logger = RunLogger(out, start_epoch) if ctx.is_main and start_epoch < args.epochs else None
        if logger is not None:
            load_plotting()  # now, not after the first checkpoint: a Ctrl-C there would find no curves
            if args.warmup_epochs >= args.epochs:
                _warn(ctx, f"--warmup-epochs {args.warmup_epochs:g} >= --epochs {args.epochs}: the learning rate "
                           f"rises for the whole run and never reaches {args.lr_resolved:.4g}")
        run_start, progress = time.perf_counter(), not args.no_progress
        try:
            for epoch in range(start_epoch, args.epochs):
                seed_epoch(args.seed, epoch, ctx.rank)
                reseed_loader(train_loader, epoch, args.seed)
                try:
                    row: Dict[str, Any] = {"epoch": epoch + 1, **train_one_epoch(
                        state, train_loader, ctx, epoch, args.epochs, progress)}
                except NonFiniteLossError as exc:
                    raise NonFiniteLossError(f"{exc}. {_kept_message(out, epoch)}") from None
                if row["train_images"] == 0:  # a loss of 0 would be logged as if the epoch trained
                    raise ValueError(
                        f"epoch {epoch + 1} trained on no image: {row['train_skipped']} training image(s) could not "
                        f"be read (--skip-bad-images), and a batch needs 2 readable images. "
                        f"{_kept_message(out, epoch)}")
                _check_weights_finite(state, out, epoch)
                row.update(_validate(state, val_loader, ctx, args, progress))
                _check_val_loss_finite(row, out, epoch)
                history.append(row)
                metric = row.get("val_top1_ema", row["val_top1"])
                is_best = metric > best
                if is_best:
                    best, best_epoch = metric, epoch + 1
                if ctx.is_main:
                    logger.log_epoch(history)  # before last.pt, the commit point (see save_training_checkpoint)
                    save_training_checkpoint(out, _checkpoint(args, state, epoch + 1, best, best_epoch,
                                                              class_names, history), is_best)
                    checkpointed()  # a previous run that --overwrite moved aside goes now
                    per_epoch = (time.perf_counter() - run_start) / (epoch + 1 - start_epoch)
                    _say(ctx, _epoch_line(row, args.epochs, is_best, per_epoch * (args.epochs - epoch - 1)))
                    plot_curves(history, out / "curves.png", title=title)  # every epoch: a stopped run keeps them
        finally:
            if logger is not None:
                logger.close()
        curves = out / "curves.png"
        if ctx.is_main and history and not curves.exists():  # a run killed before drawing them
            plot_curves(history, curves, title=title)
        curves = curves if curves.exists() else None
        return _summary(args, out, history, start_epoch, best, best_epoch, curves,
                        time.perf_counter() - run_start, ctx)


def _summary(args, out: Path, history, start_epoch: int, best: float, best_epoch: int, curves,
             seconds: float, ctx: DistContext) -> Dict[str, Any]:
    last = history[-1] if history else {}
    return {
        # epochs: the run's, all told; epochs_trained: by this command (fewer after --resume)
        "model": args.model, "output": str(out), "epochs": len(history),
        "epochs_trained": len(history) - start_epoch,
        # best.pt is chosen on the EMA's top-1 when there is an EMA: say which one it is
        "best_top1": best, "best_epoch": best_epoch, "best_of": "ema" if args.model_ema else "model",
        "last_top1": last.get("val_top1"), "last_top5": last.get("val_top5"), "last_loss": last.get("val_loss"),
        "last_top1_ema": last.get("val_top1_ema"),
        "train_images_per_s": last.get("train_images_per_s"), "seconds": seconds,
        "last_checkpoint": str(out / "last.pt"), "best_checkpoint": str(out / "best.pt"),
        "curves": str(curves) if curves else None, "world_size": ctx.world_size,
    }


def _kept_message(out: Path, epoch: int) -> str:
    if epoch == 0 or not (out / "last.pt").exists():
        return "No checkpoint had been written yet."
    return f"The last good checkpoint, {out / 'last.pt'} (after epoch {epoch}), is kept."


def _checkpoint(args, state: TrainState, epoch: int, best: float, best_epoch: int,
                class_names: List[str], history: List[Dict[str, Any]]) -> Dict[str, Any]:
    from sanet import __version__

    return {
        "model": state.raw.state_dict(),
        "model_ema": state.ema.module.state_dict() if state.ema is not None else None,
        "optimizer": state.optimizer.state_dict(),
        "scheduler": to_plain(optional_state(state.scheduler)),
        "scaler": state.scaler.state_dict() if state.scaler.is_enabled() else None,
        "epoch": epoch, "updates": state.updates, "best_top1": best, "best_epoch": best_epoch,
        "arch": args.model, "args": plain_args(args), "class_names": list(class_names),
        "history": to_plain(history),
        "sanet_version": __version__, "torch_version": str(torch.__version__),
    }

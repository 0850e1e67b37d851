"""Mutation-round file for the model builder and loaders (``sanet.engine.modeling``), the
process-group helpers (``distributed``), ``fit``'s own steps (``trainer``) and the ``convert``,
``ext`` and ``train`` commands: each test fails on a one-line change (a mutant) of those
modules that the rest of the suite let pass. Unit level where possible: no training run."""
from __future__ import annotations

import pytest
import timm
import torch

import sanet  # noqa: F401  (registers the SA models)
from sanet.engine.modeling import create_train_model, load_for_inference

pytestmark = pytest.mark.usefixtures("one_thread")

NAME = "sa_resnet_test"


def _weights(num_classes: int = 3, **kwargs) -> dict:
    torch.manual_seed(1)
    return timm.create_model(NAME, num_classes=num_classes, **kwargs).state_dict()


def _authors_file(path, state_dict, arch):
    """A checkpoint in the authors' layout: 'arch' and 'module.'-prefixed 'state_dict'."""
    torch.save({"arch": arch, "state_dict": {f"module.{k}": v for k, v in state_dict.items()}}, path)
    return path


# --- create_train_model: fine-tuning from a file ------------------------------------------------


def test_drop_path_sets_stochastic_depth_not_dropout():
    """--drop-path is timm's drop_path_rate: the last block's rate is the option's (timm raises it
    linearly over the blocks); the classifier's dropout (drop_rate) stays off."""
    from timm.layers import DropPath

    model = create_train_model(NAME, 3, drop_path=0.1)
    rates = [m.drop_prob for m in model.modules() if isinstance(m, DropPath)]
    assert rates and max(rates) == pytest.approx(0.1)
    assert model.drop_rate == 0.0
    assert not any(isinstance(m, DropPath) for m in create_train_model(NAME, 3).modules())


@pytest.mark.parametrize("name", [NAME, "resnet10t"])
def test_a_file_with_the_runs_class_count_keeps_its_classifier(tmp_path, name):
    """A 3-class file fine-tuned on 3 classes keeps its fc; another count gets a new one. (timm
    keeps a classifier only where the cfg's class count matches the model's: SA models read it
    off the weights, other timm models need it set to the file's.)"""
    torch.manual_seed(1)
    sd = timm.create_model(name, num_classes=3).state_dict()
    torch.save(sd, tmp_path / "w.pt")
    kept = create_train_model(name, 3, pretrained_file=tmp_path / "w.pt")
    assert torch.equal(kept.fc.weight, sd["fc.weight"]) and torch.equal(kept.fc.bias, sd["fc.bias"])
    assert torch.equal(kept.conv1[0].weight if name == "resnet10t" else kept.conv1.weight,
                       sd["conv1.0.weight" if name == "resnet10t" else "conv1.weight"])
    new = create_train_model(name, 5, pretrained_file=tmp_path / "w.pt")
    assert new.fc.out_features == 5


def test_the_users_overlay_is_kept_under_the_files_weights(tmp_path):
    """--model-kwargs pretrained_cfg_overlay (mean/std) with --pretrained-file: the model that
    trains (whose pretrained_cfg the data config is read from) has the overlay's mean and std."""
    sd = _weights(3)
    torch.save(sd, tmp_path / "w.pt")
    overlay = {"mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25)}
    model = create_train_model(NAME, 3, pretrained_file=tmp_path / "w.pt",
                               model_kwargs={"pretrained_cfg_overlay": overlay})
    assert tuple(model.pretrained_cfg["mean"]) == (0.5, 0.5, 0.5)
    assert tuple(model.pretrained_cfg["std"]) == (0.25, 0.25, 0.25)
    assert torch.equal(model.conv1.weight, sd["conv1.weight"])


def test_a_run_checkpoint_is_named_by_its_args_without_arch(tmp_path):
    """A sanet train checkpoint records its model in args['model'] (older ones had no 'arch'):
    fine-tuning another architecture from it names that model."""
    path = tmp_path / "run.pt"
    torch.save({"model": _weights(3), "args": {"model": "sa_resnet18"}, "class_names": ["a", "b", "c"]}, path)
    with pytest.raises(ValueError, match="says it holds sa_resnet18 weights; pass --model sa_resnet18"):
        create_train_model(NAME, 3, pretrained_file=path)


def test_an_arch_timm_does_not_know_is_not_taken_for_the_files_model(tmp_path):
    """'arch' names the model only where timm registers it: another name (a private net's) is
    neither refused as another architecture nor used as the model to build."""
    sd = _weights(3)
    path = _authors_file(tmp_path / "a.pth.tar", sd, "my_private_net")
    model = create_train_model(NAME, 3, pretrained_file=path)
    assert torch.equal(model.fc.weight, sd["fc.weight"])
    loaded = load_for_inference(NAME, pretrained_file=path)
    assert loaded.name == NAME and torch.equal(loaded.model.fc.weight, sd["fc.weight"])
    with pytest.raises(ValueError, match="needs --model"):
        load_for_inference(None, pretrained_file=path)


def test_a_runtime_error_that_is_no_key_mismatch_is_not_called_one(tmp_path, monkeypatch):
    """Only PyTorch's strict-load error becomes 'checkpoint does not match': any other
    RuntimeError while building the model is a bug or an environment failure, kept as it is."""
    from sanet.models import CheckpointMismatchError

    torch.save(_weights(3), tmp_path / "w.pt")

    real = timm.create_model

    def fail(*args, **kwargs):  # only the build that loads the file's weights
        if kwargs.get("pretrained"):
            raise RuntimeError("device-side assert triggered")
        return real(*args, **kwargs)

    monkeypatch.setattr(timm, "create_model", fail)
    with pytest.raises(RuntimeError, match="device-side assert") as info:
        create_train_model(NAME, 3, pretrained_file=tmp_path / "w.pt")
    assert not isinstance(info.value, CheckpointMismatchError)


def test_drop_path_on_a_model_without_stochastic_depth_is_the_users_error(tmp_path):
    """--drop-path for a model whose blocks take no drop_path_rate (timm's DLA) names the option
    (it was a TypeError traceback, reported as a bug), with or without a file to start from."""
    message = "--drop-path 0.1: dla46_c has no stochastic depth"
    with pytest.raises(ValueError, match=message):
        create_train_model("dla46_c", 3, drop_path=0.1)
    torch.save(timm.create_model("dla46_c", num_classes=3).state_dict(), tmp_path / "w.pt")
    with pytest.raises(ValueError, match=message):
        create_train_model("dla46_c", 3, pretrained_file=tmp_path / "w.pt", drop_path=0.1)
    assert create_train_model("dla46_c", 3, pretrained_file=tmp_path / "w.pt").fc.out_channels == 3


def test_a_type_error_of_no_option_keeps_its_type(tmp_path, monkeypatch):
    """Without --model-kwargs (and --drop-path) a TypeError while reading the file's group
    count is a bug, kept as it is: not reported as a --model-kwargs entry the model refuses."""
    import sanet.models

    torch.save(_weights(3), tmp_path / "w.pt")

    def fail(*args, **kwargs):
        raise TypeError("an internal error")

    monkeypatch.setattr(sanet.models, "with_sa_groups_of", fail)
    with pytest.raises(TypeError, match="an internal error"):
        create_train_model(NAME, 3, pretrained_file=tmp_path / "w.pt")
    with pytest.raises(ValueError, match=r"--model-kwargs sa_impl='auto': sa_resnet_test does not accept it"):
        create_train_model(NAME, 3, pretrained_file=tmp_path / "w.pt", model_kwargs={"sa_impl": "auto"})


# --- load_for_inference and the checks of what a file carries ------------------------------------


def _run_file(path, state_dict, **args):
    """A minimal sanet train checkpoint: weights, class names, and the run's args."""
    torch.save({"model": state_dict, "class_names": ["a", "b", "c"], "args": {"model": NAME, **args}}, path)
    return path


@pytest.mark.parametrize("overlay, named", [
    ({"source": "hf-hub"}, "pretrained_cfg_overlay source"),
    ({"hf_hub_filename": "w.bin", "mean": (0.5, 0.5, 0.5)}, "pretrained_cfg_overlay hf_hub_filename"),
    (5, "a pretrained_cfg_overlay that is not a dict"),  # nothing can say what it sets
])
def test_a_files_overlay_that_names_a_weight_source_is_refused(tmp_path, overlay, named):
    """Every pretrained_cfg field that says where weights come from (timm's file, url,
    hf_hub_id, hf_hub_filename, state_dict, source) is refused in a file's saved model kwargs,
    and so is an overlay that is not a dict."""
    from sanet.engine.modeling import overlay_weight_sources
    from sanet.errors import SanetError

    path = _run_file(tmp_path / "r.pt", _weights(3), model_kwargs={"pretrained_cfg_overlay": overlay})
    with pytest.raises(SanetError, match=f"model_kwargs set {named}, which a weights file may not"):
        load_for_inference(None, checkpoint=path)
    sources = ["file", "url", "hf_hub_id", "hf_hub_filename", "state_dict", "source"]
    assert overlay_weight_sources({"pretrained_cfg_overlay": dict.fromkeys(sources + ["mean"], 1)}) == sorted(sources)


def test_a_checkpoint_named_by_arch_alone_names_its_model():
    """Without args['model'], 'arch' names the architecture (and must agree with --model)."""
    from sanet.engine.modeling import check_checkpoint_model

    assert check_checkpoint_model({"arch": "sa_resnet18"}, None, "x.pt") == "sa_resnet18"
    assert check_checkpoint_model({"arch": "sa_resnet18", "args": {}}, "sa_resnet18", "x.pt") == "sa_resnet18"
    with pytest.raises(ValueError, match="x.pt is a checkpoint of sa_resnet18, not sa_resnet50"):
        check_checkpoint_model({"arch": "sa_resnet18"}, "sa_resnet50", "x.pt")
    # args['model'] first: the model the run was built as
    assert check_checkpoint_model({"arch": "x", "args": {"model": "sa_resnet18"}}, None, "x.pt") == "sa_resnet18"


@pytest.mark.parametrize("data_args, refused", [
    ({"img_size": 0}, "img_size is 0, not a positive int"),
    ({"img_size": 16, "crop_pct": 0.0}, "crop_pct is 0.0, not a positive number"),
    ({"img_size": 16, "crop_pct": 1}, None),  # an int fraction is a number too
    ({"img_size": 16, "crop_pct": 0.875, "interpolation": "bicubic"}, None),
])
def test_a_runs_saved_image_settings_are_checked_at_their_bounds(tmp_path, data_args, refused):
    from sanet.errors import SanetError

    path = _run_file(tmp_path / "r.pt", _weights(3), **data_args)
    if refused:
        with pytest.raises(SanetError, match=refused):
            load_for_inference(None, checkpoint=path)
    else:
        loaded = load_for_inference(None, checkpoint=path)
        assert {k: loaded.data_args[k] for k in data_args} == data_args


def test_exactly_one_source_of_weights(tmp_path):
    path = _run_file(tmp_path / "r.pt", _weights(3))
    for both in ({"checkpoint": path, "pretrained_file": path}, {}):
        with pytest.raises(ValueError, match="pass exactly one of --checkpoint"):
            load_for_inference(NAME, **both)


def test_a_file_of_other_weights_lists_the_keys_not_a_missing_classifier(tmp_path):
    """No classifier and no stem of the model: not this model's weights headless, but other
    weights; the mismatch names the keys (eval with num_classes 1000)."""
    from sanet.models import CheckpointMismatchError

    torch.save({"encoder.weight": torch.zeros(4, 4)}, tmp_path / "other.pt")
    with pytest.raises(CheckpointMismatchError) as info:
        load_for_inference(NAME, pretrained_file=tmp_path / "other.pt")
    assert "encoder.weight" in str(info.value) and "has no classifier" not in str(info.value)


# --- trainer: the model a run builds ----------------------------------------------------------------


def _train_args(*argv: str):
    from engine_utils import parse_train_args

    from sanet.engine.config import validate_train_args

    args = parse_train_args(*argv)
    validate_train_args(args)
    return args


def test_fine_tuning_records_the_files_group_count_in_the_runs_args(tmp_path):
    """Weights of G=4 (not the model's default): the run's model_kwargs say sa_groups=4, so its
    checkpoints name how the model was built."""
    from sanet.engine.distributed import DistContext
    from sanet.engine.trainer import _build_model

    sd = _weights(3, sa_groups=4)
    torch.save(sd, tmp_path / "g4.pt")
    args = _train_args("--pretrained-file", str(tmp_path / "g4.pt"))
    model = _build_model(args, 3, DistContext())
    assert args.model_kwargs == {"sa_groups": 4}
    assert torch.equal(model.layer1[0].sa.cweight, sd["layer1.0.sa.cweight"])


@pytest.mark.parametrize("kwargs, fix", [
    ((), "'s first conv takes 1 channels; add --model-kwargs in_chans=3 to convert it for RGB"),
    (("--model-kwargs", "in_chans=1"), "build it with 3 input channels (drop in_chans from --model-kwargs)"),
])
def test_a_one_channel_model_names_the_cure_for_where_its_channels_came_from(tmp_path, kwargs, fix):
    """A 1-channel stem from the file: convert its first conv; from --model-kwargs: drop it."""
    from sanet.engine.distributed import DistContext
    from sanet.engine.trainer import _build_model

    torch.save(_weights(3, in_chans=1), tmp_path / "grey.pt")
    args = _train_args("--pretrained-file", str(tmp_path / "grey.pt"), *kwargs)
    with pytest.raises(ValueError, match="takes 1-channel input, but sanet train loads every image as RGB") as info:
        _build_model(args, 3, DistContext())
    assert fix in str(info.value)


class _FixedSize(torch.nn.Module):
    """A fixed-input-size model (as timm's ViTs say) that fails on any input, without
    patch_embed.img_size to tell the size it was built for."""

    pretrained_cfg = {"architecture": "fixed_net", "fixed_input_size": True, "input_size": (3, 32, 32),
                      "interpolation": "bicubic", "crop_pct": 0.9, "crop_mode": "center",
                      "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5), "num_classes": 3}

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x):
        raise AssertionError(f"Input height ({x.shape[-2]}) doesn't match model (48).")


@pytest.mark.parametrize("argv, advice", [
    ((), "pass --img-size with the size it was built for"),
    (("--img-size", "40"), "build it for that size with --model-kwargs img_size=40"),
])
def test_a_fixed_size_model_that_fails_gets_advice_for_whether_the_size_was_asked(argv, advice):
    from sanet.engine.trainer import _data_config

    model = _FixedSize().train()
    with pytest.raises(ValueError, match="fixed_net takes a fixed input size and failed on") as info:
        _data_config(_train_args(*argv), model)
    assert f"; {advice}" in str(info.value) and model.training


def test_validation_first_gives_every_rank_rank_0s_buffers_of_the_model_and_its_ema(monkeypatch):
    """BatchNorm statistics differ per rank after an epoch: both the model and its EMA get rank
    0's before they are evaluated."""
    from timm.utils import ModelEmaV3

    import sanet.engine.trainer as trainer
    from sanet.engine.distributed import DistContext
    from sanet.engine.loop import TrainState

    events = []
    monkeypatch.setattr(trainer, "broadcast_buffers", lambda module, ctx: events.append(("broadcast", module)))

    def evaluate(model, loader, ctx, **kwargs):
        events.append(("evaluate", model))
        return dict(loss=1.0, top1=50.0, top5=100.0, images=4, skipped=0)

    monkeypatch.setattr(trainer, "evaluate", evaluate)
    model = torch.nn.Sequential(torch.nn.BatchNorm1d(3))
    ema = ModelEmaV3(model)
    state = TrainState(model=model, raw=model, ddp=None, optimizer=None, scheduler=None, loss_fn=None,
                       scaler=None, ema=ema)
    row = trainer._validate(state, [], DistContext(rank=1, world_size=2), _train_args(), False)
    assert [(what, id(m)) for what, m in events] == [("broadcast", id(model)), ("broadcast", id(ema.module)),
                                                     ("evaluate", id(model)), ("evaluate", id(ema.module))]
    assert row["val_top1"] == row["val_top1_ema"] == 50.0


def test_a_validation_without_a_readable_image_is_no_score(monkeypatch, tmp_path):
    """All val images skipped as unreadable: a top-1 of 0 would be logged (and maybe be best)."""
    import sanet.engine.trainer as trainer
    from sanet.engine.distributed import DistContext
    from sanet.engine.loop import TrainState

    monkeypatch.setattr(trainer, "evaluate", lambda *a, **k: dict(loss=0.0, top1=0.0, top5=0.0, images=0, skipped=2))
    model = torch.nn.Linear(2, 2)
    state = TrainState(model=model, raw=model, ddp=None, optimizer=None, scheduler=None, loss_fn=None, scaler=None)
    args = _train_args()
    args.data = str(tmp_path / "imgs")
    with pytest.raises(ValueError, match=r"could be read \(2 skipped as unreadable\): there is nothing to validate"):
        trainer._validate(state, [], DistContext(), args, False)


def test_cuda_asked_for_where_there_is_none_says_so(monkeypatch):
    from sanet.engine.distributed import resolve_device
    from sanet.errors import SanetError

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)  # (a driver that counts a GPU it can't use)
    with pytest.raises(SanetError, match="--device cuda: no CUDA device is available"):
        resolve_device("cuda")


def test_updates_per_epoch_count_the_last_short_group(data, tmp_path, monkeypatch):
    """24 training images in batches of 4 are 6 batches; --accum-steps 4 makes 2 updates an
    epoch (the second of 2 batches): the schedule is built for 2, not 1."""
    import sanet.engine.trainer as trainer

    class Stop(Exception):
        pass

    seen = {}

    def build_state(args, model, ctx, num_classes, updates_per_epoch):
        seen["updates"] = updates_per_epoch
        raise Stop

    monkeypatch.setattr(trainer, "_build_state", build_state)
    args = _train_args("--img-size", "16", "--batch-size", "4", "--workers", "0", "--accum-steps", "4")
    args.data, args.output = str(data), str(tmp_path / "run")
    with pytest.raises(Stop):
        trainer.fit(args)
    assert seen["updates"] == 2 and not (tmp_path / "run").exists()


# --- sanet convert --------------------------------------------------------------------------------


def test_convert_num_classes_0_is_a_headless_file(tmp_path, capsys):
    """--num-classes 0 is allowed (no classifier): a file saved without its fc converts."""
    import json

    from sanet.checkpoint import safetensors_metadata
    from sanet.cli import main

    torch.save({k: v for k, v in _weights(3).items() if not k.startswith("fc.")}, tmp_path / "headless.pt")
    out = tmp_path / "h.safetensors"
    assert main(["convert", str(tmp_path / "headless.pt"), str(out), "--model", NAME, "--num-classes", "0",
                 "--json"]) == 0, capsys.readouterr().err
    assert json.loads(capsys.readouterr().out)["num_classes"] == 0
    assert safetensors_metadata(out)["num_classes"] == "0"
    assert main(["convert", str(tmp_path / "headless.pt"), str(out), "--model", NAME, "--num-classes", "-1"]) == 2
    assert "--num-classes must be 0 (no classifier) or more, got -1" in capsys.readouterr().err


# --- sanet train's closing lines ------------------------------------------------------------------


def _summary(**changes):
    summary = {"world_size": 1, "best_of": "model", "last_top1": 50.0, "last_top1_ema": None,
               "epochs_trained": 2, "epochs": 3, "seconds": 9.6, "best_top1": 62.5, "best_epoch": 2,
               "last_checkpoint": "o/last.pt", "best_checkpoint": "o/best.pt", "curves": "o/curves.png"}
    return dict(summary, **changes)


@pytest.mark.parametrize("rank, changes, first_line", [
    # a resume that trained all but one of the run's epochs still says how many there are in all
    ("0", {}, "done: 2 epoch(s) in 10 s (3 in all); best val top-1 62.50% (epoch 2), last 50.00%"),
    # RANK set outside torchrun (a scheduler's own variable) in a single process: it reports
    ("3", {"epochs_trained": 3}, "done: 3 epoch(s) in 10 s; best val top-1 62.50% (epoch 2), last 50.00%"),
])
def test_train_closing_line(capsys, monkeypatch, rank, changes, first_line):
    import argparse

    import sanet.engine
    from sanet.cli import train

    monkeypatch.setenv("RANK", rank)
    monkeypatch.setattr(sanet.engine, "fit", lambda args: _summary(**changes))
    assert train.run(argparse.Namespace(model=NAME, json=False)) == 0
    assert capsys.readouterr().out.splitlines()[0] == first_line

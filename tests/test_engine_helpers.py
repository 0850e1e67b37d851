"""Unit tests of small engine pieces: parameter groups, lr scaling, plain checkpoint data,
class maps, worker errors, skipped micro-batches, too few images for a batch."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch


def test_sa_gate_params_get_no_weight_decay_with_flag():
    import timm

    import sanet  # noqa: F401
    from sanet.engine.optim import build_optimizer, sa_gate_param_names

    model = timm.create_model("sa_resnet_test", num_classes=3)
    gates = sa_gate_param_names(model)
    assert gates and all(n.rsplit(".", 1)[-1] in ("cweight", "cbias", "sweight", "sbias") for n in gates)
    params = dict(model.named_parameters())
    assert all(params[n].ndim == 4 for n in gates)  # why timm's 1-D filter misses them
    opt = build_optimizer(model, "momentum", lr=0.1, weight_decay=1e-4, momentum=0.9, no_wd_norm=True)
    no_decay = {id(p) for g in opt.param_groups if g["weight_decay"] == 0 for p in g["params"]}
    decay = {id(p) for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    assert all(id(params[n]) in no_decay for n in gates)
    # found without sa_gate_param_names: the 4 gates of every SA layer, sbias too
    from sanet.layers import ShuffleAttention

    layers = [m for m in model.modules() if isinstance(m, ShuffleAttention)]
    found = [n for n in params if n.rsplit(".", 1)[-1] in ("cweight", "cbias", "sweight", "sbias")]
    assert layers and len(found) == 4 * len(layers) and sum(n.endswith(".sbias") for n in found) == len(layers)
    assert all(id(params[n]) in no_decay for n in found)
    assert id(params["conv1.weight"]) in decay and id(params["bn1.weight"]) in no_decay
    # the authors' default: one group, everything decayed, classical momentum
    opt = build_optimizer(model, "momentum", lr=0.1, weight_decay=1e-4, momentum=0.9, no_wd_norm=False)
    assert len(opt.param_groups) == 1 and opt.param_groups[0]["weight_decay"] == 1e-4
    assert opt.param_groups[0]["nesterov"] is False and opt.param_groups[0]["momentum"] == 0.9


def test_lr_scaling_rule():
    from sanet.engine.optim import resolve_lr

    assert resolve_lr(None, 0.1, 256, 256) == pytest.approx(0.1)
    assert resolve_lr(None, 0.1, 256, 1024) == pytest.approx(0.4)
    assert resolve_lr(0.05, 0.1, 256, 1024) == 0.05


def test_to_plain_makes_weights_only_data(tmp_path):
    from sanet.engine.config import to_plain

    obj = to_plain({"p": Path("/x"), "t": (1, 2.5, None), "v": torch.__version__, "x": torch.ones(2)})
    assert obj["p"] == "/x" and obj["t"] == [1, 2.5, None] and type(obj["v"]) is str
    torch.save(obj, tmp_path / "o.pt")
    assert torch.equal(torch.load(tmp_path / "o.pt", weights_only=True)["x"], torch.ones(2))


def test_target_map_matches_folders_by_name():
    from sanet.engine.predict import target_map_for

    assert target_map_for(["a", "b"], ["a", "b"], 2) is None
    assert target_map_for(["b", "c"], ["a", "b", "c"], 3).tolist() == [1, 2]
    # ImageNet WordNet ids for 1000-class weights without names
    assert target_map_for(["n01443537"], None, 1000).tolist() == [1]
    with pytest.raises(ValueError, match="not classes of this model"):
        target_map_for(["a", "zebra"], ["a", "b"], 2)
    with pytest.raises(ValueError, match="no class names"):
        target_map_for(["a", "b", "c"], None, 2)


def test_worker_error_message_is_cleaned():
    from sanet.engine.data import clean_worker_error

    wrapped = RuntimeError("Caught UnreadableImageError in DataLoader worker process 0.\n"
                           "Original Traceback (most recent call last):\n  File \"x.py\", line 1\n"
                           "sanet.engine.data.UnreadableImageError: cannot read image /d/a.png: bad\n")
    assert clean_worker_error(wrapped) == "cannot read image /d/a.png: bad"
    assert clean_worker_error(ValueError("plain")) == "plain"


def test_a_group_with_skipped_micro_batches_averages_over_the_used_ones():
    """Each backward divides by the full group size; when micro-batches were skipped (all
    unreadable), the step must see the mean over the ones used, as a group of that size."""
    from types import SimpleNamespace

    from sanet.engine.distributed import DistContext
    from sanet.engine.loop import _complete_group_gradients

    model = torch.nn.Linear(3, 2)
    x = torch.randn(5, 3)
    (model(x).square().mean() / 4).backward()  # 1 of a group of 4 micro-batches ran
    got = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model(x).square().mean().backward()
    want = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    (model(x).square().mean() / 4).backward()
    _complete_group_gradients(SimpleNamespace(raw=model), DistContext(), used=1, group_size=4, synced=True)
    for p, w, g in zip(model.parameters(), want, got):
        torch.testing.assert_close(p.grad, w)
        assert not torch.allclose(g, w)


def test_too_few_images_for_a_batch_suggest_only_valid_fixes():
    from sanet.engine.data import build_train_loader
    from sanet.engine.distributed import DistContext

    with pytest.raises(ValueError, match=r"Use --batch-size 2 or less"):  # 3 images over 2 processes
        build_train_loader(list(range(3)), 4, workers=0, ctx=DistContext(world_size=2), seed=0)
    with pytest.raises(ValueError, match=r"1 training image\(s\) for 1 process\(es\).*at least 2") as info:
        build_train_loader([0], 2, workers=0, ctx=DistContext(), seed=0)
    assert "--batch-size" not in str(info.value)  # 1 is below the minimum batch size


def test_more_processes_than_gpus_is_a_clear_error(monkeypatch):
    """torchrun --nproc-per-node above the GPU count (or one visible GPU per process under a
    scheduler): a message, not torch.cuda.set_device's "invalid device ordinal"."""
    from sanet.engine.distributed import resolve_device
    from sanet.errors import SanetError

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("cuda", 1) == torch.device("cuda", 1)
    with pytest.raises(SanetError, match=r"LOCAL_RANK 2 but sees 2 GPU\(s\) \(cuda:0 to cuda:1\)"):
        resolve_device("cuda", 2)


def test_optimizer_names_timm_builds_are_accepted_before_training():
    """lookahead_ + a name is timm's too (it was refused as unknown); a name timm lists but
    can't build here fails before the data load, without timm's traceback."""
    from sanet.engine.config import _check_optimizer

    for name in ("sgd", "momentum", "AdamW", "lookahead_momentum"):
        _check_optimizer(name)
    with pytest.raises(ValueError, match=r"unknown --opt 'lookahead_adamx'; timm optimizers: .*adamw"):
        _check_optimizer("lookahead_adamx")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match=r"--opt 'fusedadam' can't be used here \("):
            _check_optimizer("fusedadam")  # apex


def test_class_names_that_differ_only_in_unicode_normalisation_are_named():
    import unicodedata

    from sanet.engine.data import check_same_classes

    nfc, nfd = unicodedata.normalize("NFC", "café"), unicodedata.normalize("NFD", "café")
    check_same_classes(["a", nfc], ["a", nfc])
    with pytest.raises(ValueError, match=r"differ only in how accents are encoded .*: 'caf\\xe9' vs 'cafe\\u0301'\)"):
        check_same_classes(["a", nfc], ["a", nfd])
    with pytest.raises(ValueError, match=r"only in train: \['b'\]; only in val: \['c'\] \(2 vs 2 classes\)$"):
        check_same_classes(["a", "b"], ["a", "c"])


def test_processes_that_list_different_images_are_stopped(tmp_path, monkeypatch):
    """A rank that lists other images (a copy that differs, a folder it can't read) made
    training hang in a collective and eval count images twice or not at all. Two "ranks"
    here: all_gather hands rank 0 the row that rank 1 computes from its own listing."""
    import sanet.engine.distributed as distributed
    from sanet.engine.data import open_image_folder
    from sanet.errors import SanetError
    from engine_utils import make_imagefolder

    ctx = distributed.DistContext(rank=0, world_size=2)
    rank1 = {}

    def all_gather(out, mine):
        out[0].copy_(mine)
        out[1].copy_(rank1["row"])

    monkeypatch.setattr(distributed.dist, "all_gather", all_gather)

    def two_ranks(rank0_root, rank1_root):
        rank1["row"] = distributed._listing_rows({"evaluation": open_image_folder(rank1_root, "evaluation")})
        distributed.check_same_images(ctx, {"evaluation": open_image_folder(rank0_root, "evaluation")})

    ours = make_imagefolder(tmp_path / "d", splits={"val": 2}) / "val"
    copy = make_imagefolder(tmp_path / "copy", splits={"val": 2}) / "val"  # the same files elsewhere
    two_ranks(ours, copy)
    (copy / "b" / "000.png").rename(copy / "b" / "zzz.png")  # same count, another file
    with pytest.raises(SanetError, match=r"list different evaluation images \(rank 0: 6, rank 1: 6 images"):
        two_ranks(ours, copy)
    (copy / "b" / "zzz.png").unlink()
    with pytest.raises(SanetError, match=r"rank 0: 6, rank 1: 5 images"):
        two_ranks(ours, copy)
    distributed.check_same_images(distributed.DistContext(), {"evaluation": None})  # one process: nothing to do


def test_a_folder_that_cannot_be_listed_is_an_error_not_skipped(tmp_path, monkeypatch):
    """os.walk skipped it silently (its images left out of the count)."""
    import os

    from sanet.engine.data import open_image_folder
    from sanet.errors import SanetError
    from engine_utils import make_imagefolder

    root = make_imagefolder(tmp_path / "d", splits={"val": 2}) / "val"
    (root / "c" / "sub").mkdir()
    real = os.scandir

    def scandir(path="."):
        if str(path).endswith("sub"):  # as for a folder without read permission
            raise PermissionError(13, "Permission denied", str(path))
        return real(path)

    monkeypatch.setattr(os, "scandir", scandir)
    with pytest.raises(SanetError, match=rf"cannot list the folder {root / 'c' / 'sub'}: Permission denied"):
        open_image_folder(root, "evaluation")


def test_only_the_writing_process_needs_a_writable_output(tmp_path, monkeypatch):
    """Under torchrun rank 1 refused an --output only rank 0 writes to (while rank 0 went on
    and created the folder)."""
    import sanet.engine.run_dir as run_dir

    monkeypatch.setattr(run_dir.os, "access", lambda path, mode: False)  # a read-only folder, even for root
    with pytest.raises(ValueError, match="is not writable"):
        run_dir.check_output(tmp_path / "run", resume=False, overwrite=False)
    run_dir.check_output(tmp_path / "run", resume=False, overwrite=False, writable=False)  # ranks > 0

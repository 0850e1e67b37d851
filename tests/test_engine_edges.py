"""Engine pieces at unit level, no training run: ImageFolder error messages, joining a torchrun
job from its environment (with the process group mocked), the device choice, ``all_reduce_sum``
without a context, what ``--resume`` refuses and how ``--overwrite`` restores a previous run."""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from engine_utils import make_imagefolder

pytestmark = pytest.mark.usefixtures("one_thread")


# --- data -------------------------------------------------------------------------------------

def test_loose_images_with_upper_case_extensions_are_named(tmp_path):
    from sanet.engine.data import open_image_folder

    (tmp_path / "IMG_0001.PNG").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=r"holds images \(IMG_0001\.PNG, \.\.\.\) but no class folders"):
        open_image_folder(tmp_path, "training")


def test_loose_images_for_evaluation_point_at_predict(tmp_path):
    from sanet.engine.data import open_image_folder

    (tmp_path / "x.jpg").write_bytes(b"")
    with pytest.raises(FileNotFoundError) as info:
        open_image_folder(tmp_path, "evaluation")
    assert str(info.value).endswith("; sanet predict classifies images without labels")
    with pytest.raises(FileNotFoundError) as info:
        open_image_folder(tmp_path, "training")
    assert "sanet predict" not in str(info.value)


@pytest.mark.parametrize("what, hint", [
    ("training", "every class needs images in train/ and val/ (labels are class-folder indices)"),
    ("validation", "every class needs images in train/ and val/ (labels are class-folder indices)"),
    ("evaluation", "every class folder needs images"),
])
def test_an_empty_class_folder_says_what_every_class_needs(tmp_path, what, hint):
    from sanet.engine.data import open_image_folder

    root = make_imagefolder(tmp_path / "d", classes=("a",), per_class=2, splits={"train": 2}) / "train"
    (root / "b").mkdir()
    with pytest.raises(FileNotFoundError) as info:
        open_image_folder(root, what)
    assert f"{what} folder {root}: class folder(s) ['b'] hold no images" in str(info.value)
    assert f"; {hint}: add images or remove the folder" in str(info.value)


def test_an_empty_hidden_folder_is_not_named_among_the_empty_classes(tmp_path):
    from sanet.engine.data import open_image_folder

    root = make_imagefolder(tmp_path / "d", classes=("a",), per_class=2, splits={"train": 2}) / "train"
    (root / "b").mkdir()
    (root / ".ipynb_checkpoints").mkdir()
    with pytest.raises(FileNotFoundError) as info:
        open_image_folder(root, "training")
    assert "class folder(s) ['b'] hold no images" in str(info.value)


def test_class_mismatch_names_each_side_or_none():
    from sanet.engine.data import check_same_classes

    check_same_classes(["a", "b"], ["a", "b"])
    with pytest.raises(ValueError) as info:
        check_same_classes(["a", "b", "c"], ["a", "b"])
    assert "only in train: ['c']; only in val: none (3 vs 2 classes)" in str(info.value)
    with pytest.raises(ValueError) as info:
        check_same_classes(["a"], ["a", "z"])
    assert "only in train: none; only in val: ['z'] (1 vs 2 classes)" in str(info.value)


@pytest.mark.parametrize("size, crop, refused", [
    (4096, 1.0, None),
    (4097, 1.0, "image size 4097 (--img-size, else the training run's or the model's) is above the 4096 pixels"),
    (64, 0.25, None),
    (64, 0.2499, "crop_pct 0.2499 (--crop-pct, else the training run's or the model's) resizes images to 256 pixels"),
])
def test_eval_resize_bounds_are_inclusive(size, crop, refused):
    from sanet.engine.data import check_eval_resize

    config = {"input_size": (3, size, size), "crop_pct": crop}
    if refused is None:
        check_eval_resize(config)
    else:
        with pytest.raises(ValueError) as info:
            check_eval_resize(config)
        assert refused in str(info.value)


def test_a_batch_larger_than_the_shards_counts_the_global_batch():
    from sanet.engine.data import build_train_loader
    from sanet.engine.distributed import DistContext

    with pytest.raises(ValueError) as info:  # 5 images over 2 processes: 3 and 2 (ceil: 3 per process)
        build_train_loader(list(range(5)), 4, workers=0, ctx=DistContext(rank=1, world_size=2), seed=0)
    assert str(info.value).startswith("batch size 4 per process x 2 process(es) = 8 exceeds the 5 training "
                                      "images (3 per process): no full batch. Use --batch-size 3 or less")
    loader = build_train_loader(list(range(5)), 3, workers=0, ctx=DistContext(rank=1, world_size=2), seed=0)
    assert len(loader) == 1


def test_eval_shards_split_the_images_without_padding():
    """5 images over 2 processes: 3 and 2, each image once (DistributedSampler would repeat one)."""
    from sanet.engine.data import build_eval_loader
    from sanet.engine.distributed import DistContext

    shards = [list(build_eval_loader(list(range(5)), 2, workers=0, ctx=DistContext(rank=r, world_size=2)).sampler)
              for r in range(2)]
    assert shards == [[0, 2, 4], [1, 3]]
    batches = list(build_eval_loader([(torch.tensor([float(i)]), i) for i in range(5)], 2, workers=0,
                                     ctx=DistContext(rank=1, world_size=2)))
    assert [(b[1].tolist(), b[2]) for b in batches] == [([1, 3], 0)]


# --- distributed ------------------------------------------------------------------------------

def _fake_gpus(monkeypatch, count: int) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)


def test_auto_device_is_the_local_ranks_gpu_when_there_is_one(monkeypatch):
    from sanet.engine.distributed import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto", 1) == torch.device("cpu")
    _fake_gpus(monkeypatch, 2)
    assert resolve_device("auto", 1) == torch.device("cuda", 1)
    assert resolve_device("cpu", 1) == torch.device("cpu")


def test_an_unknown_device_choice_is_named():
    from sanet.engine.distributed import resolve_device

    with pytest.raises(ValueError, match=r"--device must be one of auto, cuda, cpu, got 'gpu'"):
        resolve_device("gpu")


@pytest.mark.parametrize("choice, backend, device", [
    ("cuda", "nccl", torch.device("cuda", 1)),
    ("cpu", "gloo", torch.device("cpu")),
])
def test_a_torchrun_job_is_joined_from_its_environment(monkeypatch, choice, backend, device):
    """WORLD_SIZE > 1: init_process_group (env://) with NCCL on a GPU, gloo on CPU; the context
    takes rank and world size from the group and LOCAL_RANK from the environment."""
    from sanet.engine.distributed import DistContext, init_distributed

    _fake_gpus(monkeypatch, 2)
    calls = []
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls.append(("set_device", d)))
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda **kw: calls.append(("init", kw)))
    monkeypatch.setattr(dist, "get_rank", lambda: 3)
    monkeypatch.setattr(dist, "get_world_size", lambda: 4)
    ctx = init_distributed(choice)
    assert ctx == DistContext(rank=3, world_size=4, local_rank=1, device=device)
    assert ctx.distributed and not ctx.is_main
    init = {"backend": backend, "device_id": device if choice == "cuda" else None}
    assert calls == ([("set_device", device)] if choice == "cuda" else []) + [("init", init)]
    calls.clear()
    monkeypatch.setattr(dist, "is_initialized", lambda: True)  # joined already (e.g. by the caller): not again
    assert init_distributed(choice) == ctx
    assert calls == ([("set_device", device)] if choice == "cuda" else [])


def test_a_single_process_does_not_join_a_group(monkeypatch):
    from sanet.engine.distributed import DistContext, init_distributed

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setattr(dist, "init_process_group", lambda **kw: pytest.fail("joined a group"))
    assert init_distributed("cpu") == DistContext()


def test_all_reduce_sum_without_a_context_reduces_over_the_group(monkeypatch):
    from sanet.engine.distributed import DistContext, all_reduce_sum

    def all_reduce(tensor, op):  # a group of 3 processes holding the same values
        assert op == dist.ReduceOp.SUM
        tensor.mul_(3)

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "all_reduce", all_reduce)
    assert all_reduce_sum(torch.tensor([1.0, 2.0])).tolist() == [3.0, 6.0]
    assert all_reduce_sum(torch.tensor([1.0, 2.0]), DistContext(world_size=3)).tolist() == [3.0, 6.0]
    assert all_reduce_sum(torch.tensor([1.0, 2.0]), DistContext()).tolist() == [1.0, 2.0]


# --- resume -----------------------------------------------------------------------------------

def test_resume_without_last_pt_says_why(tmp_path):
    from sanet.engine.state import load_resume_checkpoint

    (tmp_path / "log.csv").write_text("epoch\n")
    with pytest.raises(FileNotFoundError, match="stopped before its first checkpoint"):
        load_resume_checkpoint(tmp_path, "sa_resnet_test", ["a", "b"])
    (tmp_path / "best.pt").write_bytes(b"")  # a best.pt: not a run stopped before its 1st checkpoint
    with pytest.raises(FileNotFoundError) as info:
        load_resume_checkpoint(tmp_path, "sa_resnet_test", ["a", "b"])
    assert f"--resume: {tmp_path / 'last.pt'} not found" in str(info.value)
    assert "first checkpoint" not in str(info.value)
    # a plain start refuses a folder with best.pt: the message must not send the user there
    assert "holds best.pt" in str(info.value) and "--overwrite" in str(info.value)
    assert "start without --resume" not in str(info.value)


@pytest.mark.parametrize("ckpt", [{"model": {}}, {"epoch": 1}, [1, 2]])
def test_resume_refuses_a_file_that_is_not_a_training_checkpoint(tmp_path, ckpt):
    from sanet.engine.state import load_resume_checkpoint

    if isinstance(ckpt, dict):
        ckpt.update(arch="sa_resnet_test", class_names=["a", "b"])
    torch.save(ckpt, tmp_path / "last.pt")
    with pytest.raises(ValueError, match=r"last\.pt is not a sanet train checkpoint"):
        load_resume_checkpoint(tmp_path, "sa_resnet_test", ["a", "b"])


# --- run folder -------------------------------------------------------------------------------

def test_restore_removes_what_the_new_run_wrote_and_puts_the_old_files_back(tmp_path):
    from sanet.engine.run_dir import REPLACED_DIR, restore_replaced

    assert restore_replaced(tmp_path) is False  # nothing moved aside
    replaced = tmp_path / REPLACED_DIR
    replaced.mkdir()
    (replaced / "last.pt").write_text("old last")
    (replaced / "tb").mkdir()
    (replaced / "tb" / "old").write_text("old events")
    (tmp_path / "log.csv").write_text("new log")  # the old run had none
    (tmp_path / "curves.png").write_text("new curves")
    (tmp_path / "tb").mkdir()
    (tmp_path / "tb" / "new").write_text("new events")
    (tmp_path / "mine.txt").write_text("not a run file")
    assert restore_replaced(tmp_path) is True
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt", "mine.txt", "tb"]
    assert (tmp_path / "last.pt").read_text() == "old last"
    assert [p.name for p in (tmp_path / "tb").iterdir()] == ["old"]


def test_a_best_pt_that_is_not_a_checkpoint_dict_is_replaced_on_resume(tmp_path):
    """best.pt holding a list (not ours): replaced by last.pt when last.pt is the best epoch."""
    from sanet.engine.state import restore_best_checkpoint

    last = {"epoch": 3, "best_epoch": 3, "model": {"w": torch.ones(2)}}
    torch.save(last, tmp_path / "last.pt")
    torch.save([1, 2], tmp_path / "best.pt")
    assert restore_best_checkpoint(tmp_path, last)
    assert torch.load(tmp_path / "best.pt", weights_only=True)["epoch"] == 3


def test_sigterm_is_left_alone_when_there_is_no_previous_run_to_restore(tmp_path):
    import signal

    from sanet.engine.run_dir import REPLACED_DIR, overwrite_guard

    before = signal.getsignal(signal.SIGTERM)
    with overwrite_guard(tmp_path, active=True) as checkpointed:  # a fresh run: nothing moved aside
        assert signal.getsignal(signal.SIGTERM) is before
        checkpointed()
    (tmp_path / REPLACED_DIR).mkdir()
    with overwrite_guard(tmp_path, active=False):  # not the process that moved it (rank > 0)
        assert signal.getsignal(signal.SIGTERM) is before
    with overwrite_guard(tmp_path, active=True) as checkpointed:
        assert signal.getsignal(signal.SIGTERM) is not before  # restores on SIGTERM until the checkpoint
        checkpointed()
        assert signal.getsignal(signal.SIGTERM) is before
    assert not (tmp_path / REPLACED_DIR).exists()


def test_overwrite_moves_aside_only_a_run_that_is_there(tmp_path):
    from sanet.engine.run_dir import REPLACED_DIR, prepare_output

    fresh = tmp_path / "fresh"
    assert prepare_output(fresh, overwrite=True) == []
    assert fresh.is_dir() and list(fresh.iterdir()) == []  # no empty .replaced-run to report later
    old = tmp_path / "old"
    old.mkdir()
    (old / "log.csv").write_text("old log")
    (old / "notes.txt").write_text("not a run file")
    assert prepare_output(old, overwrite=True) == []
    assert sorted(p.name for p in old.iterdir()) == [REPLACED_DIR, "notes.txt"]
    assert [p.name for p in (old / REPLACED_DIR).iterdir()] == ["log.csv"]

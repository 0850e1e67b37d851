"""The memory accounting the benchmarks report: saved-for-backward and peak live bytes."""
from __future__ import annotations

import torch

from sanet.analysis.memory import PeakMemoryTracker, saved_tensor_bytes


def test_peak_counts_allocations_not_views_of_older_tensors():
    x = torch.randn(64, 64)  # 16 KiB allocated before the tracker
    with PeakMemoryTracker() as tracker:
        v = x.view(4096)[::2]   # views of x: nothing new
        x.mul_(2.0)             # in place: nothing new
        torch.mul(x, 2.0, out=x)
        y = x * 2.0             # a new 16 KiB tensor
        z = y + 1.0             # and another, alive at the same time
        del y, z, v
    assert tracker.peak == 2 * x.numel() * x.element_size()
    assert tracker.current == 0  # freed storages are subtracted


def test_saved_bytes_count_each_storage_once():
    x = torch.randn(32, 32, requires_grad=True)
    out = saved_tensor_bytes(lambda: (x * x).sum())  # mul saves x twice: one storage
    assert out["tensors"] == 2 and out["storages"] == 1
    assert out["bytes"] == x.numel() * x.element_size()


def test_saved_views_of_one_storage_count_once():
    """SA's halves are chunk views at an offset into one storage: one storage, its bytes."""
    x = torch.randn(2, 64, 8, 8, requires_grad=True)
    out = saved_tensor_bytes(lambda: (lambda a, b: (a * b).sum())(*x.chunk(2, dim=1)))
    assert out["tensors"] == 2 and out["storages"] == 1
    assert out["bytes"] == x.numel() * x.element_size()


def test_saved_bytes_without_the_excluded_storages():
    lin = torch.nn.Linear(64, 32)
    x = torch.randn(8, 64, requires_grad=True)
    out = saved_tensor_bytes(lambda: torch.relu(lin(x)).sum(), exclude=list(lin.parameters()))
    weight = lin.weight.numel() * lin.weight.element_size()
    # linear saves x and the weight (as a view), relu its output; the weight is the model's
    assert out["bytes"] - out["activation_bytes"] == weight
    assert out["activation_bytes"] == (8 * 64 + 8 * 32) * 4
    assert saved_tensor_bytes(lambda: lin(x).sum())["activation_bytes"] == \
        saved_tensor_bytes(lambda: lin(x).sum())["bytes"]  # nothing excluded: the same


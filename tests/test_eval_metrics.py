"""``sanet.engine.evaluate``'s sums: whole image counts, whatever the batch split; non-finite
outputs, skipped images and throughput counted as documented."""
from __future__ import annotations

from types import SimpleNamespace

import torch
from torch import nn

from sanet.engine.distributed import DistContext
from sanet.engine.evaluate import evaluate


class _Fixed(nn.Module):
    """Returns the logits it was given as its input (the 'images')."""

    def forward(self, x):
        return x


def _loader(logits, targets, sizes):
    batches, start = [], 0
    for n in sizes:
        batches.append((logits[start:start + n], targets[start:start + n], 0))
        start += n
    return batches


def _expected(logits, targets, k):
    """Top-k accuracy of the whole set at once, in percent."""
    top = logits.topk(k, dim=1).indices.eq(targets[:, None]).any(dim=1)
    return 100.0 * int(top.sum()) / targets.numel()


def test_accuracy_is_exact_and_independent_of_the_batch_split():
    g = torch.Generator().manual_seed(0)
    for trial in range(20):
        n, classes = 14, 7
        logits = torch.randn(n, classes, generator=g)
        targets = torch.randint(0, classes, (n,), generator=g)
        results = [evaluate(_Fixed(), _loader(logits, targets, sizes), DistContext())
                   for sizes in ((7, 7), (1, 13), (5, 4, 5), (14,))]
        for r in results:
            # equal, not close: best.pt is replaced only on a strictly better top-1
            assert r["top1"] == _expected(logits, targets, 1)
            assert r["top5"] == _expected(logits, targets, 5)
            assert r["images"] == n
            # the mean over images, not over batches (of 1 and 13 images, say)
            want = torch.nn.functional.cross_entropy(logits, targets).item()
            assert abs(r["loss"] - want) <= 1e-6 * max(1.0, want)
        assert len({r["top1"] for r in results}) == 1


def test_top5_with_fewer_than_five_classes_counts_every_image():
    logits = torch.randn(9, 3)
    targets = torch.randint(0, 3, (9,))
    r = evaluate(_Fixed(), _loader(logits, targets, (4, 5)), DistContext())
    assert r["top5"] == 100.0
    assert r["top1"] == _expected(logits, targets, 1)


def test_an_image_with_any_non_finite_logit_counts_as_non_finite():
    """One NaN class makes the image's ranking meaningless, not only an all-NaN row."""
    logits = torch.randn(6, 4)
    logits[1, 2] = float("nan")
    logits[4, 0] = float("inf")
    logits[5] = float("nan")
    r = evaluate(_Fixed(), _loader(logits, torch.zeros(6, dtype=torch.long), (4, 2)), DistContext())
    assert r["nonfinite"] == 3 and r["images"] == 6


def test_skipped_images_count_in_batches_with_no_readable_image():
    """A batch whose images were all unreadable arrives empty; its skips still count."""
    logits, targets = torch.randn(3, 4), torch.tensor([0, 1, 2])
    loader = [(logits[:2], targets[:2], 1), (torch.empty(0, 4), torch.empty(0, dtype=torch.long), 2),
              (logits[2:], targets[2:], 0)]
    r = evaluate(_Fixed(), loader, DistContext())
    assert r["skipped"] == 3 and r["images"] == 3


def test_throughput_leaves_out_the_first_batch(monkeypatch):
    """Images per second after the first batch (which pays for one-time setup), on a clock
    that only the model's calls move: 10 s for the first batch, then 1 s per batch of 4."""
    import sanet.engine.evaluate as evaluate_mod

    clock = {"t": 0.0, "calls": 0}

    class _Timed(nn.Module):
        def forward(self, x):
            clock["calls"] += 1
            clock["t"] += 10.0 if clock["calls"] == 1 else 1.0
            return x

    monkeypatch.setattr(evaluate_mod, "time", SimpleNamespace(perf_counter=lambda: clock["t"]))
    logits, targets = torch.randn(12, 5), torch.randint(0, 5, (12,))
    r = evaluate(_Timed(), _loader(logits, targets, (4, 4, 4)), DistContext())
    assert r["images_per_s"] == 8 / 2.0 and r["seconds"] == 12.0

"""``sanet.engine.evaluate``'s sums: whole image counts, whatever the batch split."""
from __future__ import annotations

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

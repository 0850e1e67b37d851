"""Run logs on rank 0: the CSV log, TensorBoard events and the training-curves PNG.

The history (one dict per epoch) also lives in the checkpoint. An epoch's row is written
before its ``last.pt`` (the commit point), so after a kill between the two the CSV holds one
epoch more than the checkpoint; the resume redoes that epoch and rewrites the CSV from the
checkpoint's history, and TensorBoard drops the redone epoch's events (``purge_step``).
"""
from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any, Dict, List, Optional

__all__ = ["RunLogger", "write_csv", "load_plotting", "plot_curves"]


def write_csv(history: List[Dict[str, Any]], path: Path) -> None:
    """The whole history as CSV (rewritten each epoch: small, and always consistent)."""
    from sanet.checkpoint import atomic_write

    fields: List[str] = []
    for row in history:
        fields += [k for k in row if k not in fields]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields)
    writer.writeheader()
    writer.writerows(history)

    def write(tmp: str) -> None:
        Path(tmp).write_text(buf.getvalue())

    atomic_write(path, write)


class RunLogger:
    """CSV + TensorBoard for one run (construct on rank 0 only)."""

    def __init__(self, out: Path, start_epoch: int) -> None:
        # imported now: a missing tensorboard fails the run before it trains, not after epoch 1
        from torch.utils.tensorboard import SummaryWriter

        self._summary_writer = SummaryWriter
        self.out = out
        self.start_epoch = start_epoch
        self.tb = None  # made at the first logged epoch (see _writer)

    def _writer(self):
        """The SummaryWriter, made on first use: a run that fails before its first epoch ends
        leaves no events file with nothing in it (and no ``tb/`` folder in a new run)."""
        if self.tb is None:
            # purge_step drops events a killed run wrote for epochs that are being redone
            self.tb = self._summary_writer(log_dir=str(self.out / "tb"), purge_step=self.start_epoch + 1)
        return self.tb

    def log_epoch(self, history: List[Dict[str, Any]]) -> None:
        row = history[-1]
        step = int(row["epoch"])
        tb = self._writer()
        for key, value in row.items():
            if key != "epoch" and isinstance(value, (int, float)):
                group = "train" if key.startswith(("train_", "lr")) else "val"
                tb.add_scalar(f"{group}/{key}", value, step)
        tb.flush()
        write_csv(history, self.out / "log.csv")

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def load_plotting():
    """matplotlib's pyplot on the Agg backend (no display needed); its first import takes
    seconds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_curves(history: List[Dict[str, Any]], path: Path, title: Optional[str] = None) -> Path:
    """Loss and accuracy per epoch as a PNG (matplotlib, Agg backend: no display needed)."""
    plt = load_plotting()
    from matplotlib.ticker import MaxNLocator

    epochs = [row["epoch"] for row in history]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    series = {ax_loss: ("train_loss", "val_loss", "val_loss_ema"),
              ax_acc: ("val_top1", "val_top5", "val_top1_ema")}
    for ax, keys in series.items():
        for key in keys:
            values = [row.get(key) for row in history]
            if any(v is not None for v in values):
                ax.plot(epochs, values, marker="o", markersize=3, label=key)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs, not 1.2, 1.4, ...
        ax.grid(alpha=0.3)
        ax.legend()
    ax_loss.set_ylabel("loss")
    ax_acc.set_ylabel("accuracy (%)")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    from sanet.checkpoint import atomic_write

    try:  # atomically: a kill mid-write leaves the previous epoch's picture, not half a PNG
        atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    finally:
        plt.close(fig)
    return path

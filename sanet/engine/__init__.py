"""Training and evaluation engine behind ``sanet train``, ``sanet eval`` and ``sanet predict``.

One concept per module: ``config`` (arguments), ``data`` (ImageFolder + timm transforms +
loaders), ``modeling`` (model creation and safe weight loading), ``optim`` (timm optimizer,
scheduler, loss, mixup), ``loop`` (one epoch), ``evaluate``, ``state`` (seeding and
checkpoints), ``distributed`` (torchrun/DDP), ``logs`` (CSV, TensorBoard, curves),
``trainer`` (the whole run), ``predict``.
"""
from .trainer import fit

__all__ = ["fit"]

"""sanet: Shuffle Attention (SA-Net, Zhang & Yang, ICASSP 2021) for PyTorch and timm.

``import sanet`` registers the SA-ResNet family in timm's model registry.
"""
from .layers import (
    ShuffleAttention,
    channel_shuffle,
    fit_sa_groups,
    shuffle_attention_reference,
    shuffle_attention_torch,
    valid_sa_groups,
)

from . import checkpoint  # sanet.checkpoint.load_weights etc. after a plain `import sanet`
from .checkpoint import UnsafeCheckpointError, load_weights
from .errors import SanetError, SanetWarning
from .models import SA_MODELS, CheckpointMismatchError, SABasicBlock, SABottleneck, checkpoint_filter_fn

__version__ = "0.1.0"

__all__ = [
    "CheckpointMismatchError",
    "SABasicBlock",
    "SABottleneck",
    "SA_MODELS",
    "SanetError",
    "SanetWarning",
    "ShuffleAttention",
    "UnsafeCheckpointError",
    "checkpoint_filter_fn",
    "__version__",
    "channel_shuffle",
    "fit_sa_groups",
    "load_weights",
    "shuffle_attention_reference",
    "shuffle_attention_torch",
    "valid_sa_groups",
]

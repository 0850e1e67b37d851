"""SA models, registered in timm's registry on import."""
from .blocks import SABasicBlock, SABottleneck
from .checkpoint_filter import CheckpointMismatchError, check_state_dict, checkpoint_filter_fn, strip_prefix
from .sa_resnet import AUTHORS_URL, SA_MODELS, weights_help

__all__ = [
    "AUTHORS_URL",
    "CheckpointMismatchError",
    "SABasicBlock",
    "SABottleneck",
    "SA_MODELS",
    "check_state_dict",
    "checkpoint_filter_fn",
    "strip_prefix",
    "weights_help",
]

"""SA models, registered in timm's registry on import."""
from .blocks import SABasicBlock, SABottleneck
from .checkpoint_filter import (CheckpointMismatchError, cfg_from_weights, check_state_dict, checkpoint_filter_fn,
                                sa_groups_of, strip_prefix, weights_of, with_sa_groups_of)
from .sa_resnet import AUTHORS_URL, AUTHORS_WEIGHTS, SA_MODELS, weights_help

__all__ = [
    "AUTHORS_URL",
    "AUTHORS_WEIGHTS",
    "CheckpointMismatchError",
    "SABasicBlock",
    "SABottleneck",
    "SA_MODELS",
    "cfg_from_weights",
    "check_state_dict",
    "checkpoint_filter_fn",
    "sa_groups_of",
    "strip_prefix",
    "weights_help",
    "weights_of",
    "with_sa_groups_of",
]

"""Layers: the Shuffle Attention module and its functional forms."""
from .groups import check_sa_groups, fit_sa_groups, valid_sa_groups
from .sa_functional import (
    channel_shuffle,
    check_sa_input,
    shuffle_attention_reference,
    shuffle_attention_torch,
)
from .shuffle_attention import SA_IMPLS, ShuffleAttention

__all__ = [
    "SA_IMPLS",
    "ShuffleAttention",
    "channel_shuffle",
    "check_sa_groups",
    "check_sa_input",
    "fit_sa_groups",
    "shuffle_attention_reference",
    "shuffle_attention_torch",
    "valid_sa_groups",
]

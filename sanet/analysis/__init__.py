"""Analysis tools: model complexity, benchmarks, saved-tensor memory."""
from .complexity import count_flops, count_params, model_summary

__all__ = ["count_flops", "count_params", "model_summary"]

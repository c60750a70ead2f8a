"""How Vertex's tuning parameters become a TuneConfig: batch size and learning rate rules."""
from __future__ import annotations

from components.common.model_catalog import ResolvedModel

# Batch size by model context class and accelerator (SPEC.md, from the seeds): 8k models tune
# with 8 examples per step on GPU (us-central1) and 24 on TPU (europe-west4); 32k models with 8.
BATCH_SIZES = {("8k", "GPU"): 8, ("8k", "TPU"): 24, ("32k", "GPU"): 8, ("32k", "TPU"): 8}
ACCELERATOR_TYPES = ("GPU", "TPU")


def batch_size_for(context_class: str, accelerator_type: str) -> int:
    """Examples per optimizer step for a model class on an accelerator type."""
    accelerator = accelerator_type.upper()
    if accelerator not in ACCELERATOR_TYPES:
        raise ValueError(f"accelerator_type must be GPU or TPU, got {accelerator_type!r}")
    if context_class not in ("8k", "32k"):
        raise ValueError(f"max_context_length must be 8k or 32k, got {context_class!r}")
    return BATCH_SIZES[(context_class, accelerator)]


def context_class(model: ResolvedModel, max_context_length: str) -> str:
    """``max_context_length`` when given, else what the model name implies."""
    return max_context_length or model.context_class


def learning_rate(model: ResolvedModel, learning_rate_multiplier: float) -> float:
    """The catalog's recommended learning rate for the model times the multiplier."""
    if learning_rate_multiplier <= 0:
        raise ValueError(f"learning_rate_multiplier must be positive, got {learning_rate_multiplier}")
    return model.recommended_learning_rate * learning_rate_multiplier

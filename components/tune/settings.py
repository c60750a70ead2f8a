"""How Vertex's tuning parameters become a TuneConfig: batch size, learning rate, steps, adapters.

Batch size (Vertex's rule, docs/parameters.md): 8k models tune with 8 examples per optimizer
step on GPU (us-central1) and 24 on TPU (europe-west4); 32k models with 8 on both. Examples seen =
``train_steps x batch size``. A local run keeps the rule of its ``accelerator_type`` (GPU, the
default: 8). The environment variable ``TUNEPIPE_BATCH_SIZE`` (a positive integer) overrides the
rule everywhere, e.g. to tune a small model quickly on a laptop; the batch size used is recorded
with the tuned model.

Learning rate: every catalog model has a recommended learning rate
(``CatalogEntry.recommended_learning_rate``; for a local folder or GGUF file
``DEFAULT_LORA_LEARNING_RATE``); the run uses it times ``learning_rate_multiplier``. The
recommendation is for LoRA (all linear layers, alpha = 2 x rank): 1e-3 for the embedded
SmolLM2-135M-Instruct, within the 1e-4 to 2e-3 range usual for LoRA on small models. Full
fine-tuning updates every weight and wants a much smaller rate: the recommendation times
``FULL_FINE_TUNING_LR_SCALE`` (2e-5 for SmolLM2-135M).

Adapter size (Vertex's and Gemini's ``adapterSize``) is the LoRA rank: 1, 4, 8 (default) or 16.
``method="full"`` tunes every weight instead (``adapter_size`` is then ignored).

Epochs (Gemini's ``epochCount``) become steps with :func:`steps_for_epochs`.
"""
from __future__ import annotations

import math
import os
from fractions import Fraction

from components.common.accelerators import check_accelerator_type
from components.common.model_catalog import ResolvedModel

BATCH_SIZES = {("8k", "GPU"): 8, ("8k", "TPU"): 24, ("32k", "GPU"): 8, ("32k", "TPU"): 8}
BATCH_SIZE_ENV = "TUNEPIPE_BATCH_SIZE"
FULL_FINE_TUNING_LR_SCALE = 0.02
ADAPTER_SIZES = (1, 4, 8, 16)
DEFAULT_ADAPTER_SIZE = 8
METHODS = ("lora", "full")
# Gemini's adapterSize enum values (seed 004 passes "ADAPTER_SIZE" as a string).
GEMINI_ADAPTER_SIZES = {"ADAPTER_SIZE_ONE": 1, "ADAPTER_SIZE_FOUR": 4, "ADAPTER_SIZE_EIGHT": 8,
                        "ADAPTER_SIZE_SIXTEEN": 16}


def batch_size_for(context_class: str, accelerator_type: str) -> int:
    """Examples per optimizer step for a model class on an accelerator type (Vertex's rule)."""
    accelerator = check_accelerator_type(accelerator_type)
    if context_class not in ("8k", "32k"):
        raise ValueError(f"max_context_length must be 8k or 32k, got {context_class!r}")
    return BATCH_SIZES[(context_class, accelerator)]


def batch_size(context_class: str, accelerator_type: str) -> int:
    """Vertex's batch size, unless ``TUNEPIPE_BATCH_SIZE`` sets one."""
    rule = batch_size_for(context_class, accelerator_type)  # validates the parameters either way
    override = os.environ.get(BATCH_SIZE_ENV, "").strip()
    if not override:
        return rule
    if not override.isdigit() or int(override) < 1:
        raise ValueError(f"{BATCH_SIZE_ENV} must be a positive integer, got {override!r}")
    return int(override)


def learning_rate(model: ResolvedModel, learning_rate_multiplier: float, method: str = "lora") -> float:
    """The model's recommended learning rate (scaled for full fine-tuning) times the multiplier."""
    if learning_rate_multiplier <= 0:
        raise ValueError(f"learning_rate_multiplier must be positive, got {learning_rate_multiplier}")
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    scale = FULL_FINE_TUNING_LR_SCALE if method == "full" else 1.0
    return model.recommended_learning_rate * scale * learning_rate_multiplier


def steps_for_epochs(epochs: float, num_examples: int, batch_size: int) -> int:
    """Optimizer steps that show the model ``epochs`` passes over ``num_examples`` examples:
    ``ceil(epochs x num_examples / batch_size)`` (the last step may start the next epoch)."""
    if epochs <= 0:
        raise ValueError(f"epochCount must be positive, got {epochs}")
    if num_examples < 1 or batch_size < 1:
        raise ValueError("steps_for_epochs needs at least one example and a positive batch size")
    # Exact arithmetic on the decimal the user wrote: 0.1 epoch of 30 examples at batch size 3 is
    # one step, not ceil(1.0000000000000002) = 2.
    return max(1, math.ceil(Fraction(str(epochs)) * num_examples / batch_size))


def adapter_size(value) -> int:
    """A LoRA rank from Vertex's or Gemini's adapter size: 1, 4, 8, 16, '8' or
    'ADAPTER_SIZE_EIGHT'; empty, None or 'ADAPTER_SIZE_UNSPECIFIED' give the default (8)."""
    if value in (None, "", "ADAPTER_SIZE_UNSPECIFIED"):
        return DEFAULT_ADAPTER_SIZE
    if isinstance(value, str) and value.strip().upper() in GEMINI_ADAPTER_SIZES:
        return GEMINI_ADAPTER_SIZES[value.strip().upper()]
    try:
        size = int(value)
    except (TypeError, ValueError):
        size = None
    if size not in ADAPTER_SIZES:
        raise ValueError(f"adapter size must be one of {ADAPTER_SIZES} (or "
                         f"{', '.join(GEMINI_ADAPTER_SIZES)}), got {value!r}")
    return size

"""The accelerator types a tuning run names (the templates' ``accelerator_type``): one list and
one spelling rule for the parameter checks, the tuner, the templates and the service.

``GPU`` tunes on Vertex's A100 machine (8 examples a step), ``TPU`` on its TPU v3 pod (24 a step
for 8k models); locally the type sets only the batch size. Spelled exactly: ``gpu`` is refused
with the spelling to use, never taken for the other type.
"""
from __future__ import annotations

ACCELERATOR_TYPES = ("GPU", "TPU")
DEFAULT_ACCELERATOR_TYPE = "GPU"


def accelerator_type_problem(value: object) -> str | None:
    """Why ``value`` is not an accelerator type (None when it is one)."""
    if value in ACCELERATOR_TYPES:
        return None
    spelled = str(value).strip().upper()
    hint = f" (write {spelled!r})" if spelled in ACCELERATOR_TYPES else ""
    return f"accelerator_type {value!r} is not 'GPU' or 'TPU'{hint}"


def check_accelerator_type(value: object) -> str:
    """``value`` when it is an accelerator type; ValueError saying why not."""
    problem = accelerator_type_problem(value)
    if problem:
        raise ValueError(problem)
    return value

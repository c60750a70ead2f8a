"""What every benchmark's last line names besides its numbers: the machine and the dtype.

A ``BENCH`` line ends with ``capability=<CPU> dtype=<compute dtype>``, e.g.
``capability=AVX2 dtype=float32`` or ``capability=AVX512+AMX dtype=bfloat16``, so a number is
never read against a target meant for another kind of machine.
"""
from __future__ import annotations

import torch

from components.common.precision import cpu_info


def cpu_capability() -> str:
    """torch's CPU capability level, plus the native bf16 unit where there is one (``AVX2``,
    ``AVX512+AMX``, ``AVX512+AVX512_BF16``); one word, so BENCH lines stay ``key=value``."""
    info = cpu_info()
    capability = f"{info.capability}+{info.native_bf16}" if info.native_bf16 else info.capability
    return capability.replace(" ", "_")


def dtype_name(dtype: torch.dtype | str) -> str:
    """``float32``, ``bfloat16``: the dtype without its ``torch.`` prefix."""
    return str(dtype).removeprefix("torch.")


def machine_fields(dtype: torch.dtype | str) -> str:
    """``capability=... dtype=...``: the end of a BENCH line (``dtype=n/a`` where the benchmark
    does no floating-point work)."""
    return f"capability={cpu_capability()} dtype={dtype_name(dtype)}"

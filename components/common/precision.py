"""The compute precision of every component: bfloat16 where the hardware does it fast, else float32.

One rule, used by tune, evaluate, select_checkpoint, the endpoint server and the benchmarks
(:func:`choose_precision`):

- **CUDA**: bfloat16 where the GPU supports it, else float32.
- **XLA (TPU)**: bfloat16.
- **CPU**: bfloat16 only where the CPU has native bf16 matrix instructions (Intel AMX,
  AVX512_BF16, Arm's BF16 extension); elsewhere a short measurement (about 0.1 s, once per
  machine, cached in ``precision.json`` under ``$TUNEPIPE_HOME/cache``) decides: bfloat16 only when bf16 matrix
  products beat float32 ones. A CPU with only AVX2 emulates bf16 products about 40-60 times more
  slowly than it multiplies in float32 (2-core AMD EPYC, AVX2: 1.3 against 57 GFLOP/s at
  512x512), so it gets float32.

``TUNEPIPE_PRECISION`` (``auto``, the default, ``bf16`` or ``fp32``) forces it for every
component of a run (the local runner's components inherit the environment). Forcing ``bf16``
where the rule would pick float32 for speed warns; forcing it where the device cannot compute
in bf16 at all (a GPU without bf16) is an error.

Every choice carries its reason, which the tuner log and the run summary print, e.g.
``cpu float32: no native bf16 (AVX2)``.
"""
from __future__ import annotations

import json
import os
import platform
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

PRECISION_ENV = "TUNEPIPE_PRECISION"
PRECISIONS = ("auto", "bf16", "fp32")
MEASURE_SIZE = 256  # square matrices timed by the bf16-versus-fp32 measurement
MEASURE_SECONDS = 0.06  # per dtype, over all rounds
MEASURE_ROUNDS = 3


class SlowPrecisionWarning(UserWarning):
    """bf16 was forced on a device where float32 is faster."""


@dataclass(frozen=True)
class Precision:
    """The compute dtype on a device, and why."""

    device_type: str
    dtype: torch.dtype
    reason: str

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).removeprefix("torch.")

    def describe(self) -> str:
        """E.g. ``cpu float32: no native bf16 (AVX2)``."""
        return f"{self.device_type} {self.dtype_name}: {self.reason}"


@dataclass(frozen=True)
class CpuInfo:
    """What decides the CPU's precision: torch's capability level and native bf16 units."""

    capability: str  # torch.backends.cpu.get_cpu_capability(): AVX2, AVX512, NO AVX, ...
    native_bf16: str | None  # "AMX", "AVX512_BF16", "Arm BF16", or None


def cpu_info() -> CpuInfo:
    """This CPU's capability level and native bf16 matrix instructions, if any."""
    capability = torch.backends.cpu.get_cpu_capability()
    native = None
    if torch.cpu._is_amx_tile_supported():
        native = "AMX"
    elif torch.cpu._is_avx512_bf16_supported():
        native = "AVX512_BF16"
    elif platform.machine().lower() in ("aarch64", "arm64") and _arm_has_bf16():
        native = "Arm BF16"
    return CpuInfo(capability, native)


def _arm_has_bf16() -> bool:
    """Whether Linux lists Arm's BF16 extension (elsewhere, e.g. macOS, the measurement decides)."""
    try:
        features = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(line.startswith("Features") and " bf16" in line for line in features.splitlines())


def _matmul_gflops(a: torch.Tensor, b: torch.Tensor, seconds: float) -> float:
    a @ b  # warm-up
    runs, started = 0, time.perf_counter()
    while True:
        a @ b
        runs += 1
        elapsed = time.perf_counter() - started
        if elapsed >= seconds:
            return 2 * a.shape[0] * a.shape[1] * b.shape[1] * runs / elapsed / 1e9


def measure_cpu_matmuls(size: int = MEASURE_SIZE, rounds: int = MEASURE_ROUNDS) -> dict[str, float]:
    """GFLOP/s of float32 and bfloat16 matrix products on this CPU: the best of ``rounds``
    alternating timings of each, so that a burst of load from other work cannot decide alone
    (about 0.2 s in all; a slow bf16 product is timed once per round)."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    operands = {"float32": (a, b), "bfloat16": (a.bfloat16(), b.bfloat16())}
    best = dict.fromkeys(operands, 0.0)
    for _ in range(rounds):
        for name, (x, y) in operands.items():
            best[name] = max(best[name], _matmul_gflops(x, y, MEASURE_SECONDS / rounds))
    return best


def _measurement_cache() -> Path:
    from components.common.paths import cache_dir

    return cache_dir() / "precision.json"


def _machine_key(info: CpuInfo) -> str:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        model = platform.processor()
    return f"{model}|{info.capability}|{os.cpu_count()}|torch {torch.__version__}"


def cached_cpu_matmuls(info: CpuInfo, measure: Callable[[], dict[str, float]] = measure_cpu_matmuls
                       ) -> dict[str, float]:
    """The matmul measurement of this machine, measured once and then read from the cache."""
    cache = _measurement_cache()
    key = _machine_key(info)
    try:
        known = json.loads(cache.read_text())
    except (OSError, ValueError):
        known = {}
    if key in known:
        return known[key]
    speeds = measure()
    known[key] = speeds
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        staging = cache.with_name(f"{cache.name}.{os.getpid()}.partial")
        staging.write_text(json.dumps(known, indent=2))
        os.replace(staging, cache)
    except OSError:
        pass  # a read-only home: measure again next time
    return speeds


def requested_precision(requested: str | None = None) -> tuple[str, str]:
    """``(mode, who asked)``: ``requested`` unless it is empty or ``auto``, else
    ``$TUNEPIPE_PRECISION``, else ``auto``."""
    value, source = (requested or "auto").strip().lower(), "precision"
    if value == "auto":
        value, source = os.environ.get(PRECISION_ENV, "").strip().lower() or "auto", PRECISION_ENV
    if value not in PRECISIONS:
        raise ValueError(f"{source} must be one of {', '.join(PRECISIONS)}, got {value!r}")
    return value, source


def _cpu_auto(info: CpuInfo, measure: Callable[[], dict[str, float]]) -> tuple[torch.dtype, str]:
    if info.native_bf16:
        return torch.bfloat16, f"native bf16 ({info.native_bf16})"
    speeds = cached_cpu_matmuls(info, measure)
    measured = f"bf16 {speeds['bfloat16']:.1f} vs fp32 {speeds['float32']:.1f} GFLOP/s"
    if speeds["bfloat16"] > speeds["float32"]:
        return torch.bfloat16, f"bf16 matmuls measured faster ({measured})"
    return torch.float32, f"no native bf16 ({info.capability}; {measured})"


def choose_precision(device: torch.device | str, requested: str | None = None, *,
                     cpu: CpuInfo | None = None,
                     measure: Callable[[], dict[str, float]] = measure_cpu_matmuls) -> Precision:
    """The compute precision on ``device`` (see the module doc).

    ``requested``: ``auto`` (or None: ``$TUNEPIPE_PRECISION``, else auto), ``bf16`` or ``fp32``.
    ``cpu`` and ``measure`` stand in for this CPU's description and its matmul measurement.
    """
    device = torch.device(device)
    mode, source = requested_precision(requested)
    if device.type == "cuda":
        supported = torch.cuda.is_bf16_supported()
        auto = (torch.bfloat16, "GPU supports bf16") if supported else (torch.float32, "GPU without bf16")
    elif device.type == "xla":
        supported, auto = True, (torch.bfloat16, "TPU")
    else:
        supported = True
        auto = _cpu_auto(cpu or cpu_info(), measure) if mode != "fp32" else (torch.float32, "")
    if mode == "fp32":
        return Precision(device.type, torch.float32, f"forced by {source}=fp32")
    if mode == "auto":
        return Precision(device.type, *auto)
    if not supported:
        raise ValueError(f"{source}=bf16, but this {device.type} device has no bfloat16 support")
    if auto[0] != torch.bfloat16:
        warnings.warn(f"{source}=bf16 on a {device.type} where float32 is faster "
                      f"({auto[1]}): expect a much slower run", SlowPrecisionWarning, stacklevel=2)
        return Precision(device.type, torch.bfloat16,
                         f"forced by {source}=bf16, slower than fp32 here ({auto[1]})")
    return Precision(device.type, torch.bfloat16, f"forced by {source}=bf16 ({auto[1]})")

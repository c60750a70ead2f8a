"""Tunepipe's C kernels for x86 CPUs with AVX2 or AVX-512, built once per machine and loaded
with ctypes.

A kernel is one C file of ``components/common`` (with the headers it includes from there),
built by the system's C compiler (``$CC``, else ``cc`` or ``gcc``) into
``$TUNEPIPE_HOME/cache/kernels``, under a name that hashes the sources and flags (about a second,
once). Where there is no compiler, no AVX2 or the build fails, :class:`KernelUnavailable` says
why, and callers keep their PyTorch path. ``TUNEPIPE_C_KERNELS=off`` refuses them on any
machine, to run the PyTorch paths (and their tests) where the kernels would build.

A kernel file may have a variant per instruction set (:data:`ISAS`; ``int8_kernels.c`` has
``avx2`` and ``avx512``, its ``__AVX512F__`` sections), each built as its own library with its
own flags. :func:`kernel_isa` alone decides which runs: ``TUNEPIPE_KERNEL_ISA`` ``auto`` (the
default) takes the best the CPU has; ``avx2`` or ``avx512`` asks for that one (a kernel without
it takes its best below it), refused with a reason on a CPU without it.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from components.common.paths import cache_dir

KERNEL_DIR = Path(__file__).parent
COMPILER_FLAGS = ("-O3", "-fopenmp", "-shared", "-fPIC")  # every variant's, then its own
HEADERS = ("avx2_math.h", "avx512_math.h")  # the headers the kernels share (in each build's hash)
POINTER, INT64, FLOAT, INT = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.c_int
SWITCH_ENV = "TUNEPIPE_C_KERNELS"  # "off": refuse every kernel (module docstring)
ISA_ENV = "TUNEPIPE_KERNEL_ISA"  # auto (default), avx2 or avx512 (module docstring)


@dataclass(frozen=True)
class Isa:
    """An instruction set a kernel has a variant for."""

    key: str  # as TUNEPIPE_KERNEL_ISA names it
    name: str  # as descriptions name it: "int8 kernel (AVX-512)"
    flags: tuple[str, ...]  # the compiler's flags for its variant
    supported: Callable[[], bool]  # whether this CPU has it (whatever ATEN_CPU_CAPABILITY says)


AVX2_FLAGS = ("-mavx2", "-mfma", "-mf16c")
ISAS = {isa.key: isa for isa in (  # weakest first
    Isa("avx2", "AVX2", AVX2_FLAGS, torch.cpu._is_avx2_supported),
    Isa("avx512", "AVX-512", AVX2_FLAGS + ("-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq"),
        torch.cpu._is_avx512_supported),
)}


class KernelUnavailable(RuntimeError):
    """A C kernel cannot run here (no AVX2, no C compiler, or the build failed)."""


@functools.lru_cache(maxsize=None)
def kernel_isa(source_name: str, variants: tuple[str, ...] = ("avx2",)) -> Isa:
    """The variant of ``components/common/<source_name>`` (which has ``variants``, keys of
    :data:`ISAS`) that runs here, by ``TUNEPIPE_KERNEL_ISA`` (module docstring). Raises
    ``KernelUnavailable`` where none can run, ``ValueError`` for an unknown setting. Decided
    once per process (:func:`forget_kernels`)."""
    what = Path(source_name).stem.replace("_", " ")
    setting = os.environ.get(ISA_ENV, "").strip().lower() or "auto"
    if setting not in ("auto", *ISAS):
        raise ValueError(f"{ISA_ENV}={setting!r}: use one of {['auto', *ISAS]}")
    if os.environ.get(SWITCH_ENV, "").strip().lower() == "off":
        raise KernelUnavailable(f"the {what} are turned off ({SWITCH_ENV}=off)")
    if platform.machine().lower() not in ("x86_64", "amd64"):
        raise KernelUnavailable(f"the {what} are for x86-64 CPUs, not {platform.machine()}")
    if setting != "auto" and not ISAS[setting].supported():
        raise KernelUnavailable(f"{ISA_ENV}={setting}, but this CPU has no "
                                f"{ISAS[setting].name}")
    allowed = list(ISAS) if setting == "auto" else list(ISAS)[:list(ISAS).index(setting) + 1]
    usable = [ISAS[key] for key in allowed if key in variants and ISAS[key].supported()]
    if not usable:
        raise KernelUnavailable(f"the {what} need AVX2 (this CPU: "
                                f"{torch.backends.cpu.get_cpu_capability()})")
    return usable[-1]


def load_kernels(source_name: str, signatures: tuple[tuple[str, tuple], ...],
                 variants: tuple[str, ...] = ("avx2",)) -> ctypes.CDLL:
    """The library built from ``components/common/<source_name>`` for the variant that runs
    here (:func:`kernel_isa`; the file has ``variants``), its functions typed by ``signatures``
    (``(name, argument types)`` pairs; they return nothing). Raises ``KernelUnavailable``.
    Built or refused once per process (:func:`forget_kernels`)."""
    library = _built(source_name, signatures, variants)
    if isinstance(library, KernelUnavailable):
        raise library
    return library


def forget_kernels() -> None:
    """Forgets the libraries loaded, the variants chosen and the refusals (for tests that change
    the compiler or the variant)."""
    _built.cache_clear()
    kernel_isa.cache_clear()


@functools.lru_cache(maxsize=None)
def _built(source_name: str, signatures, variants) -> ctypes.CDLL | KernelUnavailable:
    try:
        return _build_and_load(source_name, signatures, kernel_isa(source_name, variants))
    except KernelUnavailable as error:
        return error
    except OSError as error:  # the library does not load
        return KernelUnavailable(f"cannot load {source_name}'s library: {error}")


def _build_and_load(source_name: str, signatures, isa: Isa) -> ctypes.CDLL:
    what = Path(source_name).stem.replace("_", " ")
    flags = COMPILER_FLAGS + isa.flags
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not compiler:
        raise KernelUnavailable(f"no C compiler to build the {what} (set $CC)")
    source = KERNEL_DIR / source_name
    contents = source.read_bytes() + b"".join((KERNEL_DIR / h).read_bytes() for h in HEADERS)
    digest = hashlib.sha256(contents + " ".join(flags).encode()).hexdigest()[:16]
    library = cache_dir() / "kernels" / f"{source.stem}-{isa.key}-{digest}.so"
    if not library.exists():
        library.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=library.parent) as scratch:
            built = Path(scratch) / library.name
            try:
                result = subprocess.run([compiler, *flags, str(source), "-o", str(built),
                                         "-lm"], capture_output=True, text=True)
            except OSError as error:
                raise KernelUnavailable(f"cannot run the C compiler {compiler}: "
                                        f"{error.strerror}") from None
            if result.returncode:
                raise KernelUnavailable(f"building the {what} with {compiler} failed: "
                                        f"{result.stderr.strip()[-500:]}")
            os.replace(built, library)  # atomic: a concurrent build never loads half a file
    loaded = ctypes.CDLL(str(library))
    for name, argument_types in signatures:
        getattr(loaded, name).argtypes = list(argument_types)
        getattr(loaded, name).restype = None
    return loaded


def unavailable_reason(loader) -> str | None:
    """Why ``loader()`` (a kernel library's loader) fails here, or None when it loads (building
    the library if need be)."""
    try:
        loader()
    except KernelUnavailable as error:
        return str(error)
    return None

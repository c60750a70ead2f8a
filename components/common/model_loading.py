"""Loading base models, tokenizers and tuned models onto the local device."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from components.common.model_catalog import resolve_model

TUNED_MODEL_METADATA = "tunepipe_model.json"
ADAPTER_DIR = "adapter"  # a LoRA-tuned model: the PEFT adapter, applied to the base model
FULL_MODEL_DIR = "model"  # a fully fine-tuned model: the whole model (save_pretrained)
TRAINING_STATE = "training_state.pt"  # a checkpoint's resume state; not part of the model


def select_device() -> torch.device:
    """A CUDA GPU when present, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_tokenizer(checkpoint: str | Path):
    """The checkpoint's tokenizer, with a pad token (EOS when it has none) and left padding."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(checkpoint))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer


def load_model_tokenizer(large_model_reference: str):
    """The tokenizer of a model reference and what it resolved to: ``(tokenizer, resolved)``."""
    resolved = resolve_model(large_model_reference)
    return load_tokenizer(resolved.checkpoint), resolved


def load_base_model(checkpoint: str | Path, device: torch.device | str = "cpu",
                    dtype: torch.dtype = torch.float32):
    """A causal LM from a checkpoint folder, in eval mode."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(checkpoint), dtype=dtype)
    return model.to(device).eval()


def read_tuned_model_metadata(model_dir: str | Path) -> dict:
    """The metadata a tuned model folder carries (base model, step, parameters, metrics)."""
    path = Path(model_dir) / TUNED_MODEL_METADATA
    if not path.exists():
        raise FileNotFoundError(f"{model_dir} is not a tuned model folder (no {TUNED_MODEL_METADATA})")
    return json.loads(path.read_text())


def base_checkpoint_of(metadata: dict) -> str:
    """The local base checkpoint of a tuned model, re-resolving its reference if moved."""
    checkpoint = metadata["base_model"]["checkpoint"]
    if (Path(checkpoint) / "config.json").exists():
        return checkpoint
    return resolve_model(metadata["base_model"]["reference"]).checkpoint


def load_tuned_model(model_dir: str | Path, device: torch.device | str = "cpu",
                     dtype: torch.dtype = torch.float32, merge: bool = True):
    """A tuned model folder as ``(model, tokenizer, metadata)``, LoRA-tuned or fully fine-tuned.

    A LoRA folder (``adapter/``) is its base model plus the adapter; with ``merge`` the adapter
    is merged into the base weights (faster inference). A fully fine-tuned folder (``model/``)
    holds the whole model (``merge`` does not apply).
    """
    metadata = read_tuned_model_metadata(model_dir)
    tokenizer = load_tokenizer(model_dir)
    if (Path(model_dir) / FULL_MODEL_DIR).is_dir():
        return load_base_model(Path(model_dir) / FULL_MODEL_DIR, device, dtype), tokenizer, metadata
    from peft import PeftModel

    base = load_base_model(base_checkpoint_of(metadata), device, dtype)
    model = PeftModel.from_pretrained(base, str(Path(model_dir) / ADAPTER_DIR))
    if merge:
        model = model.merge_and_unload()
    return model.to(device).eval(), tokenizer, metadata

"""Checkpoints of a tuning run: written atomically, complete enough to resume exactly.

A tune output folder (the ``tuned_model`` artifact, laid out by
:mod:`components.common.artifacts.tuned_model`) holds::

    checkpoints.json                 the index: every complete checkpoint, the final step, ...
    checkpoints/step-000020/         a tuned model folder, loadable on its own:
        adapter/                       LoRA: the PEFT adapter (adapter_model.safetensors, config)
        model/                         full fine-tuning instead: the whole model (save_pretrained)
        tokenizer files
        tunepipe_model.json            base model, step, tuning parameters, metrics, memory
        training_state.pt              for resuming only (select_checkpoint drops it): optimizer
                                       state, schedule position, data position, early-stopping
                                       state, RNG states
    metrics.jsonl, tensorboard/, loss_curve.png   (training_log)

A checkpoint folder is written under ``step-XXXXXX.partial`` and renamed into place; the index is
written after it (also through a rename), so the index only ever lists complete checkpoints and a
run killed at any moment resumes from the last one listed.

In a distributed run every process takes part in gathering the weights and optimizer state
(``torch.distributed.checkpoint.state_dict``: full, unsharded tensors, whatever DDP or FSDP did
with them) and only rank 0 writes. The optimizer state is keyed by parameter name, so a run can
resume on another number of devices or with the other sharding.
"""
from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch

from components.common.artifacts.tuned_model import checkpoint_dir_name
from components.common.model_loading import (ADAPTER_DIR, FULL_MODEL_DIR, TRAINING_STATE,
                                             TUNED_MODEL_METADATA)
from components.tune.runtime import Runtime, unwrap


def _state_dict_options(**overrides):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **overrides)


def _trainable_names(model: torch.nn.Module) -> set[str]:
    return {name.removeprefix("module.") for name, parameter in model.named_parameters()
            if parameter.requires_grad}


def gather_training_weights(model: torch.nn.Module, optimizer) -> tuple[dict, dict]:
    """The trainable weights and the optimizer state as full CPU tensors keyed by parameter name
    (on rank 0; other ranks get empty dicts). Every process of a distributed run must call it."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    options = _state_dict_options(cpu_offload=True)
    trainable = _trainable_names(model)
    weights = get_model_state_dict(model, options=options)
    weights = {name: tensor for name, tensor in weights.items() if name in trainable}
    return weights, get_optimizer_state_dict(model, optimizer, options=options)


def save_checkpoint(output_dir: Path, step: int, model, optimizer, tokenizer, full: bool,
                    metadata: dict, training_state: dict, runtime: Runtime) -> str:
    """Writes the checkpoint of ``step`` atomically (rank 0); returns its relative folder."""
    weights, optimizer_state = gather_training_weights(model, optimizer)
    relative = checkpoint_dir_name(step)
    if runtime.is_main:
        target = output_dir / relative
        staging = target.with_name(target.name + ".partial")
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        inner = getattr(model, "module", model)  # the PEFT or transformers model
        if full:
            unwrap(model).save_pretrained(staging / FULL_MODEL_DIR, state_dict=weights)
        else:
            inner.save_pretrained(staging / ADAPTER_DIR, state_dict=weights)
        tokenizer.save_pretrained(staging)
        (staging / TUNED_MODEL_METADATA).write_text(json.dumps(metadata, indent=2, sort_keys=True))
        torch.save({**training_state, "optimizer": optimizer_state, "rng": _rng_state()},
                   staging / TRAINING_STATE)
        shutil.rmtree(target, ignore_errors=True)
        os.replace(staging, target)
    runtime.barrier()
    return relative


def restore_checkpoint(checkpoint_dir: Path, model, optimizer, full: bool) -> dict:
    """Loads weights, optimizer state and RNG states from a checkpoint folder into ``model`` and
    ``optimizer`` (every process); returns the checkpoint's training state."""
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    trainable = _trainable_names(model)
    if full:
        saved: dict[str, torch.Tensor] = {}
        for file in sorted((checkpoint_dir / FULL_MODEL_DIR).glob("*.safetensors")):
            saved.update(load_file(str(file)))
        weights = {name: saved[name] for name in trainable if name in saved}
    else:
        saved = load_file(str(checkpoint_dir / ADAPTER_DIR / "adapter_model.safetensors"))
        # PEFT saves a parameter's name without the adapter name ("...lora_A.default.weight"
        # is stored as "...lora_A.weight").
        weights = {name: saved[name.replace(".default.", ".")] for name in trainable}
    missing = trainable - set(weights)
    if missing:
        raise ValueError(f"{checkpoint_dir} lacks {len(missing)} trained weights, e.g. {sorted(missing)[0]}")
    set_model_state_dict(model, weights, options=_state_dict_options(strict=False))
    state = torch.load(checkpoint_dir / TRAINING_STATE, weights_only=False, map_location="cpu")
    set_optimizer_state_dict(model, optimizer, state["optimizer"], options=_state_dict_options())
    _set_rng_state(state["rng"])
    return state


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(),
             "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


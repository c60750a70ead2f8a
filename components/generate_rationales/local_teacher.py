"""A teacher on this machine: a catalog model, a checkpoint folder, a GGUF file or a tuned model.

A tuned model is a folder that tunepipe's tuner or registry wrote (``tunepipe_model.json``: the
base model and a LoRA adapter, which is merged for generation), or ``tuned:NAME[@VERSION]``, a
model of the local registry: a teacher tuned in an earlier run (``make run-distill`` tunes one).

The model is loaded once, in the numerics the endpoint serves in
(:mod:`components.common.serving_numerics`: int8 weights through the kernels where they build),
and answers with the batched generator of :mod:`components.common.generation`:
prompts (the model's chat template over the request's messages) go in chunks of
``CHUNK_BATCHES x batch_size``; each chunk is generated in length-sorted batches with a KV cache
and its answers are reported before the next chunk starts, so an interrupted run loses at most
one chunk.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Sequence

from components.generate_rationales.call_log import Completion
from components.generate_rationales.prompting import TeacherRequest
from components.generate_rationales.teachers import OnAnswer, Teacher, TeacherSettings

DEFAULT_BATCH_SIZE = 32
CHUNK_BATCHES = 4
TUNED_PREFIX = "tuned:"


def tuned_model_dir(reference: str) -> Path | None:
    """The tuned model folder a reference names (``tuned:NAME[@VERSION]`` in the registry, or a
    folder with ``tunepipe_model.json``); None when it names no tuned model. Raises LookupError
    for a ``tuned:`` name the registry lacks."""
    from components.common.model_loading import TUNED_MODEL_METADATA
    from components.common.model_registry import resolve_model_dir

    if reference.startswith(TUNED_PREFIX):
        return resolve_model_dir(reference.removeprefix(TUNED_PREFIX))
    path = Path(reference).expanduser()
    return path if (path / TUNED_MODEL_METADATA).is_file() else None


class LocalTeacher(Teacher):
    """``reference``: a tuned model (:func:`tuned_model_dir`) or anything
    :func:`components.common.model_catalog.resolve_model` takes."""

    kind = "local"

    def __init__(self, reference: str, batch_size: int = DEFAULT_BATCH_SIZE,
                 device: str | None = None):
        from components.common.model_catalog import resolve_model

        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.tuned_dir = tuned_model_dir(reference)
        if self.tuned_dir is not None:
            self.identity = f"tuned {self.tuned_dir}"
        else:
            resolved = resolve_model(reference)
            self.checkpoint, self.identity = resolved.checkpoint, resolved.source
        self.batch_size = batch_size
        self.device = device
        self.description = f"local {self.identity}"
        self._loaded = None

    def _load(self):
        if self._loaded is None:
            import torch

            from components.common.model_loading import (load_base_model, load_tokenizer,
                                                          load_tuned_model, select_device)
            from components.common.serving_numerics import choose_serving_numerics

            device = torch.device(self.device) if self.device else select_device()
            numerics = choose_serving_numerics(device)
            if self.tuned_dir is not None:
                model, tokenizer, _ = load_tuned_model(self.tuned_dir, device, numerics.dtype)
            else:
                model = load_base_model(self.checkpoint, device, numerics.dtype)
                tokenizer = load_tokenizer(self.checkpoint)
            self._loaded = numerics.apply(model), tokenizer
            self.description += f"; {numerics.describe()}"
        return self._loaded

    def answer(self, requests: Sequence[TeacherRequest], settings: TeacherSettings,
               on_answer: OnAnswer) -> None:
        from components.common.generation import SamplingParams, generate_detailed
        from components.common.prompts import format_conversation_prompt

        if not requests:
            return
        model, tokenizer = self._load()
        sampling = SamplingParams(settings.max_output_tokens, settings.temperature,
                                  settings.top_p, settings.top_k)
        chunk = self.batch_size * CHUNK_BATCHES
        for start in range(0, len(requests), chunk):
            part = requests[start:start + chunk]
            prompts = [format_conversation_prompt(tokenizer, r.messages) for r in part]
            started = time.perf_counter()
            generations = generate_detailed(model, tokenizer, prompts, sampling,
                                            batch_size=self.batch_size, seed=settings.seed)
            share = round((time.perf_counter() - started) / len(part), 3)
            for request, generation in zip(part, generations):
                on_answer(request, Completion(generation.text, generation.prompt_tokens,
                                              len(generation.token_ids), share))

"""Transform: validated JSONL examples -> token datasets (ids + loss masks) for tuning.

Reads the training (and evaluation) examples of a validated dataset directory
(:mod:`components.common.artifacts.validated_dataset`; validated, so not checked again) and
writes a tokenized dataset (:mod:`components.common.artifacts.tokenized_dataset`), atomically
(built in a temporary sibling, renamed into place).

Tokenization is :class:`components.common.encoding.ExampleEncoder` (chat template, default
context, truncation: see that module). It streams: lines are read one by one, encoded in batches
of ``batch_size`` with one tokenizer call per batch, and written as they are encoded.

The validator already tokenized the examples with the same encoder and left the token datasets in
the validated directory; when their encoding key (tokenizer files, chat template,
format, limits, default context) equals this run's, they are copied instead of re-tokenized. Either
way the output bytes are the same, and the same input always gives the same bytes.

Distillation (``dataset_format="distillation"``): the multi-task student of distilling
step-by-step (:mod:`components.common.distillation_tasks`). Every train record becomes a
label-prediction example (``[label] `` + input -> ``output_text``, loss-mask value 1) and, when
its ``rationale`` is a non-empty string, a rationale-generation example (``[rationale] `` + input
-> ``rationale``, loss-mask value 2); every eval record only the label example. Both token
datasets' meta record the tasks with their loss weights (``label_loss_weight`` and its
complement) and the ``input_prefix`` every prompt to the tuned model starts with. The tasks are
part of the encoding key, so the validator's single-task tokens are never reused. Distillation
examples must be labeled by the time they reach transform (the teacher step labels them; its
output folder is a validated dataset folder); an unlabeled example is an error, never silently
dropped.
"""
from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path
from typing import Iterator

from components.common.artifacts import validated_dataset
from components.common.artifacts.token_dataset import TokenDataset, TokenDatasetWriter, read_meta
from components.common.artifacts.tokenized_dataset import SPLITS, split_dir
from components.common.dataset_formats import Example, normalize_format, token_limits
from components.common.distillation_tasks import (DEFAULT_LABEL_WEIGHT, TASKS, check_label_weight,
                                                  task_examples, tasks_metadata)
from components.common.encoding import (DEFAULT_BATCH_SIZE, ExampleEncoder, batched, encoding_key,
                                        folder_fingerprint, tokenizer_fingerprint)
from components.common.model_catalog import context_class, resolve_model


class TransformError(ValueError):
    """Data transform cannot tokenize (it names the file and line)."""


def read_examples(jsonl_path: str | os.PathLike, dataset_format: str,
                  split_tasks: bool = False, role: str = validated_dataset.TRAIN
                  ) -> Iterator[Example]:
    """Yields the examples of a validated JSONL file, one line at a time.

    With ``split_tasks`` (distillation) every line gives its task examples
    (:func:`components.common.distillation_tasks.task_examples`; eval lines: label only).
    """
    for number, record, example in validated_dataset.read_examples(jsonl_path, dataset_format):
        if not example.labeled:
            raise TransformError(f"{jsonl_path}:{number}: output_text: missing; unlabeled "
                                 "distillation examples must be labeled by the teacher "
                                 "before transform")
        if not split_tasks:
            yield example
            continue
        try:
            yield from task_examples(record, with_rationale=role == validated_dataset.TRAIN)
        except ValueError as error:
            raise TransformError(f"{jsonl_path}:{number}: {error}") from None


def tokenize_file(jsonl_path: str | os.PathLike, encoder: ExampleEncoder,
                  output_dir: str | os.PathLike, batch_size: int = DEFAULT_BATCH_SIZE,
                  role: str = validated_dataset.TRAIN, metadata: dict | None = None) -> dict:
    """Streams one JSONL file (of ``role``: train or eval) into a token dataset at
    ``output_dir``, with ``metadata`` added to its meta; returns its meta."""
    writer = TokenDatasetWriter(output_dir, {**validated_dataset.token_metadata(encoder),
                                             **(metadata or {})})
    truncated = [0, 0, 0]
    examples = read_examples(jsonl_path, encoder.format, bool(encoder.tasks), role)
    with writer:
        for batch in batched(examples, batch_size):
            for encoded in encoder.encode_batch(batch):
                writer.add(encoded.ids, encoded.mask)
                truncated[0] += encoded.input_truncated
                truncated[1] += encoded.output_truncated
                truncated[2] += encoded.truncated
        writer.metadata.update(validated_dataset.truncation_metadata(*truncated))
    return TokenDataset(output_dir).meta


def _usable_cache(cache_dir: Path, key: str) -> bool:
    try:
        meta = read_meta(cache_dir)
    except ValueError:
        return False
    return meta is not None and meta.get("encoding_key") == key


def transform_dataset(validated_dir: str | os.PathLike, dataset_format: str,
                      large_model_reference: str, max_context_length: str,
                      default_context: str, output_dir: str | os.PathLike, *, tokenizer=None,
                      batch_size: int = DEFAULT_BATCH_SIZE, use_cache: bool = True,
                      label_loss_weight: float = DEFAULT_LABEL_WEIGHT) -> dict:
    """Tokenizes a validated dataset directory into ``output_dir``/train (and /eval).

    ``label_loss_weight``: distillation only, alpha of the training loss (see the module doc).
    Returns ``{role: meta}`` of the token datasets written, each with ``"reused_tokens"``:
    whether the validator's tokens were reused.
    """
    label_loss_weight = check_label_weight(label_loss_weight)
    if validated_dataset.examples_file(validated_dir, validated_dataset.TRAIN) is None:
        raise FileNotFoundError(f"{validated_dir} has no training examples: is it the output of "
                                "validate_dataset?")
    fmt = normalize_format(dataset_format)
    limits = token_limits(fmt, context_class(large_model_reference, max_context_length))
    tasks = TASKS if fmt == "distillation" else ()
    task_metadata = tasks_metadata(label_loss_weight) if tasks else {}
    # The key of this run's encoding, from the tokenizer files alone: when the validator's
    # tokens have the same key, the tokenizer is not even loaded.
    if tokenizer is not None:
        fingerprint = tokenizer_fingerprint(tokenizer)
    else:
        fingerprint = folder_fingerprint(resolve_model(large_model_reference).checkpoint)
    key = (encoding_key(fingerprint, fmt, limits, default_context or "", tasks) if fingerprint
           else None)
    encoder: ExampleEncoder | None = None
    output_dir = Path(output_dir)
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = output_dir.with_name(f".{output_dir.name}.{uuid.uuid4().hex}.tmp")
    staging.mkdir()
    summary: dict = {}
    try:
        for role in SPLITS:
            source = validated_dataset.examples_file(validated_dir, role)
            if source is None:
                continue
            cache = validated_dataset.token_cache(validated_dir, role)
            target = split_dir(staging, role)
            if use_cache and key and _usable_cache(cache, key):
                shutil.copytree(cache, target)
                meta = TokenDataset(target).meta
                reused = True
            else:
                if encoder is None:
                    if tokenizer is None:  # model_loading imports torch: only when needed
                        from components.common.model_loading import load_model_tokenizer

                        tokenizer, _ = load_model_tokenizer(large_model_reference)
                    encoder = ExampleEncoder(tokenizer, fmt, limits, default_context or "",
                                             tasks=tasks)
                meta = tokenize_file(source, encoder, target, batch_size, role, task_metadata)
                reused = False
            summary[role] = {**meta, "reused_tokens": reused}
        if output_dir.exists():
            shutil.rmtree(output_dir)
        os.replace(staging, output_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return summary


def transform_for_pipeline(validated_dataset_path: str, dataset_format: str,
                           large_model_reference: str, max_context_length: str,
                           default_context: str, tokenized_dataset_path: str,
                           label_loss_weight: float = DEFAULT_LABEL_WEIGHT) -> dict:
    """The transform component's work: returns the artifact metadata."""
    summary = transform_dataset(validated_dataset_path, dataset_format, large_model_reference,
                                max_context_length, default_context, tokenized_dataset_path,
                                label_loss_weight=label_loss_weight)
    fmt = normalize_format(dataset_format)
    metadata: dict = {"dataset_format": fmt}
    if fmt == "distillation":
        metadata["label_loss_weight"] = float(label_loss_weight)
    for role, meta in summary.items():
        prefix = "" if role == validated_dataset.TRAIN else "eval_"
        metadata[f"{prefix}num_examples"] = meta["num_examples"]
        metadata[f"{prefix}num_tokens"] = meta["num_tokens"]
        metadata[f"{prefix}num_target_tokens"] = meta["num_target_tokens"]
        metadata[f"{prefix}truncated_examples"] = meta["truncated_examples"]
        metadata[f"{prefix}reused_validation_tokens"] = meta["reused_tokens"]
        print(f"transform: {role}: {meta['num_examples']} examples, {meta['num_tokens']} tokens "
              f"({meta['num_target_tokens']} targets), {meta['truncated_examples']} truncated"
              f"{', tokens reused from validation' if meta['reused_tokens'] else ''}", flush=True)
    return metadata

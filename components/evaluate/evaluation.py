"""Evaluating the base model and every kept checkpoint of a tuning run on the evaluation set.

For each model:

- token metrics (:mod:`components.common.token_metrics`, Vertex's names, computed by the tuner's
  packed scorer, :func:`components.common.packing.score_examples`): ``eval_total_loss``,
  ``eval_fraction_of_correct_next_step_preds``, ``eval_num_predictions``, on the tokenized eval
  set (transform's, :mod:`components.common.artifacts.tokenized_dataset`; tokenized here with
  transform's encoder when a caller has only the JSONL);
- generation metrics (:mod:`components.evaluate.metrics`): the model answers every eval prompt
  (``prompts.format_prompt``) with batched generation (:mod:`components.common.generation`) and
  the answers are scored: ``exact_match``, ``bleu``, ``rouge_l`` and, when the expected outputs
  are a small label set, ``accuracy`` and ``macro_f1`` with a confusion matrix.

A distillation run's models are asked for labels only: every input starts with the tokenized
eval set's ``input_prefix`` (``[label] ``; without a tokenized eval set, the final checkpoint's),
in the generation prompts and the token metrics alike, for the base model and every checkpoint
(:mod:`components.common.distillation_tasks`).

Generation settings use Vertex's names: ``temperature`` (0 = greedy, the default),
``maxOutputTokens``, ``topP``, ``topK`` (0 = off). ``maxOutputTokens = 0`` (the default) means
"the longest expected output in tokens + 16, at most 1024": room for every expected answer plus
a margin to see a model ramble, while a classification eval stops after a few tokens.

Which models generate: every kept checkpoint and the base model, unless that is more than
``GENERATION_BUDGET`` example-generations on a CPU ((checkpoints + 1) x examples; 250 examples
and 15 checkpoints are 4000, 10 to 15 minutes for the embedded model on 2 cores); then only the
base model, the checkpoint with the lowest eval loss recorded by the tuner, and the final
checkpoint generate, and every checkpoint still gets token metrics. Results say which.

Models run in the precision every component uses (:mod:`components.common.precision`): bfloat16
where the hardware does it fast, else float32 (``TUNEPIPE_PRECISION=fp32`` for bit-exact greedy
decoding anywhere).
"""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from components.common.artifacts import validated_dataset
from components.common.artifacts.tokenized_dataset import eval_dir
from components.common.artifacts.tuned_model import read_checkpoints
from components.common.distillation_tasks import input_prefix
from components.common.generation import (DEFAULT_BATCH_SIZE, MAX_OUTPUT_TOKENS_LIMIT,
                                          SamplingParams, generate_detailed)
from components.common.model_loading import (base_checkpoint_of, load_base_model, load_tokenizer,
                                             load_tuned_model, select_device)
from components.common.packed_linear import use_packed_weights
from components.common.precision import Precision, choose_precision
from components.common.prompts import format_prompt
from components.common.packing import score_examples
from components.evaluate.metrics import generation_metrics, label_set

MAX_OUTPUT_MARGIN = 16  # tokens beyond the longest expected output (maxOutputTokens = 0)
GENERATION_BUDGET = 4000  # example-generations on a CPU before generation is limited
NOT_EVALUATED_REASON = "no evaluation data"

Progress = Callable[[str], None]


def _print(message: str) -> None:
    print(message, flush=True)


class EvaluationDataError(ValueError):
    """Evaluation data that cannot be read (the message names the file and line)."""


# ------------------------------------------------------------------------------------ settings


@dataclass
class GenerationSettings:
    """Generation parameters, Vertex's names in ``to_dict``; see the module doc for defaults."""

    temperature: float = 0.0
    max_output_tokens: int = 0  # 0: longest expected output + MAX_OUTPUT_MARGIN, <= 1024
    top_p: float = 1.0
    top_k: int = 0
    batch_size: int = DEFAULT_BATCH_SIZE
    seed: int = 0

    def __post_init__(self) -> None:
        if self.max_output_tokens < 0:
            raise ValueError(f"maxOutputTokens must be >= 0 (0: automatic), got {self.max_output_tokens}")
        # Validates the other values now rather than after minutes of loading models.
        SamplingParams(1, self.temperature, self.top_p, self.top_k)

    def sampling_params(self, expected_output_tokens: Sequence[int]) -> SamplingParams:
        """The sampling parameters, with ``maxOutputTokens = 0`` resolved."""
        max_tokens = self.max_output_tokens or default_max_output_tokens(expected_output_tokens)
        return SamplingParams(max_tokens, self.temperature, self.top_p, self.top_k)

    def to_dict(self) -> dict:
        return {"temperature": self.temperature, "maxOutputTokens": self.max_output_tokens,
                "topP": self.top_p, "topK": self.top_k, "batch_size": self.batch_size,
                "seed": self.seed}


def default_max_output_tokens(expected_output_tokens: Sequence[int]) -> int:
    """``maxOutputTokens = 0``: the longest expected output + 16 tokens, at most 1024."""
    longest = max(expected_output_tokens, default=0)
    return max(1, min(MAX_OUTPUT_TOKENS_LIMIT, longest + MAX_OUTPUT_MARGIN))


# ------------------------------------------------------------------------------------ data


@dataclass
class EvalExample:
    """One evaluation example: the input, the expected output and where it came from."""

    input_text: str
    output_text: str
    line: int


def read_eval_examples(path: str | os.PathLike) -> list[EvalExample]:
    """The examples of a user's eval JSONL file (text format: ``input_text``, ``output_text``),
    checked as the validator checks evaluation data."""
    from components.common.dataset_formats import parse_example

    examples = []
    name = str(path)
    try:
        handle = open(path, "rb")
    except OSError as error:
        raise EvaluationDataError(f"{name}: cannot read: {error.strerror or error}") from None
    with handle:
        for number, raw in enumerate(handle, 1):
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, ValueError) as error:
                raise EvaluationDataError(f"{name}:{number}: (line): not JSON: {error}") from None
            example, problems = parse_example(obj, "text", require_output=True)
            if problems:
                field_name, message = problems[0]
                raise EvaluationDataError(f"{name}:{number}: {field_name}: {message}")
            (input_text, output_text), = example.turns
            examples.append(EvalExample(input_text, output_text, number))
    if not examples:
        raise EvaluationDataError(f"{name}: no examples")
    return examples


def read_validated_eval_examples(path: str | os.PathLike) -> list[EvalExample]:
    """The examples of a validated dataset's evaluation file (validated: not checked again)."""
    return [EvalExample(*example.turns[0], number) for number, _, example
            in validated_dataset.read_examples(path, "text")]


def tokenize_examples(tokenizer, examples: Sequence[EvalExample], context_class: str = "8k",
                      prefix: str = "") -> list[tuple[np.ndarray, np.ndarray]]:
    """``(token ids, loss mask)`` of each example exactly as transform tokenizes eval data
    (``prefix``: the input prefix of a distillation run's label task)."""
    from components.common.dataset_formats import Example, token_limits
    from components.common.encoding import ExampleEncoder

    encoder = ExampleEncoder(tokenizer, "text", token_limits("text", context_class))
    encoded = encoder.encode_batch([Example(None, ((prefix + e.input_text, e.output_text),))
                                    for e in examples])
    return [(np.asarray(e.ids, dtype=np.int64), np.asarray(e.mask, dtype=np.int64)) for e in encoded]


def expected_output_tokens(tokenizer, examples: Sequence[EvalExample]) -> list[int]:
    """Token count of every expected output (without the template's end-of-turn tokens)."""
    texts = [e.output_text for e in examples]
    return [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]] if texts else []


# ------------------------------------------------------------------------------------ models


@dataclass(frozen=True)
class ModelSource:
    """A model to evaluate: a base checkpoint folder or a tuned model folder."""

    label: str  # "base", "step 20", or a user-facing name
    kind: str  # "base" or "tuned"
    path: str
    step: int | None = None

    def load(self, device: torch.device, dtype: torch.dtype):
        """``(model, tokenizer)``, in eval mode on ``device``."""
        if self.kind == "base":
            return load_base_model(self.path, device, dtype), load_tokenizer(self.path)
        model, tokenizer, _ = load_tuned_model(self.path, device, dtype, merge=True)
        return model, tokenizer


@dataclass
class ModelEvaluation:
    """What one model scored; ``predictions`` and ``per_example`` when it generated."""

    source: ModelSource
    metrics: dict[str, float]
    predictions: list[str] | None = None
    finish_reasons: list[str] | None = None
    per_example: list[dict[str, float]] | None = None
    classification: dict | None = None
    seconds: float = 0.0

    def summary(self) -> dict:
        return {"label": self.source.label, "kind": self.source.kind, "path": self.source.path,
                "step": self.source.step, "generated": self.predictions is not None,
                "metrics": self.metrics, "classification": self.classification,
                "seconds": round(self.seconds, 3)}


def evaluation_device_and_precision(device: torch.device | str | None = None
                                    ) -> tuple[torch.device, Precision]:
    """The local device and the precision evaluate runs in there (the shared rule)."""
    device = torch.device(device) if device is not None else select_device()
    return device, choose_precision(device)


def evaluate_loaded_model(model, tokenizer, source: ModelSource, examples: Sequence[EvalExample],
                          token_examples: Sequence[tuple[np.ndarray, np.ndarray]] | None,
                          sampling: SamplingParams | None, settings: GenerationSettings,
                          labels: Sequence[str] | None, device: torch.device,
                          prefix: str = "") -> ModelEvaluation:
    """Token metrics (when ``token_examples``) and, when ``sampling``, generation metrics
    (``prefix`` starts every input: a distillation run's label task)."""
    started = time.perf_counter()
    metrics: dict[str, float] = {}
    if token_examples:
        metrics.update(score_examples(model, token_examples).metrics("eval"))
    evaluation = ModelEvaluation(source, metrics)
    if sampling is not None:
        prompts = [format_prompt(tokenizer, prefix + e.input_text) for e in examples]
        generations = generate_detailed(use_packed_weights(model), tokenizer, prompts, sampling,
                                        batch_size=settings.batch_size, seed=settings.seed)
        predictions = [g.text for g in generations]
        scores, per_example, classification = generation_metrics(
            predictions, [e.output_text for e in examples], labels)
        metrics.update(scores)
        metrics["generated_tokens"] = float(sum(len(g.token_ids) for g in generations))
        metrics["stopped_at_max_output_tokens"] = float(
            sum(g.finish_reason == "length" for g in generations))
        evaluation.predictions = predictions
        evaluation.finish_reasons = [g.finish_reason for g in generations]
        evaluation.per_example = per_example
        evaluation.classification = classification.to_dict() if classification else None
    evaluation.seconds = time.perf_counter() - started
    return evaluation


def evaluate_sources(sources: Sequence[ModelSource], examples: Sequence[EvalExample],
                     settings: GenerationSettings, *, generate_labels: set[str] | None = None,
                     token_examples: Sequence[tuple[np.ndarray, np.ndarray]] | None = None,
                     context_class: str = "8k", device: torch.device | str | None = None,
                     prefix: str = "", progress: Progress = _print
                     ) -> tuple[list[ModelEvaluation], dict]:
    """Evaluates each model in turn (one in memory at a time).

    ``generate_labels``: the labels of the sources that generate (None: all). Without
    ``token_examples`` the examples are tokenized with each model's tokenizer. ``prefix``
    starts every input (a distillation run's label task, see the module doc).
    Returns the evaluations and the shared settings (resolved maxOutputTokens, labels, device).
    """
    device, precision = evaluation_device_and_precision(device)
    dtype = precision.dtype
    progress(f"evaluate: precision {precision.describe()}")
    references = [e.output_text for e in examples]
    labels = label_set(references)
    evaluations = []
    sampling = None
    for source in sources:
        model, tokenizer = source.load(device, dtype)
        if sampling is None:
            sampling = settings.sampling_params(expected_output_tokens(tokenizer, examples))
        generates = generate_labels is None or source.label in generate_labels
        progress(f"evaluate: {source.label} ({source.kind}: {source.path}): token metrics"
                 + (f" and generation of {len(examples)} answers" if generates else ""))
        tokens = token_examples if token_examples is not None else tokenize_examples(
            tokenizer, examples, context_class, prefix)
        evaluation = evaluate_loaded_model(model, tokenizer, source, examples, tokens,
                                           sampling if generates else None, settings, labels,
                                           device, prefix)
        progress(f"evaluate: {source.label}: " + ", ".join(
            f"{k}={v:.4g}" for k, v in evaluation.metrics.items()) + f" ({evaluation.seconds:.1f} s)")
        evaluations.append(evaluation)
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    shared = {
        "generation": {**settings.to_dict(),
                       "maxOutputTokens_resolved": sampling.max_output_tokens if sampling else None},
        "task": "classification" if labels else "generation",
        "labels": labels,
        "device": device.type,
        "dtype": precision.dtype_name,
        "precision": precision.describe(),
        "num_examples": len(examples),
        "input_prefix": prefix,
    }
    return evaluations, shared


# ------------------------------------------------------------------------------------ tuning runs


def best_by_recorded_loss(checkpoints: Sequence[dict]) -> dict | None:
    """The checkpoint with the lowest ``eval_total_loss`` the tuner recorded (earliest on ties)."""
    scored = [(c["eval"]["eval_total_loss"], c["step"], i) for i, c in enumerate(checkpoints)
              if c.get("eval") and _finite(c["eval"].get("eval_total_loss"))]
    return checkpoints[min(scored)[2]] if scored else None


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def checkpoint_label(step) -> str:
    return f"step {step}"


def generation_plan(checkpoints: Sequence[dict], num_examples: int, device_type: str,
                    budget: int | None = GENERATION_BUDGET) -> tuple[set[str], str]:
    """Which models generate (labels) and why; see the module doc."""
    everything = {"base"} | {checkpoint_label(c["step"]) for c in checkpoints}
    cost = (len(checkpoints) + 1) * num_examples
    if device_type != "cpu" or budget is None or cost <= budget:
        return everything, "base model and every kept checkpoint"
    chosen = {"base", checkpoint_label(checkpoints[-1]["step"])}
    best = best_by_recorded_loss(checkpoints)
    if best is not None:
        chosen.add(checkpoint_label(best["step"]))
    return chosen, (f"base model, best checkpoint by recorded eval loss and final checkpoint only: "
                    f"{len(checkpoints) + 1} models x {num_examples} examples = {cost} generations "
                    f"exceed the CPU budget of {budget}; every checkpoint has token metrics")


def base_model_of(index: dict, large_model_reference: str) -> tuple[str, str]:
    """``(reference, local checkpoint)`` of the tuned model's base (else the given reference)."""
    base = index.get("base_model")
    if base and base.get("checkpoint"):
        return base.get("reference", large_model_reference), base_checkpoint_of({"base_model": base})
    from components.common.model_catalog import resolve_model

    return large_model_reference, resolve_model(large_model_reference).checkpoint


def evaluate_tuning_run(tuned_model_dir: str | os.PathLike, validated_dataset_dir: str | os.PathLike,
                        tokenized_dataset_dir: str | os.PathLike | None, large_model_reference: str,
                        settings: GenerationSettings | None = None, *,
                        max_context_length: str = "",
                        device: torch.device | str | None = None,
                        generation_budget: int | None = GENERATION_BUDGET,
                        progress: Progress = _print) -> tuple[dict, list[dict]]:
    """Evaluates the base model and every kept checkpoint; returns ``(results, predictions)``.
    ``max_context_length`` ('8k', '32k', '': the base model's) bounds examples tokenized here.

    Without evaluation data in the validated dataset: ``({"evaluated": False, "reason": ...},
    [])``.
    """
    settings = settings or GenerationSettings()
    eval_path = validated_dataset.examples_file(validated_dataset_dir, validated_dataset.EVAL)
    if eval_path is None:
        return {"evaluated": False, "reason": NOT_EVALUATED_REASON,
                "detail": f"{validated_dataset_dir} has no evaluation examples "
                          "(no evaluation_data_uri)"}, []
    started = time.perf_counter()
    examples = read_validated_eval_examples(eval_path)
    index = read_checkpoints(tuned_model_dir)
    checkpoints = index["checkpoints"]
    tokens_dir = eval_dir(tokenized_dataset_dir) if tokenized_dataset_dir else None
    if tokens_dir:
        from components.common.artifacts.token_dataset import TokenDataset

        token_set = TokenDataset(tokens_dir)
        token_examples, prefix = list(token_set), input_prefix(token_set.meta)
        token_source = str(tokens_dir)
        if len(token_examples) != len(examples):
            raise ValueError(f"{tokens_dir} holds {len(token_examples)} examples but {eval_path} "
                             f"{len(examples)}: the tokenized and validated eval sets differ")
    else:
        from components.common.model_loading import read_tuned_model_metadata

        final = Path(tuned_model_dir) / checkpoints[-1]["dir"]
        token_examples, prefix = None, input_prefix(read_tuned_model_metadata(final))
        token_source = "tokenized here (no tokenized eval set)"

    base_reference, base_checkpoint = base_model_of(index, large_model_reference)
    from components.common.model_catalog import context_class

    device = torch.device(device) if device is not None else select_device()
    generate_labels, plan_reason = generation_plan(checkpoints, len(examples), device.type,
                                                   generation_budget)
    sources = [ModelSource("base", "base", base_checkpoint)] + [
        ModelSource(checkpoint_label(c["step"]), "tuned", str(Path(tuned_model_dir) / c["dir"]), c["step"])
        for c in checkpoints]
    evaluations, shared = evaluate_sources(
        sources, examples, settings, generate_labels=generate_labels, token_examples=token_examples,
        context_class=context_class(base_reference, max_context_length), device=device,
        prefix=prefix, progress=progress)

    base = evaluations[0]
    best = best_checkpoint(checkpoints, [e.metrics for e in evaluations[1:]])
    results = {
        "evaluated": True,
        "tuned_model": str(tuned_model_dir),
        "large_model_reference": large_model_reference,
        "base_model": {"reference": base_reference, "checkpoint": base_checkpoint},
        **shared,
        "token_metrics_data": token_source,
        "eval_data": str(eval_path),
        "generation_models": plan_reason,
        "final_step": index.get("final_step", checkpoints[-1]["step"]),
        "stopped_early": bool(index.get("stopped_early", False)),
        "tuned": {"step": checkpoints[-1]["step"], "which": "final checkpoint",
                  "note": "select_checkpoint picks the returned checkpoint from these results"},
        "best_by_eval_loss": best,
        "base": base.summary(),
        "checkpoints": [{"step": c["step"], "dir": c["dir"], "recorded_eval": c.get("eval"),
                         **e.summary()} for c, e in zip(checkpoints, evaluations[1:])],
        "seconds": round(time.perf_counter() - started, 3),
    }
    return results, prediction_rows(examples, evaluations)


def best_checkpoint(checkpoints: Sequence[dict], metrics: Sequence[dict]) -> dict | None:
    """``{"step", "eval_total_loss"}`` of the lowest recomputed eval loss (earliest on ties)."""
    scored = [(m["eval_total_loss"], c["step"]) for c, m in zip(checkpoints, metrics)
              if _finite(m.get("eval_total_loss"))]
    if not scored:
        return None
    loss, step = min(scored)
    return {"step": step, "eval_total_loss": loss}


def prediction_rows(examples: Sequence[EvalExample], evaluations: Sequence[ModelEvaluation]) -> list[dict]:
    """One row per example: input, expected, base and tuned (final checkpoint) answers and scores,
    and the answers of every checkpoint that generated."""
    base = evaluations[0]
    tuned = evaluations[-1]
    rows = []
    for i, example in enumerate(examples):
        row = {"index": i, "line": example.line, "input": example.input_text,
               "expected": example.output_text}
        if base.predictions is not None:
            row["base_output"] = base.predictions[i]
            row["base_scores"] = base.per_example[i]
        if tuned is not base and tuned.predictions is not None:
            row["tuned_output"] = tuned.predictions[i]
            row["tuned_scores"] = tuned.per_example[i]
            row["tuned_model"] = tuned.source.label + " (final checkpoint)"
            row["tuned_finish_reason"] = tuned.finish_reasons[i]
        others = {str(e.source.step): e.predictions[i] for e in evaluations[1:]
                  if e.predictions is not None and e.source.step is not None}
        if others:
            row["checkpoint_outputs"] = others
        rows.append(row)
    return rows


# ------------------------------------------------------------------------------------ metrics

# Metric names copied into the KFP Metrics artifact (prefixed base_ / tuned_).
SCALAR_METRICS = ("eval_total_loss", "eval_fraction_of_correct_next_step_preds", "eval_num_predictions",
                  "exact_match", "bleu", "rouge_l", "accuracy", "macro_f1")


def scalar_metrics(results: dict) -> dict[str, float]:
    """The scalars for the KFP Metrics artifact: base_* and tuned_* (final checkpoint), steps."""
    if not results.get("evaluated"):
        return {"evaluated": 0.0}
    scalars = {"evaluated": 1.0, "num_examples": float(results["num_examples"]),
               "tuned_step": float(results["tuned"]["step"])}
    tuned = results["checkpoints"][-1]["metrics"]
    for name in SCALAR_METRICS:
        for prefix, metrics in (("base", results["base"]["metrics"]), ("tuned", tuned)):
            if _finite(metrics.get(name)):
                scalars[f"{prefix}_{name}"] = float(metrics[name])
    best = results.get("best_by_eval_loss")
    if best:
        scalars["best_eval_loss_step"] = float(best["step"])
        scalars["best_eval_total_loss"] = float(best["eval_total_loss"])
    return scalars

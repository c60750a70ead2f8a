"""``tunepipe evaluate``: the evaluate component's metrics for any model on a JSONL eval set.

    tunepipe evaluate --model NAME_OR_PATH --data EVAL.jsonl [--compare BASE]

``--model`` and ``--compare`` accept, tried in this order: a tuned model folder (a registered
version or a checkpoint, with ``tunepipe_model.json``), a tune output (``checkpoints.json``: its
final checkpoint), a registered model ``NAME`` or ``NAME@VERSION``, or a base model reference for
the catalog (``text-bison@002``, a checkpoint folder, a ``.gguf`` file). The examples are
tokenized here with transform's encoder for the token metrics. When ``--model`` is a distilled
student (an ``input_prefix`` in its metadata), every model is asked with that prefix. Exit
status: 0 done, 2 bad arguments, model or data (with a message saying what is wrong).
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Sequence

from components.common.artifacts.evaluation_results import (PREDICTIONS_FILE, RESULTS_FILE,
                                                            write_results)
from components.common.artifacts.tuned_model import final_checkpoint, read_index
from components.evaluate.evaluation import (EvaluationDataError, GenerationSettings, ModelSource,
                                            evaluate_sources, read_eval_examples)

PROG = "tunepipe evaluate"

_ROWS = (
    ("eval_total_loss", "eval_total_loss", "{:.4f}"),
    ("eval_fraction_of_correct_next_step_preds", "eval_fraction_of_correct_next_step_preds", "{:.4f}"),
    ("eval_num_predictions", "eval_num_predictions", "{:.0f}"),
    ("exact_match", "exact_match", "{:.4f}"),
    ("bleu", "bleu", "{:.2f}"),
    ("rouge_l", "rouge_l", "{:.4f}"),
    ("accuracy", "accuracy", "{:.4f}"),
    ("macro_f1", "macro_f1", "{:.4f}"),
    ("generated_tokens", "generated_tokens", "{:.0f}"),
    ("stopped_at_max_output_tokens", "stopped_at_max_output_tokens", "{:.0f}"),
)


class ModelNotFound(LookupError):
    """A --model / --compare value that names nothing usable."""


def resolve_source(value: str, label: str) -> tuple[ModelSource, str]:
    """The model ``value`` names, and the base reference it was tuned from (or itself)."""
    from components.common.model_catalog import UnknownModelError, resolve_model
    from components.common.model_loading import TUNED_MODEL_METADATA, read_tuned_model_metadata
    from components.common.model_registry import resolve_model_dir

    path = Path(value).expanduser()
    if (path / TUNED_MODEL_METADATA).exists():
        return _tuned(path, label, read_tuned_model_metadata(path))
    if read_index(path) is not None:  # a tune output: its final checkpoint
        final = final_checkpoint(path)
        return _tuned(final, label, read_tuned_model_metadata(final))
    problems = []
    try:
        model_dir = resolve_model_dir(value)
        return _tuned(model_dir, label, read_tuned_model_metadata(model_dir))
    except (LookupError, FileNotFoundError, ValueError) as error:
        problems.append(f"not a tuned model folder or registered model ({error})")
    try:
        resolved = resolve_model(value)
        return ModelSource(label, "base", resolved.checkpoint), resolved.reference
    except (UnknownModelError, FileNotFoundError, OSError) as error:
        problems.append(f"not a model reference ({error})")
    raise ModelNotFound(f"{value!r}: " + "; ".join(problems))


def _tuned(model_dir: Path, label: str, metadata: dict) -> tuple[ModelSource, str]:
    reference = (metadata.get("base_model") or {}).get("reference", "")
    return ModelSource(label, "tuned", str(model_dir), metadata.get("step")), reference


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description="Evaluate a tuned model (or any model) on a JSONL evaluation set: "
        "eval loss, token accuracy, predicted tokens, exact match, BLEU, ROUGE-L and, for small "
        "label sets, accuracy and macro-F1.")
    parser.add_argument("--model", required=True, metavar="NAME_OR_PATH",
                        help="registered model (NAME or NAME@VERSION), tuned model or checkpoint "
                             "folder, tune output folder, or base model reference")
    parser.add_argument("--data", required=True, metavar="EVAL.jsonl",
                        help="evaluation examples: {\"input_text\": ..., \"output_text\": ...} per line")
    parser.add_argument("--compare", metavar="BASE",
                        help="a second model for a side-by-side column, e.g. text-bison@002")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy")
    parser.add_argument("--max-output-tokens", "--maxOutputTokens", dest="max_output_tokens", type=int,
                        default=0, help="0 (default): longest expected output + 16, at most 1024")
    parser.add_argument("--top-p", "--topP", dest="top_p", type=float, default=1.0)
    parser.add_argument("--top-k", "--topK", dest="top_k", type=int, default=0, help="0: off")
    parser.add_argument("--batch-size", type=int, default=GenerationSettings.batch_size)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", help="cpu or cuda (default: a GPU when present)")
    parser.add_argument("--max-context-length", default="", choices=("", "8k", "32k"),
                        help="the token limits of the examples: 8k or 32k (default: what the "
                             "model's name implies)")
    parser.add_argument("--output", metavar="DIR",
                        help=f"also write {RESULTS_FILE} and {PREDICTIONS_FILE} into DIR")
    return parser


def _error(message: str) -> int:
    print(f"{PROG}: error: {message}", file=sys.stderr)
    return 2


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(list(argv) if argv is not None else None)
    except SystemExit as exit_:  # argparse exits 2 on bad arguments, 0 on --help
        return int(exit_.code or 0)
    try:
        settings = GenerationSettings(temperature=args.temperature,
                                      max_output_tokens=args.max_output_tokens, top_p=args.top_p,
                                      top_k=args.top_k, batch_size=args.batch_size, seed=args.seed)
    except ValueError as error:
        return _error(str(error))
    if args.batch_size < 1:
        return _error("--batch-size must be >= 1")
    try:
        examples = read_eval_examples(args.data)
    except EvaluationDataError as error:
        return _error(str(error))

    sources = []
    references = []
    pairs = ([(args.compare, "--compare")] if args.compare else []) + [(args.model, "--model")]
    labels = _labels([value for value, _ in pairs])
    for (value, option), label in zip(pairs, labels):
        try:
            source, reference = resolve_source(value, label)
        except (ModelNotFound, ValueError, OSError) as error:
            return _error(f"{option} {error}")
        sources.append(source)
        references.append(reference)

    from components.common.distillation_tasks import input_prefix
    from components.common.model_catalog import context_class
    from components.common.model_loading import read_tuned_model_metadata

    model_class = context_class(references[-1] or "", args.max_context_length)
    model = sources[-1]
    prefix = input_prefix(read_tuned_model_metadata(model.path)) if model.kind == "tuned" else ""
    evaluations, shared = evaluate_sources(sources, examples, settings, context_class=model_class,
                                           device=args.device, prefix=prefix, progress=_stderr)
    print(format_table(evaluations, shared, args.data))
    if args.output:
        results = {"evaluated": True, "data": str(args.data), **shared,
                   "models": [e.summary() for e in evaluations]}
        rows = [{"index": i, "line": example.line, "input": example.input_text,
                 "expected": example.output_text,
                 "outputs": {e.source.label: e.predictions[i] for e in evaluations},
                 "scores": {e.source.label: e.per_example[i] for e in evaluations}}
                for i, example in enumerate(examples)]
        write_results(args.output, results, rows)
        print(f"Wrote {Path(args.output) / RESULTS_FILE} and {PREDICTIONS_FILE}")
    return 0


def _labels(values: list[str]) -> list[str]:
    if len(values) == 2 and values[0] == values[1]:
        return [values[0] + " (compare)", values[1]]
    return values


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def format_table(evaluations, shared: dict, data: str) -> str:
    """The metrics as a plain-text table: one row per metric, one column per model."""
    generation = shared["generation"]
    header = [f"{shared['num_examples']} examples from {data}; task: {shared['task']}"
              + (f" ({len(shared['labels'])} labels)" if shared.get("labels") else ""),
              f"generation: temperature={generation['temperature']} maxOutputTokens="
              f"{generation['maxOutputTokens_resolved']} topP={generation['topP']} "
              f"topK={generation['topK'] or 'off'}; {shared['device']} {shared['dtype']}", ""]
    names = [e.source.label for e in evaluations]
    rows = [("metric", *names)]
    for key, title, pattern in _ROWS:
        values = [e.metrics.get(key) for e in evaluations]
        if all(v is None for v in values):
            continue
        rows.append((title, *[pattern.format(v) if isinstance(v, (int, float)) and math.isfinite(v)
                              else "-" for v in values]))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = []
    for index, row in enumerate(rows):
        lines.append("  ".join(cell.ljust(widths[0]) if i == 0 else cell.rjust(widths[i])
                               for i, cell in enumerate(row)))
        if index == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(header + lines)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

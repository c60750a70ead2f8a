"""The generate_rationales component from the command line.

    python -m components.generate_rationales.cli --data DATA.jsonl --teacher REF --output DIR

writes ``DIR/train.jsonl`` (the examples with their rationales), ``DIR/eval.jsonl`` (copied when
``DATA`` is a validated dataset folder with evaluation data), ``DIR/report.json``,
``DIR/report.md`` and the call log ``DIR/teacher_calls.jsonl``; ``DIR`` is a validated dataset
folder for transform and evaluate. Run it again on the same ``DIR`` to resume. ``--teacher``
takes the references of :mod:`components.generate_rationales.teacher_reference`. Exit status:
0 done, 2 bad arguments or data, 1 the teacher failed (the message says which call and why).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from components.common.artifacts.validated_dataset import TRAIN_FILE
from components.common.storage import write_text
from components.generate_rationales.examples import ExampleDataError
from components.generate_rationales.http_calls import RetryPolicy
from components.generate_rationales.rationales import (RationaleError, RationaleSettings,
                                                       generate_rationales_for_pipeline)
from components.generate_rationales.report import render_markdown
from components.generate_rationales.teacher_reference import TeacherReferenceError
from components.generate_rationales.teachers import TeacherSettings

PROG = "python -m components.generate_rationales.cli"


def build_parser() -> argparse.ArgumentParser:
    defaults, policy = RationaleSettings(), RetryPolicy()
    parser = argparse.ArgumentParser(prog=PROG, description=(
        "A teacher model writes rationales (and labels for unlabeled examples) for distillation."))
    parser.add_argument("--data", required=True, help="JSONL (input_text, optional output_text) "
                        "or a validated dataset folder")
    parser.add_argument("--teacher", required=True, help="teacher_model_reference")
    parser.add_argument("--output", required=True, help="output folder (resumed when it exists)")
    parser.add_argument("--project", default="")
    parser.add_argument("--location", default="")
    parser.add_argument("--few-shot", type=int, default=defaults.few_shot_count)
    parser.add_argument("--seed", type=int, default=defaults.seed,
                        help="demonstrations, agreement sample and teacher sampling")
    parser.add_argument("--agreement-examples", type=int, default=defaults.agreement_examples,
                        help="labeled examples also asked without their label (-1: all)")
    parser.add_argument("--max-output-tokens", type=int,
                        default=defaults.teacher.max_output_tokens)
    parser.add_argument("--temperature", type=float, default=defaults.teacher.temperature)
    parser.add_argument("--concurrency", type=int, default=8, help="HTTP calls in flight")
    parser.add_argument("--batch-size", type=int, help="local teachers: generation batch size")
    parser.add_argument("--timeout", type=float, default=policy.timeout_seconds,
                        help="seconds per HTTP call")
    parser.add_argument("--max-retries", type=int, default=policy.max_retries)
    parser.add_argument("--initial-backoff", type=float, default=policy.initial_backoff_seconds,
                        help="seconds before the first retry (doubling after each)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = RationaleSettings(
            few_shot_count=args.few_shot,
            agreement_examples=args.agreement_examples,
            teacher=TeacherSettings(max_output_tokens=args.max_output_tokens,
                                    temperature=args.temperature, seed=args.seed))
        policy = RetryPolicy(max_retries=args.max_retries, timeout_seconds=args.timeout,
                             initial_backoff_seconds=args.initial_backoff)
        run = generate_rationales_for_pipeline(
            args.data, args.teacher, args.output, settings, project=args.project,
            location=args.location, concurrency=args.concurrency, policy=policy,
            batch_size=args.batch_size, show_progress=not args.quiet)
    except (ExampleDataError, TeacherReferenceError, ValueError, FileNotFoundError) as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 2
    except RationaleError as error:
        print(f"{PROG}: teacher failed: {error}", file=sys.stderr)
        return 1
    write_text(str(Path(args.output) / "report.md"), render_markdown(run.report))
    examples = run.report["examples"]
    print(f"{examples['kept']} of {examples['total']} examples kept "
          f"({examples['with_rationale']} with a rationale, {examples['excluded']} excluded); "
          f"wrote {Path(args.output) / TRAIN_FILE}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

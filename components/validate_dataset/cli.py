"""``tunepipe validate DATASET``: the pipeline's dataset checks, alone.

Exit status: 0 valid (warnings allowed), 1 invalid, 2 usage error (bad arguments, a dataset file
that does not exist, an unknown model). The report goes to stdout: Markdown for people by default
(without the histogram image), JSON with ``--json``; ``--report-dir`` also writes report.json,
report.md (image embedded) and histogram.png there.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from components.common.dataset_formats import FORMAT_ALIASES, FORMATS, detect_format

DEFAULT_MODELS = {"text": "text-bison@002", "chat": "chat-bison@002",
                  "distillation": "text-bison@002", "gemini": "text-bison@002"}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tunepipe validate",
        description="Check a JSONL tuning dataset against the pipeline's rules: format, counts, "
                    "token limits. Exit 0 when valid, 1 when invalid, 2 on a usage error.")
    parser.add_argument("dataset", metavar="DATASET",
                        help="JSONL file: local path, file:// or gs:// URI")
    parser.add_argument("--format", dest="dataset_format", metavar="F",
                        choices=sorted(FORMAT_ALIASES),
                        help=f"dataset format: {', '.join(FORMATS)} (default: guessed from the "
                             "first example)")
    parser.add_argument("--model", metavar="REF",
                        help="base model whose tokenizer counts tokens (default: text-bison@002, "
                             "chat-bison@002 for chat)")
    parser.add_argument("--max-context-length", choices=["", "8k", "32k"], default="",
                        help="model context class (default: implied by the model name)")
    parser.add_argument("--default-context", default="", metavar="TEXT",
                        help="chat: the context of examples without their own (the pipeline's "
                             "default_context); it counts toward their token limit")
    parser.add_argument("--eval", action="store_true",
                        help="DATASET is evaluation data (10 to 250 examples)")
    parser.add_argument("--json", action="store_true", help="print the JSON report")
    parser.add_argument("--report-dir", metavar="DIR",
                        help="also write report.json, report.md and histogram.png to DIR")
    parser.add_argument("--no-tokens", action="store_true",
                        help="check structure only; do not load the tokenizer or count tokens")
    return parser


def _guess_format(uri: str) -> str:
    """The format of the first parsable example; 'text' when nothing tells."""
    from components.common import storage

    try:
        with storage.local_copy(uri) as path, open(path, "rb") as handle:
            for count, raw in enumerate(handle):
                if count >= 100:
                    break
                try:
                    looks = detect_format(json.loads(raw.decode("utf-8-sig")))
                except ValueError:
                    continue
                if looks:
                    return "text" if looks == "distillation" else looks
    except (OSError, ValueError):
        pass
    return "text"


def main(argv: list[str]) -> int:
    """Runs ``tunepipe validate`` with ``argv`` (without the program name); returns the status."""
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:
        return int(exit_.code or 0)

    from components.common import storage
    from components.common.model_catalog import UnknownModelError
    from components.validate_dataset.report import render_markdown
    from components.validate_dataset.validator import (HISTOGRAM_PNG, REPORT_JSON, REPORT_MD,
                                                       run_validation)

    try:
        if not storage.exists(args.dataset):
            print(f"tunepipe validate: error: {args.dataset} does not exist", file=sys.stderr)
            return 2
    except (ValueError, OSError) as error:
        print(f"tunepipe validate: error: {error}", file=sys.stderr)
        return 2
    guessed = args.dataset_format is None
    fmt = FORMAT_ALIASES[args.dataset_format] if args.dataset_format else _guess_format(
        args.dataset)
    model = args.model or DEFAULT_MODELS[fmt]
    try:
        report = run_validation(args.dataset, "", fmt, model, args.max_context_length,
                                default_context=args.default_context,
                                count_tokens=not args.no_tokens, evaluation_only=args.eval)
    except UnknownModelError as error:
        print(f"tunepipe validate: error: {error}", file=sys.stderr)
        return 2
    data = report.to_dict()
    data["format_guessed"] = guessed
    if args.report_dir:
        directory = Path(args.report_dir)
        directory.mkdir(parents=True, exist_ok=True)
        histogram = report.histogram_png()
        (directory / REPORT_JSON).write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n",
                                             encoding="utf-8")
        (directory / REPORT_MD).write_text(render_markdown(data, histogram), encoding="utf-8")
        if histogram:
            (directory / HISTOGRAM_PNG).write_bytes(histogram)
    if args.json:
        sys.stdout.write(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
    else:
        if guessed:
            print(f"(format guessed from the data: {fmt}; use --format to set it)\n")
        sys.stdout.write(render_markdown(data, None))
    sys.stdout.flush()
    return 0 if report.valid else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

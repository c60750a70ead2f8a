"""Command line for the tuner, outside a pipeline: one process, or several under torchrun.

    python -m components.tune.cli --base text-bison@002 --train tokens/train --eval tokens/eval \\
        --output out/tuned --steps 300 [--resume]
    torchrun --nproc-per-node 8 -m components.tune.cli ... [--sharding fsdp]

``--train``/``--eval`` are token datasets as transform writes them (``tokenized_dataset/train``
and ``/eval``). ``--epochs`` (Gemini's ``epochCount``) instead of ``--steps`` derives the steps
from the dataset size. The batch size follows Vertex's rule for ``--accelerator-type`` unless
``--batch-size`` or ``TUNEPIPE_BATCH_SIZE`` sets it. ``--resume`` continues a killed run from its
last checkpoint. Prints a JSON summary as its last line (rank 0).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

from components.common.accelerators import ACCELERATOR_TYPES, DEFAULT_ACCELERATOR_TYPE
from components.common.artifacts.token_dataset import TokenDataset
from components.common.model_catalog import context_class, resolve_model
from components.tune import settings
from components.tune.trainer import DEFAULT_MAX_TOKENS_PER_MICRO_BATCH, TuneConfig, tune


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m components.tune.cli", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", required=True, help="base model: catalog name, Vertex alias, folder or GGUF")
    parser.add_argument("--train", required=True, help="training token dataset folder")
    parser.add_argument("--eval", default=None, help="evaluation token dataset folder")
    parser.add_argument("--output", required=True, help="tune output folder (checkpoints, metrics)")
    length = parser.add_mutually_exclusive_group(required=True)
    length.add_argument("--steps", type=int, help="optimizer steps (train_steps)")
    length.add_argument("--epochs", type=float, help="passes over the training data (epochCount)")
    parser.add_argument("--learning-rate-multiplier", type=float, default=1.0)
    parser.add_argument("--learning-rate", type=float, default=None,
                        help="absolute learning rate (instead of recommended x multiplier)")
    parser.add_argument("--accelerator-type", default=DEFAULT_ACCELERATOR_TYPE,
                        choices=ACCELERATOR_TYPES)
    parser.add_argument("--max-context-length", default="", choices=["", "8k", "32k"])
    parser.add_argument("--batch-size", type=int, default=None, help="overrides Vertex's rule")
    parser.add_argument("--method", default="lora", choices=settings.METHODS)
    parser.add_argument("--adapter-size", default=str(settings.DEFAULT_ADAPTER_SIZE),
                        help="LoRA rank: 1, 4, 8, 16 (or ADAPTER_SIZE_EIGHT...)")
    parser.add_argument("--evaluation-interval", type=int, default=20)
    parser.add_argument("--no-early-stopping", action="store_true")
    parser.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"])
    parser.add_argument("--sharding", default="ddp", choices=["ddp", "fsdp"])
    parser.add_argument("--max-tokens-per-micro-batch", type=int, default=DEFAULT_MAX_TOKENS_PER_MICRO_BATCH)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    parser.add_argument("--run-metadata", default="{}",
                        help="JSON object recorded in every checkpoint's tunepipe_model.json")
    parser.add_argument("--step-delay", type=float, default=0.0, help=argparse.SUPPRESS)  # tests
    return parser


def main(argv: list[str] | None = None) -> int:
    """Runs the tuner; a bad setting, missing dataset or occupied output exits 2 with the reason."""
    args = build_parser().parse_args(argv)
    try:
        return _run(args)
    except (ValueError, FileNotFoundError, FileExistsError) as error:
        print(f"python -m components.tune.cli: error: {error}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    model = resolve_model(args.base)
    if args.batch_size is not None:
        batch_size = args.batch_size
    else:
        batch_size = settings.batch_size(context_class(args.base, args.max_context_length),
                                         args.accelerator_type)
    steps = args.steps if args.steps is not None else settings.steps_for_epochs(
        args.epochs, len(TokenDataset(args.train)), batch_size)
    config = TuneConfig(
        train_steps=steps,
        learning_rate=args.learning_rate or settings.learning_rate(
            model, args.learning_rate_multiplier, args.method),
        batch_size=batch_size, adapter_size=settings.adapter_size(args.adapter_size),
        method=args.method, evaluation_interval=args.evaluation_interval,
        enable_early_stopping=not args.no_early_stopping, precision=args.precision,
        sharding=args.sharding, max_tokens_per_micro_batch=args.max_tokens_per_micro_batch,
        seed=args.seed)
    delay = (lambda step: time.sleep(args.step_delay)) if args.step_delay > 0 else None
    result = tune(model.to_dict(), args.train, args.eval, args.output, config, resume=args.resume,
                  run_metadata={"accelerator_type": args.accelerator_type,
                                **json.loads(args.run_metadata)}, on_step_end=delay)
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps({"final_step": result.final_step, "stopped_early": result.stopped_early,
                          "checkpoints": [c["dir"] for c in result.checkpoints],
                          "device": result.device, "dtype": result.dtype,
                          "processes": result.world_size, "train_seconds": round(result.train_seconds, 3),
                          "peak_memory_bytes": result.peak_memory_bytes}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

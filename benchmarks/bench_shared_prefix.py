"""Benchmark: training and scoring with a shared prompt start held once per row, against every
example computed whole.

Examples made from one template start with the same tokens: every prompt of the bundled
support-intents data (``samples/``) starts with the same 54-token instruction, of about 78
tokens in all. ``components.common.packing`` then holds that start once per packed row
(``shared_prefix_length``) and lets every example attend to it. This benchmark takes the
tuner's model for the embedded SmolLM2-135M-Instruct (LoRA rank 8, the precision
:mod:`components.common.precision` picks) and the sample data as transform tokenizes it, and
times, on the same batches and in turns (who goes first alternates, so that drift of a shared
machine hits both alike):

- a training step's forward and backward (``bench_compile``'s step) over ``--batch-size``
  training examples, ``--pairs`` times per side;
- scoring the 60 evaluation examples (``score_examples``: what the tuner's periodic
  evaluation and the evaluate component run), ``--score-pairs`` times per side.

The peer is the same code with sharing switched off (``MIN_SHARED_PREFIX_TOKENS`` above any
prompt), which is how every example was computed before. Each pair's losses must agree (the
two compute the same sums up to float rounding), else the benchmark fails.

The last line is ``BENCH shared_prefix ratio=<unshared / shared step time> ours=<shared
s/step> baseline=<unshared s/step> unit=s/step score_ratio=<unshared / shared scoring time>
computed_tokens=<shared>/<unshared per step> capability=<CPU> dtype=<dtype>``.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_shared_prefix.py [--pairs N]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

PAIRS = 6
SCORE_PAIRS = 2
BATCH_SIZE = 8
TRAIN_FILE = ROOT / "samples" / "support_intents_train.jsonl"
EVAL_FILE = ROOT / "samples" / "support_intents_eval.jsonl"


@contextmanager
def sharing(enabled: bool):
    """Within it, packed rows hold their examples' shared start once only when ``enabled``."""
    from components.common import packing

    previous = packing.MIN_SHARED_PREFIX_TOKENS
    if not enabled:
        packing.MIN_SHARED_PREFIX_TOKENS = sys.maxsize
    try:
        yield
    finally:
        packing.MIN_SHARED_PREFIX_TOKENS = previous


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=PAIRS, help="timed training steps per side")
    parser.add_argument("--score-pairs", type=int, default=SCORE_PAIRS,
                        help="timed scorings of the evaluation set per side")
    parser.add_argument("--batch-size", type=int, default=BATCH_SIZE)
    args = parser.parse_args()

    from benchmarks.bench_compile import step_timer
    from benchmarks.machine import dtype_name, machine_fields
    from components.common.model_catalog import resolve_model
    from components.common.model_loading import load_tokenizer
    from components.common.packing import pack_examples, score_examples
    from components.evaluate.evaluation import read_eval_examples, tokenize_examples
    from components.tune.runtime import start_runtime
    from components.tune.trainer import TuneConfig, _trainable_model

    reference = resolve_model("text-bison@002")
    tokenizer = load_tokenizer(reference.checkpoint)
    train = tokenize_examples(tokenizer, read_eval_examples(TRAIN_FILE))
    evaluation = tokenize_examples(tokenizer, read_eval_examples(EVAL_FILE))
    runtime = start_runtime("auto")
    config = TuneConfig(train_steps=1, learning_rate=1e-3, batch_size=args.batch_size,
                        compile="off")
    model, packs, loss, _ = _trainable_model(reference.checkpoint, config, runtime)
    max_tokens = config.max_tokens_per_micro_batch
    batches = [train[i * args.batch_size:(i + 1) * args.batch_size] for i in range(args.pairs + 1)]
    rows = {}
    for side in (True, False):
        with sharing(side):
            rows[side] = sum(row.num_tokens for row in pack_examples(batches[0], max_tokens, packs))
    print(f"{runtime.precision.describe()}; a step of {args.batch_size} examples computes "
          f"{rows[True]} tokens shared, {rows[False]} unshared", flush=True)

    step = step_timer(model, loss, runtime, max_tokens, packs)
    times = {True: [], False: []}
    step(batches[0])  # a first step: allocations, the kernels' build
    for pair, batch in enumerate(batches[1:]):
        for side in ((True, False) if pair % 2 == 0 else (False, True)):
            with sharing(side):
                times[side].append(step(batch))
        print(f"step pair {pair + 1}/{args.pairs}: shared {times[True][-1]:.2f} s, "
              f"unshared {times[False][-1]:.2f} s", flush=True)

    model.eval()
    score_times, losses = {True: [], False: []}, {True: [], False: []}
    for pair in range(args.score_pairs):
        for side in ((True, False) if pair % 2 == 0 else (False, True)):
            with sharing(side):
                started = time.perf_counter()
                scores = score_examples(model, evaluation, max_tokens)
                score_times[side].append(time.perf_counter() - started)
                losses[side].append(scores.loss_sum)
        print(f"scoring pair {pair + 1}/{args.score_pairs}: shared {score_times[True][-1]:.2f} s, "
              f"unshared {score_times[False][-1]:.2f} s (eval loss {losses[True][-1]:.4f} vs "
              f"{losses[False][-1]:.4f})", flush=True)
        if abs(losses[True][-1] - losses[False][-1]) > 1e-3 * abs(losses[False][-1]):
            print("the shared and unshared eval losses differ", file=sys.stderr)
            return 1

    on, off = statistics.median(times[True]), statistics.median(times[False])
    score_on, score_off = (statistics.median(score_times[side]) for side in (True, False))
    print(f"median step: shared {on:.2f} s, unshared {off:.2f} s; scoring the eval set: "
          f"shared {score_on:.2f} s, unshared {score_off:.2f} s")
    print(f"BENCH shared_prefix ratio={off / on:.3f} ours={on:.3f} baseline={off:.3f} unit=s/step "
          f"score_ratio={score_off / score_on:.3f} computed_tokens={rows[True]}/{rows[False]} "
          f"{machine_fields(dtype_name(runtime.dtype))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Benchmark: validate + transform end to end against the tokenizer's own batch encoding.

Generates 10,000 text examples of about 500 tokens each (random words, fixed seed) into a
temporary JSONL file, then

(a) ours: ``run_validation`` (reads, checks, tokenizes once, writes the validated directory and
    its token cache, report and histogram) followed by ``transform_dataset`` (reuses the tokens,
    writes the token dataset), end to end, each loading its own tokenizer as the components do;
(b) baseline: the tokenizer's own batch encoding, ``tokenizer(texts, add_special_tokens=False)``
    in batches of the same size, of the same prompts and targets, formatted the same way before
    the clock starts (formatting is not counted for the baseline).

Both are best of ``--repeat`` runs. Ours tokenizes with the Rust tokenizer's offset-free batch
call (``encode_batch_fast``, the same ids: see ``components/common/encoding.py``); the
baseline is the usual call, which also computes every token's character offsets.

The last line printed is ``BENCH transform ratio=<ours/baseline speed> ours=<examples/s>
baseline=<examples/s> unit=examples/s capability=<CPU> dtype=n/a`` (no floating-point work;
``benchmarks/machine.py``); the target is ratio >= 0.67.

Usage: ``python benchmarks/bench_transform.py [--examples N] [--repeat R]``.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.machine import machine_fields  # noqa: E402
from components.common.model_catalog import resolve_model  # noqa: E402
from components.common.model_loading import load_tokenizer  # noqa: E402
from components.common.prompts import chat_messages, format_prompt, format_target  # noqa: E402
from components.common.encoding import DEFAULT_BATCH_SIZE  # noqa: E402
from components.transform.transform import transform_dataset  # noqa: E402
from components.validate_dataset.validator import run_validation  # noqa: E402

MODEL = "text-bison@002"
INPUT_WORDS = 125
OUTPUT_WORDS = 30


def make_dataset(path: Path, examples: int, seed: int = 1234) -> None:
    rng = random.Random(seed)
    letters = "abcdefghijklmnopqrstuvwxyz"
    vocabulary = ["".join(rng.choice(letters) for _ in range(rng.randint(2, 7)))
                  for _ in range(3000)]
    with open(path, "w", encoding="utf-8") as handle:
        for _ in range(examples):
            example = {"input_text": " ".join(rng.choices(vocabulary, k=INPUT_WORDS)),
                       "output_text": " ".join(rng.choices(vocabulary, k=OUTPUT_WORDS))}
            handle.write(json.dumps(example) + "\n")


def run_ours(dataset: Path, work: Path) -> tuple[float, dict, dict]:
    for name in ("validated", "tokenized"):
        shutil.rmtree(work / name, ignore_errors=True)
    start = time.perf_counter()
    report = run_validation(str(dataset), "", "text", MODEL, "", work / "validated")
    report.raise_if_invalid()
    summary = transform_dataset(work / "validated", "text", MODEL, "", "", work / "tokenized")
    return time.perf_counter() - start, report.to_dict(), summary


def run_baseline(tokenizer, texts: list[str]) -> tuple[float, int]:
    start = time.perf_counter()
    tokens = 0
    for begin in range(0, len(texts), DEFAULT_BATCH_SIZE):
        ids = tokenizer(texts[begin:begin + DEFAULT_BATCH_SIZE], add_special_tokens=False,
                        return_attention_mask=False)["input_ids"]
        tokens += sum(len(x) for x in ids)
    return time.perf_counter() - start, tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=10_000)
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args()

    tokenizer = load_tokenizer(resolve_model(MODEL).checkpoint)  # converts the GGUF once
    with tempfile.TemporaryDirectory(prefix="bench-transform-") as tmp:
        work = Path(tmp)
        dataset = work / "train.jsonl"
        make_dataset(dataset, args.examples)
        examples = [json.loads(line) for line in dataset.open(encoding="utf-8")]
        texts = []
        for example in examples:
            texts.append(format_prompt(tokenizer, example["input_text"]))
            texts.append(format_target(tokenizer, chat_messages(example["input_text"]),
                                       example["output_text"]))
        del examples

        baseline_times, ours_times = [], []
        for _ in range(args.repeat):  # interleaved, so load changes hit both alike
            seconds, tokens = run_baseline(tokenizer, texts)
            baseline_times.append(seconds)
            seconds, report, summary = run_ours(dataset, work)
            ours_times.append(seconds)
        assert summary["train"]["num_tokens"] == tokens, (summary["train"]["num_tokens"], tokens)

    n = args.examples
    ours = n / min(ours_times)
    baseline = n / min(baseline_times)
    stats = report["files"]["train"]["token_stats"]
    print(f"examples: {n:,}; tokens per example: {tokens / n:.0f} (prompt mean "
          f"{stats['input']['mean']:.0f}, target mean {stats['output']['mean']:.0f}); "
          f"{tokens:,} tokens in all")
    print(f"ours (validate + transform, end to end): {', '.join(f'{t:.2f}' for t in ours_times)} s;"
          f" tokens reused by transform: {summary['train']['reused_tokens']}")
    print(f"baseline (tokenizer batch encoding only): "
          f"{', '.join(f'{t:.2f}' for t in baseline_times)} s")
    print(f"BENCH transform ratio={ours / baseline:.3f} ours={ours:.1f} baseline={baseline:.1f} "
          f"unit=examples/s {machine_fields('n/a')}")


if __name__ == "__main__":
    main()

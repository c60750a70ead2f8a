"""Benchmark: evaluate's batched generation against a naive one-prompt-at-a-time loop.

160 realistic evaluation prompts (classification, extraction and short-answer QA of varied
length, formatted with the chat template as evaluate formats them; ``--limit 250`` for Vertex's
largest evaluation set, which takes 12 minutes on a 2-core AVX2 CPU) are answered by the embedded
model (``resolve_model('text-bison@002')``, SmolLM2-135M-Instruct) twice, greedy, float32:

- ours: ``components.common.generation.generate_detailed`` (length-sorted batches, left padding,
  KV cache, finished rows dropped);
- baseline: Hugging Face ``model.generate`` on one prompt at a time (same prompt tokens, same
  end-of-turn ids, same maxOutputTokens).

Throughput is generated tokens (end-of-turn tokens not counted) per second of wall time, each
method's own tokens over its own time, after one warm-up call each. The two take turns on
chunks of 64 prompts, so load from other work on a shared machine hits both alike. Every example whose answers
differ is printed; the run fails (exit 1) when fewer than 99% are equal. Target: ratio >= 3.

Both run in float32 on every machine, so their greedy answers can be compared token for token
(evaluate itself runs in bf16 where the CPU has native bf16, see ``components.common.precision``).

The last line is ``BENCH evaluate ratio=<ours/baseline> ours=<tokens/s> baseline=<tokens/s>
unit=tokens/s capability=<CPU> dtype=float32`` (``benchmarks/machine.py``).

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_evaluate.py [--limit N] [--batch-size B]
"""
from __future__ import annotations

import argparse
import os
import random
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks.machine import machine_fields  # noqa: E402
from components.common.generation import (SamplingParams, generate_detailed,  # noqa: E402
                                          prompt_token_ids)
from components.common.model_catalog import resolve_model  # noqa: E402
from components.common.model_loading import load_base_model, load_tokenizer  # noqa: E402
from components.common.prompts import end_of_turn_token_ids, format_prompt  # noqa: E402

NUM_EXAMPLES = 250
DEFAULT_LIMIT = 160  # prompts answered by default (make bench's 20-minute budget)
MAX_OUTPUT_TOKENS = 48
MIN_EQUAL_FRACTION = 0.99
TARGET_RATIO = 3.0
DTYPE = torch.float32  # both methods: exact greedy answers to compare

_OPINIONS = [
    ("The acting was superb and the story kept me hooked until the very end.", "positive"),
    ("I walked out after forty minutes; the plot made no sense at all.", "negative"),
    ("A warm, funny film that the whole family enjoyed.", "positive"),
    ("The battery died within a day and support never answered my emails.", "negative"),
    ("Fast delivery, sturdy packaging and the blender works perfectly.", "positive"),
    ("The hotel room was dirty and the staff were rude at check-in.", "negative"),
    ("Honestly the best pizza I have had in years.", "positive"),
    ("The sequel repeats every joke of the first movie, only louder.", "negative"),
    ("It does what it says, nothing more, nothing less.", "neutral"),
    ("The update arrived on Tuesday and changed the menu layout.", "neutral"),
]
_FILLER = [
    "We went on a rainy Saturday with two friends.",
    "I had read several reviews beforehand.",
    "The price was about what I expected.",
    "My sister recommended it to me last month.",
    "It was our second visit this year.",
    "I ordered it together with a few other things.",
]
_HEADLINES = [
    ("Central bank raises interest rates for the third time this year", "business"),
    ("Local team wins the championship after a dramatic penalty shootout", "sports"),
    ("New smartphone chip promises twice the battery life", "technology"),
    ("Parliament passes the long-debated housing reform bill", "politics"),
    ("Researchers discover a new species of frog in the rainforest", "science"),
    ("Striker signs a record contract with the league leaders", "sports"),
    ("Start-up raises fifty million to build cheaper solar panels", "business"),
    ("Election results delayed as recount begins in three districts", "politics"),
]
_CAPITALS = [("France", "Paris"), ("Japan", "Tokyo"), ("Italy", "Rome"), ("Spain", "Madrid"),
             ("Germany", "Berlin"), ("Canada", "Ottawa"), ("Egypt", "Cairo"), ("Peru", "Lima"),
             ("Norway", "Oslo"), ("Kenya", "Nairobi"), ("Greece", "Athens"), ("Chile", "Santiago")]
_PEOPLE = [("Maria Lopez", "Madrid"), ("John Carter", "Boston"), ("Aiko Tanaka", "Osaka"),
           ("Pierre Dubois", "Lyon"), ("Anna Schmidt", "Hamburg"), ("Ravi Kumar", "Pune")]


def build_examples(count: int = NUM_EXAMPLES, seed: int = 0) -> list[tuple[str, str]]:
    """``count`` (input_text, expected output) pairs of mixed tasks and lengths."""
    rng = random.Random(seed)
    examples = []
    for index in range(count):
        kind = index % 6
        if kind == 0:
            text, label = rng.choice(_OPINIONS)
            context = " ".join(rng.sample(_FILLER, rng.randint(0, 4)))
            examples.append((f"Classify the sentiment of this review as positive, negative or "
                             f"neutral. Answer with one word.\n\nReview: {context} {text}".strip(), label))
        elif kind == 1:
            headline, topic = rng.choice(_HEADLINES)
            examples.append((f"What is the topic of this headline? Choose one of: business, sports, "
                             f"technology, politics, science.\n\nHeadline: {headline}", topic))
        elif kind == 2:
            country, capital = rng.choice(_CAPITALS)
            examples.append((f"What is the capital of {country}?", capital))
        elif kind == 3:
            a, b = rng.randint(2, 60), rng.randint(2, 60)
            examples.append((f"Compute {a} + {b}. Reply with the number only.", str(a + b)))
        elif kind == 4:
            (name, city), filler = rng.choice(_PEOPLE), rng.sample(_FILLER, rng.randint(1, 5))
            examples.append((f"Extract the city where the person lives from the text below.\n\n"
                             f"{' '.join(filler)} {name} has lived in {city} since 2015. "
                             f"{' '.join(rng.sample(_FILLER, 2))}", city))
        else:
            text, label = rng.choice(_OPINIONS)
            examples.append((f"Does the following sentence express a complaint? Answer yes or no.\n\n"
                             f"{text}", "yes" if label == "negative" else "no"))
    return examples


def naive_generate(model, tokenizer, prompts: list[str], max_new_tokens: int) -> list[list[int]]:
    """The baseline: Hugging Face ``generate``, one prompt at a time, greedy."""
    stops = end_of_turn_token_ids(tokenizer)
    outputs = []
    for prompt in prompts:
        ids = torch.tensor([prompt_token_ids(tokenizer, prompt)])
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                 max_new_tokens=max_new_tokens, eos_token_id=stops,
                                 pad_token_id=tokenizer.pad_token_id)
        outputs.append([t for t in out[0, ids.shape[1]:].tolist() if t not in stops])
    return outputs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--limit", type=int, default=DEFAULT_LIMIT)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-output-tokens", type=int, default=MAX_OUTPUT_TOKENS)
    parser.add_argument("--chunk", type=int, default=64,
                        help="prompts per alternation between the two methods")
    parser.add_argument("--skip-baseline", action="store_true", help="development: ours only")
    args = parser.parse_args(argv)

    checkpoint = resolve_model("text-bison@002").checkpoint
    tokenizer = load_tokenizer(checkpoint)
    model = load_base_model(checkpoint, "cpu", DTYPE)
    examples = build_examples(args.limit)
    prompts = [format_prompt(tokenizer, text) for text, _ in examples]
    lengths = [len(prompt_token_ids(tokenizer, p)) for p in prompts]
    params = SamplingParams(args.max_output_tokens)
    print(f"{len(prompts)} prompts, {min(lengths)}-{max(lengths)} tokens (mean "
          f"{sum(lengths) / len(lengths):.0f}); maxOutputTokens={params.max_output_tokens}; greedy, "
          f"float32, {torch.get_num_threads()} threads; batch size {args.batch_size}; load average "
          f"{os.getloadavg()}", flush=True)

    # Warm-up, then both methods chunk by chunk (the same prompts), alternating which goes
    # first: the machine is shared, and load that comes and goes hits both alike. Ours answers a
    # whole chunk with one call, as evaluate answers its whole eval set (a chunk of 64 prompts is
    # two batches of 32, so refills between batches happen as they do in evaluate, just less
    # often: if anything, this understates ours).
    generate_detailed(model, tokenizer, prompts[:4], SamplingParams(4), batch_size=args.batch_size)
    naive_generate(model, tokenizer, prompts[:1], 4)
    ours: list = [None] * len(prompts)
    baseline: list = [None] * len(prompts)
    ours_seconds = baseline_seconds = 0.0
    chunks = [list(range(start, min(start + args.chunk, len(prompts))))
              for start in range(0, len(prompts), args.chunk)]
    for number, chunk in enumerate(chunks, 1):
        group = [prompts[i] for i in chunk]
        seconds = {}
        for method in (("ours", "baseline") if number % 2 else ("baseline", "ours")):
            if method == "baseline" and args.skip_baseline:
                continue
            started = time.perf_counter()
            if method == "ours":
                answers = [g.token_ids for g in generate_detailed(
                    model, tokenizer, group, params, batch_size=args.batch_size)]
            else:
                answers = naive_generate(model, tokenizer, group, params.max_output_tokens)
            seconds[method] = time.perf_counter() - started
            for index, ids in zip(chunk, answers):
                (ours if method == "ours" else baseline)[index] = ids
        ours_seconds += seconds["ours"]
        baseline_seconds += seconds.get("baseline", 0.0)
        tokens = sum(len(ours[i]) for i in chunk)
        print(f"chunk {number}/{len(chunks)}: {len(chunk)} prompts, {tokens} tokens: ours "
              f"{seconds['ours']:.1f} s" + (f", baseline {seconds['baseline']:.1f} s"
                                            if "baseline" in seconds else ""), flush=True)
    ours_tokens = sum(len(ids) for ids in ours)
    ours_rate = ours_tokens / ours_seconds
    print(f"ours:     {ours_tokens} tokens in {ours_seconds:.1f} s = {ours_rate:.1f} tokens/s")
    if args.skip_baseline:
        return 0
    baseline_tokens = sum(len(ids) for ids in baseline)
    baseline_rate = baseline_tokens / baseline_seconds
    print(f"baseline: {baseline_tokens} tokens in {baseline_seconds:.1f} s = {baseline_rate:.1f} tokens/s")
    print(f"load average (1, 5, 15 min) at the end: {os.getloadavg()}")

    differences = [i for i, (a, b) in enumerate(zip(ours, baseline)) if a != b]
    for i in differences:
        print(f"DIFFERENT example {i}: {examples[i][0]!r}\n  ours:     "
              f"{tokenizer.decode(ours[i])!r}\n  baseline: {tokenizer.decode(baseline[i])!r}")
    equal = 1 - len(differences) / len(prompts)
    exact = sum(tokenizer.decode(ids, skip_special_tokens=True).strip() == expected
                for ids, (_, expected) in zip(ours, examples)) / len(examples)
    ratio = ours_rate / baseline_rate
    print(f"same outputs: {len(prompts) - len(differences)}/{len(prompts)} ({equal:.1%}; need "
          f">= {MIN_EQUAL_FRACTION:.0%}); speed-up {ratio:.2f}x (target >= {TARGET_RATIO:.0f}x: "
          f"{'met' if ratio >= TARGET_RATIO else 'NOT met'}); base model exact match {exact:.1%}")
    print(f"BENCH evaluate ratio={ratio:.2f} ours={ours_rate:.1f} baseline={baseline_rate:.1f} "
          f"unit=tokens/s {machine_fields(DTYPE)}")
    return 0 if equal >= MIN_EQUAL_FRACTION else 1


if __name__ == "__main__":
    sys.exit(main())

"""Benchmark: our tuner against a plain Hugging Face Trainer + PEFT on the same LoRA job.

The job: the embedded model (``resolve_model('text-bison@002')``, SmolLM2-135M-Instruct), LoRA
rank 8 on every linear layer (alpha 16, no dropout), AdamW at 1e-3, batch size 8 (Vertex's GPU
batch size), one warm-up step then ``--steps`` timed steps, on the same data: ``--examples``
(160) examples with prompts of 64-512 tokens and answers of 5-100 tokens (uniform, seeded;
random token ids framed like chat turns, the answer ending with ``<|im_end|>``), the loss on the
answer tokens only.

Precision: both sides compute in the dtype the tuner trains in on this machine,
``components.common.precision.choose_precision("cpu")`` (``TUNEPIPE_PRECISION`` forces it):
bfloat16 where the CPU has native bf16 units (AMX, AVX512_BF16, Arm BF16), float32 elsewhere
(an AVX2 CPU emulates bf16 products 40-60 times more slowly than it multiplies in float32). So
a float32 machine compares float32 with float32, and a bf16 machine bf16 with bf16.

- ours: ``components.tune.trainer.tune`` as the pipeline runs it, default settings (packed rows
  with per-example attention, logits only at target positions, fused LoRA layers; in bf16 a
  bf16 frozen base with float32 adapters under bf16 autocast, in float32 everything in
  float32); its decoder layers are compiled as ``compile="auto"`` decides for a long run
  (``--compile long-run``, the default: compiled, as runs of 200+ steps on a CPU are;
  ``--compile auto|on|off`` passes a mode as is),
  in the tuner's warm-up before the first step, not timed, and printed;
- baseline: ``transformers.Trainer`` with PEFT, in its best configuration for this kind of CPU
  that we found (``BASELINE_VARIANTS``; ``--baseline`` picks another of the same dtype, all are
  printed). In bf16 (``bf16-grouped``): the base weights in bf16, ``bf16=True`` (autocast, AMX),
  ``train_sampling_strategy="group_by_length"`` (batches of similar lengths, little padding),
  ``DataCollatorForSeq2Seq`` padding to the longest example of the batch, SDPA attention,
  ``adamw_torch_fused``; float32 weights under autocast, random batches, padding-free packing
  (``DataCollatorWithFlattening``) and ``torch_compile=True`` were slower on the AMX machine.
  In float32 (``fp32-grouped``): the same with float32 weights and no bf16 flag at all (pure
  float32); ``fp32-padded`` and ``fp32-flatten`` are its random-batch and packed variants.

Each side runs in its own process (so each peak resident memory is its own) and the two take
turns, ``--chunk`` steps at a time, so load from other work on a shared machine hits both
alike; time spent waiting for a turn is not counted. Throughput is non-padding tokens (all
input tokens of the examples, prompt and answer) per second of training step, steps 2 to the
end, each side's own tokens over its own time.

FLOP/s: an exact count of the multiply-adds the job needs (not the 6 x parameters x tokens
rule, which would count weight gradients of frozen weights and the LM head at every position):
per example of L tokens with n answer targets, forward = 2 L (linear weights) + 2 L (LoRA
weights) + 2 H d L (L + 1) per layer for causal attention (QK^T and AV over the lower
triangle) + 2 n d V (LM head at target positions); backward = input gradients of every matmul
(as much again) + weight gradients of the LoRA matrices only (once more their forward). Both
sides are credited the same useful FLOPs for the same examples, so the FLOP/s ratio is the
tokens/s ratio; the baseline actually executes more (padding, logits over the whole 49k
vocabulary at every position). The peak is the best ``torch.matmul`` FLOP/s of square products
in the training dtype, timed before and after the training in the same run with the same number
of threads, sizes 512 to 4096 growing while the next size still fits ``--peak-seconds`` (so it
is bounded in time even where a product is slow).

Targets, by the dtype trained in: bfloat16 (a CPU with native bf16) ratio >= 2; float32 (an
AVX2 CPU) ratio >= 1.6 and ours >= 60% of the float32 matmul peak. Defaults: 12 timed steps in
bf16, 4 in float32 (an AVX2 CPU trains several times more slowly; ``make bench`` must finish in
20 minutes on the 2-core AVX2 machine).

The last line is ``BENCH tune ratio=<ours/baseline> ours=<tokens/s> baseline=<tokens/s>
unit=tokens/s capability=<CPU> dtype=<dtype>`` (``benchmarks/machine.py``), e.g.
``capability=AVX2 dtype=float32``.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_tune.py [--steps N] [--examples N]
        [--batch-size 8] [--chunk 2] [--threads N] [--baseline fp32-grouped]
        [--peak-seconds 10] [--compile auto|on|off] [--only ours|baseline]

A smoke run (a minute or two): ``--steps 1 --examples 8 --batch-size 2 --peak-seconds 1``.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks.machine import dtype_name, machine_fields  # noqa: E402

NUM_EXAMPLES = 160
BATCH_SIZE = 8
LORA_RANK = 8
LEARNING_RATE = 1e-3
PROMPT_TOKENS = (64, 512)
ANSWER_TOKENS = (5, 100)
SEED = 1234
# dtype trained in -> (ours / baseline at least, ours' fraction of the matmul peak at least)
TARGETS = {"bfloat16": (2.0, None), "float32": (1.6, 0.60)}
DEFAULT_STEPS = {"bfloat16": 12, "float32": 4}  # timed steps; keeps `make bench` in 20 minutes
PEAK_SIZES = (512, 1024, 2048, 4096)  # square matmuls timed for the peak, while they fit
PEAK_SECONDS = 10.0  # time budget of one peak measurement

# name -> (description, base weights dtype, Trainer bf16 autocast, batching). A variant computes
# in bf16 when it autocasts, else in float32; a run only takes the variants of its own dtype.
# Measured on the AMX machine (2 cores, 2 threads, 4 timed steps each, tokens/s): bf16-grouped
# 387; bf16-fp32weights-grouped 262 (fp32 weights under autocast: every matmul casts its
# weight); bf16-padded 222 (random batches: padding); bf16-flatten 186 (padding-free packing:
# transformers builds one block-diagonal mask over the whole packed row, so attention costs the
# square of the row); bf16-grouped-compiled 39 (torch_compile=True recompiles for the varying
# batch shapes). The float32 variants are the same batchings without any bf16.
BASELINE_VARIANTS = {
    "bf16-grouped": ("bf16 weights, bf16=True autocast, group_by_length, pad to longest",
                     "bfloat16", True, "group_by_length"),
    "bf16-fp32weights-grouped": ("fp32 weights, bf16=True autocast, group_by_length, pad to "
                                 "longest", "float32", True, "group_by_length"),
    "bf16-flatten": ("bf16 weights, bf16=True autocast, padding-free DataCollatorWithFlattening",
                     "bfloat16", True, "flatten"),
    "bf16-padded": ("bf16 weights, bf16=True autocast, random batches padded to longest",
                    "bfloat16", True, "none"),
    "bf16-grouped-compiled": ("bf16 weights, bf16=True autocast, group_by_length, pad to longest, "
                              "torch_compile=True", "bfloat16", True, "group_by_length+compile"),
    "fp32-grouped": ("pure float32: fp32 weights, no bf16 flag, group_by_length, pad to longest",
                     "float32", False, "group_by_length"),
    "fp32-padded": ("pure float32: fp32 weights, no bf16 flag, random batches padded to longest",
                    "float32", False, "none"),
    "fp32-flatten": ("pure float32: fp32 weights, no bf16 flag, padding-free "
                     "DataCollatorWithFlattening", "float32", False, "flatten"),
}
DEFAULT_BASELINE = {"bfloat16": "bf16-grouped", "float32": "fp32-grouped"}


def variant_dtype(name: str) -> str:
    """The dtype a baseline variant computes in: bfloat16 under autocast, else float32."""
    _, weights_dtype, autocast, _ = BASELINE_VARIANTS[name]
    return "bfloat16" if autocast else weights_dtype


# --- data -------------------------------------------------------------------------------------

def write_dataset(directory: Path, tokenizer, num_examples: int = NUM_EXAMPLES) -> Path:
    """The benchmark's examples as a token dataset (what transform writes)."""
    from components.common.artifacts.token_dataset import TokenDatasetWriter

    rng = np.random.default_rng(SEED)
    start = tokenizer.convert_tokens_to_ids("<|im_start|>")
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    user = tokenizer("user\n", add_special_tokens=False).input_ids
    assistant = tokenizer("assistant\n", add_special_tokens=False).input_ids
    with TokenDatasetWriter(directory) as writer:
        for _ in range(num_examples):
            prompt_length = int(rng.integers(PROMPT_TOKENS[0], PROMPT_TOKENS[1] + 1))
            answer_length = int(rng.integers(ANSWER_TOKENS[0], ANSWER_TOKENS[1] + 1))
            body = rng.integers(200, 40_000, prompt_length - len(user) - len(assistant) - 4).tolist()
            prompt = [start, *user, *body, end, start, *assistant]
            prompt += [int(rng.integers(200, 40_000))] * (prompt_length - len(prompt))
            answer = rng.integers(200, 40_000, answer_length - 1).tolist() + [end]
            writer.add(prompt + answer, [0] * len(prompt) + [1] * len(answer))
    return directory


def useful_flops(config: dict, examples) -> float:
    """The FLOPs one training pass over ``examples`` needs (see the module docstring)."""
    hidden, layers = config["hidden_size"], config["num_hidden_layers"]
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or hidden // heads
    kv_heads = config.get("num_key_value_heads", heads)
    intermediate, vocab = config["intermediate_size"], config["vocab_size"]
    projections = [(hidden, heads * head_dim), (hidden, kv_heads * head_dim),
                   (hidden, kv_heads * head_dim), (heads * head_dim, hidden),
                   (hidden, intermediate), (hidden, intermediate), (intermediate, hidden)]
    linear = layers * sum(i * o for i, o in projections)
    lora = layers * sum(LORA_RANK * (i + o) for i, o in projections)
    total = 0.0
    for ids, mask in examples:
        length, targets = len(ids), int(mask[1:].sum())
        attention = layers * 2 * heads * head_dim * length * (length + 1)
        forward_linear, forward_lora = 2 * length * linear, 2 * length * lora
        head = 2 * targets * hidden * vocab
        total += 2 * forward_linear + 3 * forward_lora + 3 * attention + 2 * head
    return total


def parameter_count(config: dict) -> int:
    """Parameters of a Llama-style model with tied embeddings (134.5M for SmolLM2-135M)."""
    hidden, layers = config["hidden_size"], config["num_hidden_layers"]
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or hidden // heads
    kv_heads = config.get("num_key_value_heads", heads)
    per_layer = (2 * hidden * heads * head_dim + 2 * hidden * kv_heads * head_dim
                 + 3 * hidden * config["intermediate_size"] + 2 * hidden)
    return config["vocab_size"] * hidden + layers * per_layer + hidden


def matmul_peak(threads: int, dtype: torch.dtype, seconds: float = PEAK_SECONDS,
                sizes=PEAK_SIZES, repeats: int = 3) -> tuple[float, int]:
    """``(FLOP/s, size)``: the best square ``dtype`` matmul of ``sizes``, in about ``seconds``.

    Each size gets a warm-up product and up to ``repeats`` timed ones; the next, larger size is
    tried only when its warm-up and one timed product fit the time left at the best rate so far
    (a product 8 times larger takes 8 times as long), so a slow dtype stops at a small size.
    """
    torch.set_num_threads(threads)
    deadline = time.perf_counter() + seconds
    best, best_size = 0.0, 0
    for size in sizes:
        flops = 2 * size ** 3
        if best and 2 * flops / best > deadline - time.perf_counter():
            break
        a = torch.randn(size, size).to(dtype)
        b = torch.randn(size, size).to(dtype)
        a @ b  # warm-up
        for _ in range(repeats):
            started = time.perf_counter()
            a @ b
            rate = flops / (time.perf_counter() - started)
            if rate > best:
                best, best_size = rate, size
            if time.perf_counter() > deadline:
                return best, best_size
    return best, best_size


# --- workers (one process each) ---------------------------------------------------------------

def _turn(step: int) -> None:
    """Waits for the coordinator's go before the next step."""
    print(f"@@STEP {step}", flush=True)
    if sys.stdin.readline().strip() != "go":
        sys.exit(0)


def _compile_mode(requested: str) -> str:
    """The tuner's compile mode: ``long-run`` is what ``auto`` picks for a long run on a CPU
    (compiled, in either precision: components.tune.acceleration), the others as given."""
    return "on" if requested == "long-run" else requested


def worker_ours(args) -> dict:
    from components.common.model_catalog import resolve_model
    from components.tune.trainer import TuneConfig, tune

    torch.set_num_threads(args.threads)
    config = TuneConfig(train_steps=args.steps + 1, learning_rate=LEARNING_RATE,
                        batch_size=args.batch_size, adapter_size=LORA_RANK,
                        enable_early_stopping=False,  # precision "auto"
                        compile=_compile_mode(args.compile))
    output = Path(args.work) / "ours"
    result = tune(resolve_model("text-bison@002").to_dict(), Path(args.work) / "train", None,
                  output, config, on_step_end=_turn)
    if result.dtype != args.dtype:  # the same rule and environment as the coordinator's
        raise RuntimeError(f"the tuner trained in {result.dtype} ({result.precision}), while the "
                           f"benchmark chose {args.dtype}")
    records = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    timed = [r for r in records if r["step"] >= 2]
    return {"tokens": sum(r["num_tokens"] for r in timed),
            "seconds": sum(r["step_seconds"] for r in timed),
            "steps": [r["step"] for r in timed], "dtype": result.dtype,
            "peak_memory_bytes": result.peak_memory_bytes,
            "loss": f"last-step train loss {records[-1]['train_total_loss']:.3f}",
            "warmup_seconds": records[0]["step_seconds"] + result.compile_seconds,
            "settings": f"components.tune.trainer.tune, defaults: packed rows (<= "
                        f"{config.max_tokens_per_micro_batch} tokens) with per-example attention, "
                        f"target-only logits, {result.precision}, fp32 LoRA (fused layers), "
                        f"compile={config.compile} (" + (f"compiled, {result.compile_seconds:.0f} s "
                        "in the warm-up" if result.compile_seconds else "not compiled") + "), AdamW"}


def worker_baseline(args) -> dict:
    from peft import LoraConfig, get_peft_model
    from transformers import (AutoModelForCausalLM, DataCollatorForSeq2Seq,
                              DataCollatorWithFlattening, Trainer, TrainerCallback,
                              TrainingArguments)

    from components.common.model_catalog import resolve_model
    from components.common.model_loading import load_tokenizer
    from components.common.artifacts.token_dataset import TokenDataset

    torch.set_num_threads(args.threads)
    description, weights_dtype, autocast, batching = BASELINE_VARIANTS[args.baseline]
    checkpoint = resolve_model("text-bison@002").checkpoint
    tokenizer = load_tokenizer(checkpoint)
    tokenizer.padding_side = "right"
    examples = []
    for ids, mask in TokenDataset(Path(args.work) / "train"):
        ids = ids.astype(np.int64).tolist()
        examples.append({"input_ids": ids, "attention_mask": [1] * len(ids),
                         "labels": [t if m else -100 for t, m in zip(ids, mask)]})
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=getattr(torch, weights_dtype))
    model = get_peft_model(model, LoraConfig(r=LORA_RANK, lora_alpha=2 * LORA_RANK, lora_dropout=0.0,
                                             target_modules="all-linear", task_type="CAUSAL_LM"))
    if batching == "flatten":
        flatten = DataCollatorWithFlattening()
        inner = lambda features: flatten([{k: f[k] for k in ("input_ids", "labels")} for f in features])  # noqa: E731
    else:
        inner = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)
    tokens_per_batch: list[int] = []

    def collate(features):
        tokens_per_batch.append(sum(len(f["input_ids"]) for f in features))  # non-padding tokens
        return inner(features)

    class Turns(TrainerCallback):
        def __init__(self):
            self.seconds: dict[int, float] = {}
            self.resumed = time.perf_counter()

        def on_train_begin(self, *unused, **kwargs):
            self.resumed = time.perf_counter()

        def on_step_end(self, args_, state, control, **kwargs):
            self.seconds[state.global_step] = time.perf_counter() - self.resumed
            _turn(state.global_step)
            self.resumed = time.perf_counter()

    turns = Turns()
    training = TrainingArguments(
        output_dir=str(Path(args.work) / "baseline"), max_steps=args.steps + 1,
        per_device_train_batch_size=args.batch_size, learning_rate=LEARNING_RATE, weight_decay=0.0,
        lr_scheduler_type="cosine", warmup_steps=1, max_grad_norm=1.0, optim="adamw_torch_fused",
        bf16=autocast, use_cpu=True, torch_compile=batching.endswith("+compile"),
        train_sampling_strategy="group_by_length" if batching.startswith("group_by_length") else "random",
        dataloader_num_workers=0, remove_unused_columns=False, logging_steps=10_000,
        save_strategy="no", report_to=[], seed=SEED, disable_tqdm=True)
    trainer = Trainer(model=model, args=training, train_dataset=examples, data_collator=collate,
                      callbacks=[turns])
    output = trainer.train()
    timed = range(2, args.steps + 2)
    return {"tokens": sum(tokens_per_batch[step - 1] for step in timed),
            "seconds": sum(turns.seconds[step] for step in timed), "steps": list(timed),
            "peak_memory_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "loss": f"mean train loss {output.training_loss:.3f}", "warmup_seconds": turns.seconds[1],
            "settings": f"transformers.Trainer + PEFT ({args.baseline}): {description}, "
                        "SDPA attention, adamw_torch_fused"}


# --- coordinator --------------------------------------------------------------------------------

class Worker:
    """A worker process that stops before every step until told to go on."""

    def __init__(self, role: str, args):
        command = [sys.executable, __file__, "--worker", role, "--work", args.work,
                   "--steps", str(args.steps), "--threads", str(args.threads),
                   "--baseline", args.baseline, "--batch-size", str(args.batch_size),
                   "--dtype", args.dtype, "--compile", args.compile]
        self.role = role
        self.log = open(Path(args.work) / f"{role}.log", "w")
        self.process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        stderr=self.log, text=True, bufsize=1)
        self.result: dict | None = None
        self.step = 0

    def run_until_next_turn(self) -> None:
        """Lets the worker run one step (after the first call) and waits for its next stop."""
        if self.step:
            self.process.stdin.write("go\n")
            self.process.stdin.flush()
        for line in self.process.stdout:
            if line.startswith("@@STEP "):
                self.step = int(line.split()[1])
                return
            if line.startswith("@@RESULT "):
                self.result = json.loads(line[len("@@RESULT "):])
                self.process.wait()
                return
        self.process.wait()
        self.log.flush()
        tail = Path(self.log.name).read_text()[-3000:]
        raise RuntimeError(f"the {self.role} worker failed (exit {self.process.returncode}):\n{tail}")

    @property
    def done(self) -> bool:
        return self.result is not None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int,
                        help="timed steps after one warm-up (default: "
                             + ", ".join(f"{v} in {k}" for k, v in DEFAULT_STEPS.items()) + ")")
    parser.add_argument("--examples", type=int, default=NUM_EXAMPLES, help="examples in the data")
    parser.add_argument("--batch-size", type=int, default=BATCH_SIZE)
    parser.add_argument("--chunk", type=int, default=2, help="steps per turn")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--baseline", choices=sorted(BASELINE_VARIANTS),
                        help="Trainer + PEFT variant (default: " + ", ".join(
                            f"{v} in {k}" for k, v in DEFAULT_BASELINE.items()) + ")")
    parser.add_argument("--peak-seconds", type=float, default=PEAK_SECONDS,
                        help="time budget of each matmul peak measurement")
    parser.add_argument("--compile", default="long-run", choices=["long-run", "auto", "on", "off"],
                        help="ours: compile the decoder layers (long-run: as compile=auto does "
                             "for a run of 200+ steps; auto: the tuner's rule for this short run)")
    parser.add_argument("--only", choices=["ours", "baseline"])
    parser.add_argument("--worker", choices=["ours", "baseline"], help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    parser.add_argument("--dtype", choices=sorted(TARGETS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if (args.steps is not None and args.steps < 1) or args.examples < 1 or args.batch_size < 1:
        parser.error("--steps, --examples and --batch-size must be at least 1")

    if args.worker:
        result = (worker_ours if args.worker == "ours" else worker_baseline)(args)
        print("@@RESULT " + json.dumps(result), flush=True)
        return 0

    from components.common.model_catalog import resolve_model
    from components.common.model_loading import load_tokenizer
    from components.common.precision import choose_precision
    from components.common.artifacts.token_dataset import TokenDataset

    precision = choose_precision("cpu")  # what the tuner trains in here; both sides use it
    args.dtype = dtype_name(precision.dtype)
    args.steps = args.steps or DEFAULT_STEPS[args.dtype]
    args.baseline = args.baseline or DEFAULT_BASELINE[args.dtype]
    if variant_dtype(args.baseline) != args.dtype:
        parser.error(f"--baseline {args.baseline} computes in {variant_dtype(args.baseline)}, but "
                     f"the tuner trains in {args.dtype} here ({precision.describe()}); pick a "
                     f"{args.dtype} variant, or set TUNEPIPE_PRECISION to compare in the other dtype")
    checkpoint = resolve_model("text-bison@002").checkpoint
    model_config = json.loads((Path(checkpoint) / "config.json").read_text())
    with tempfile.TemporaryDirectory(prefix="bench-tune-") as work:
        args.work = work
        dataset = TokenDataset(write_dataset(Path(work) / "train", load_tokenizer(checkpoint),
                                             args.examples))
        lengths = dataset.lengths()
        print(f"data: {len(dataset)} examples, {int(lengths.min())}-{int(lengths.max())} tokens "
              f"(mean {lengths.mean():.0f}), prompts {PROMPT_TOKENS[0]}-{PROMPT_TOKENS[1]}, answers "
              f"{ANSWER_TOKENS[0]}-{ANSWER_TOKENS[1]}; batch {args.batch_size}, LoRA rank "
              f"{LORA_RANK} on all linear layers, 1 warm-up + {args.steps} timed steps, "
              f"{args.threads} threads", flush=True)
        print(f"precision: {precision.describe()}; machine: {machine_fields(args.dtype)}", flush=True)
        peak, size = matmul_peak(args.threads, precision.dtype, args.peak_seconds)
        print(f"{args.dtype} matmul peak (best square product of up to {size}, "
              f"{args.peak_seconds:g} s budget): {peak / 1e12:.3f} TFLOP/s", flush=True)

        roles = [args.only] if args.only else ["ours", "baseline"]
        workers = [Worker(role, args) for role in roles]
        for worker in workers:  # load the models and run the warm-up step, one at a time
            worker.run_until_next_turn()
        while not all(w.done for w in workers):
            for worker in workers:
                for _ in range(args.chunk):
                    if not worker.done:
                        worker.run_until_next_turn()
        after, size_after = matmul_peak(args.threads, precision.dtype, args.peak_seconds)
        print(f"{args.dtype} matmul peak after training: {after / 1e12:.3f} TFLOP/s (size "
              f"{size_after})", flush=True)
        peak = max(peak, after)

        # The examples each side trained on in its timed steps give the useful FLOPs: the same
        # sampler for ours; the baseline's own order, recovered from its token counts, would
        # differ only by which examples, so both are credited at ours' FLOPs per token.
        from components.tune.trainer import BatchSampler

        sampler = BatchSampler(len(dataset), args.batch_size, seed=0)
        timed = [dataset[i] for step in range(1, args.steps + 1) for i in sampler.indices(step)]
        flops_per_token = useful_flops(model_config, timed) / sum(len(ids) for ids, _ in timed)
        rates, fractions = {}, {}
        for worker in workers:
            result = worker.result
            rate = result["tokens"] / result["seconds"]
            rates[worker.role] = rate
            flops = rate * flops_per_token
            fractions[worker.role] = flops / peak
            print(f"{worker.role}: {result['settings']}")
            print(f"  {int(result['tokens']):,} tokens in {result['seconds']:.1f} s = {rate:.0f} tokens/s; "
                  f"{flops / 1e12:.3f} useful TFLOP/s = {100 * flops / peak:.1f}% of the {args.dtype} "
                  f"matmul peak; peak resident memory {result['peak_memory_bytes'] / 2**30:.2f} GiB; "
                  f"warm-up step {result['warmup_seconds']:.1f} s; {result['loss']}", flush=True)
        print(f"useful FLOPs per token: {flops_per_token / 1e6:.0f} M "
              f"(6 x parameters would say {6 * parameter_count(model_config) / 1e6:.0f} M)")
    if len(rates) < 2:
        return 0
    ratio = rates["ours"] / rates["baseline"]
    target_ratio, target_fraction = TARGETS[args.dtype]
    print(f"target ({args.dtype}) ratio >= {target_ratio}: "
          f"{'met' if ratio >= target_ratio else 'NOT met'} ({ratio:.2f})")
    if target_fraction is not None:
        print(f"target ({args.dtype}) ours >= {target_fraction:.0%} of the {args.dtype} matmul peak: "
              f"{'met' if fractions['ours'] >= target_fraction else 'NOT met'} "
              f"({fractions['ours']:.1%})")
    print(f"BENCH tune ratio={ratio:.2f} ours={rates['ours']:.1f} baseline={rates['baseline']:.1f} "
          f"unit=tokens/s {machine_fields(args.dtype)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

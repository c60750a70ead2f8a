"""Benchmark: does compiling the decoder layers pay for itself? Compiled against eager steps.

The tuner's model for the embedded SmolLM2-135M-Instruct (LoRA rank 8, the precision
:mod:`components.common.precision` picks), built twice in one process with the same weights:
once eager, once with compiled decoder layers (``components.tune.acceleration``) and an empty
Inductor cache (what a new user pays). Each takes a first step (the compiled one compiles in
it: the warm-up is the difference between the two first steps), then they take turns on the
same batches, ``--pairs`` times (who goes first alternates), so that drift of a shared machine's
speed hits both alike: sequential runs on the 2-core AVX2 machine drifted by more than the
difference measured. A step is the forward and backward of a batch of ``--batch-size``
examples of ``benchmarks/bench_tune.py``'s job (prompts of 64-512 tokens, answers of 5-100); the
optimizer step, the same on both sides, is left out. Reported: the warm-up, the median step
time of each side, and the number of steps after which compiling has paid for its warm-up.
These are the numbers behind ``compile="auto"`` in :mod:`components.tune.acceleration`.

The last line is ``BENCH compile ratio=<eager step / compiled step> ours=<compiled s/step>
baseline=<eager s/step> unit=s/step warm_up=<s> break_even_steps=<n> capability=<CPU> dtype=<dtype>``.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_compile.py [--pairs N] [--batch-size N]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

PAIRS = 5
BATCH_SIZE = 8


def step_timer(model, loss, runtime, max_tokens: int, packs: bool):
    """A function timing one forward and backward of ``model`` over a batch of examples."""
    from components.common.packing import pack_examples, packed_loss

    def step(examples) -> float:
        for parameter in model.parameters():
            parameter.grad = None
        started = time.perf_counter()
        for row in pack_examples(examples, max_tokens, packs):
            with runtime.autocast():
                row_loss, _ = packed_loss(model, row, loss)
            row_loss.sum().backward()
        return time.perf_counter() - started

    return step


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=PAIRS, help="timed steps per side")
    parser.add_argument("--batch-size", type=int, default=BATCH_SIZE)
    args = parser.parse_args()
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="bench-compile-inductor-")

    from benchmarks.bench_tune import write_dataset
    from benchmarks.machine import dtype_name, machine_fields
    from components.common.model_catalog import resolve_model
    from components.common.model_loading import load_tokenizer
    from components.common.artifacts.token_dataset import TokenDataset
    from components.tune.acceleration import compile_decoder_layers, compiled_token_loss
    from components.tune.runtime import start_runtime
    from components.tune.trainer import TuneConfig, _trainable_model

    reference = resolve_model("text-bison@002")
    runtime = start_runtime("auto")
    config = TuneConfig(train_steps=1, learning_rate=1e-3, batch_size=args.batch_size,
                        compile="off")
    with tempfile.TemporaryDirectory(prefix="bench-compile-") as work:
        data = write_dataset(Path(work) / "train", load_tokenizer(reference.checkpoint),
                             args.batch_size * (args.pairs + 1))
        examples = list(TokenDataset(data))
    batches = [examples[i:i + args.batch_size] for i in range(0, len(examples), args.batch_size)]
    eager, packs, loss, _ = _trainable_model(reference.checkpoint, config, runtime)
    compiled, _, _, _ = _trainable_model(reference.checkpoint, config, runtime)
    compiled.load_state_dict(eager.state_dict())
    compile_decoder_layers(compiled)
    sides = {"eager": step_timer(eager, loss, runtime, config.max_tokens_per_micro_batch, packs),
             "compiled": step_timer(compiled, compiled_token_loss(), runtime,
                                    config.max_tokens_per_micro_batch, packs)}
    first = {name: step(batches[0]) for name, step in sides.items()}
    warm_up = first["compiled"] - first["eager"]
    print(f"first step: eager {first['eager']:.1f} s, compiled {first['compiled']:.1f} s "
          f"(warm-up {warm_up:.1f} s); {runtime.precision.describe()}", flush=True)
    times = {name: [] for name in sides}
    for pair, batch in enumerate(batches[1:]):
        order = list(sides) if pair % 2 == 0 else list(sides)[::-1]
        for name in order:
            times[name].append(sides[name](batch))
        print(f"pair {pair + 1}/{len(batches) - 1}: "
              + ", ".join(f"{name} {times[name][-1]:.2f} s" for name in sides), flush=True)
    on, off = (statistics.median(times[name]) for name in ("compiled", "eager"))
    saving = off - on
    break_even = warm_up / saving if saving > 0 else float("inf")
    print(f"median step: compiled {on:.2f} s, eager {off:.2f} s; compiling saves {saving:.2f} s "
          f"a step and pays after {break_even:.0f} steps")
    dtype = dtype_name(runtime.dtype)
    print(f"BENCH compile ratio={off / on:.3f} ours={on:.3f} baseline={off:.3f} unit=s/step "
          f"warm_up={warm_up:.1f} break_even_steps={break_even:.0f} {machine_fields(dtype)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Benchmark: the int8 kernels' variants (``TUNEPIPE_KERNEL_ISA``: AVX2, AVX-512) side by side.

The embedded model (``resolve_model('text-bison@002')``, SmolLM2-135M-Instruct) with int8
weights, on the CPU's threads: a decode step of one row and of ``--rows`` rows (8) after a
prefill of a 64-token prompt per row (``FastDecodeStep``), and a prefill of one 128-token prompt
(``PackedPrefill``). Each variant has its own caches; the variants take turns step by step
(alternating which goes first), so load from other work hits both alike; each number is the
median of ``--steps`` (64) timings. Variants the CPU lacks are left out, and said so.

The last line is ``BENCH kernels_isa ratio=<AVX2 ms / AVX-512 ms, one-row step>
avx2_ms=<one-row step> avx512_ms=<one-row step or n/a> unit=ms capability=<CPU>
dtype=float32`` (``benchmarks/machine.py``).

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_kernels_isa.py [--steps N] [--rows N]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from benchmarks.machine import machine_fields  # noqa: E402
from components.common import c_kernels  # noqa: E402
from components.common.fast_decode import FastDecodeStep  # noqa: E402
from components.common.int8_linear import (int8_kernel_name, int8_unavailable_reason,  # noqa: E402
                                           use_int8_weights)
from components.common.model_catalog import resolve_model  # noqa: E402
from components.common.packed_prefill import PackedPrefill  # noqa: E402
from components.common.prefix_cache import PrefixMatch  # noqa: E402

PROMPT_TOKENS, PREFILL_TOKENS = 64, 128


def use_variant(isa: str) -> None:
    """Makes the int8 kernels' ``isa`` variant the one that runs (c_kernels decides)."""
    os.environ[c_kernels.ISA_ENV] = isa
    c_kernels.forget_kernels()


class Decoding:
    """``rows`` rows decoding with one variant: its own step and cache."""

    def __init__(self, model, rows: int, vocab: int):
        generator = torch.Generator().manual_seed(rows)
        prompts = torch.randint(0, vocab, (rows, PROMPT_TOKENS), generator=generator).tolist()
        prefilled = PackedPrefill(model)(prompts, [PrefixMatch()] * rows)
        self.step, self.cache = FastDecodeStep(model), prefilled.cache
        self.mask = prefilled.attention_mask
        self.positions = torch.full((rows, 1), PROMPT_TOKENS)
        self.tokens = prefilled.logits.argmax(-1, keepdim=True)

    def __call__(self) -> float:
        """One decode step (greedy): its seconds."""
        self.mask = torch.cat([self.mask, self.mask.new_ones((len(self.mask), 1))], dim=1)
        started = time.perf_counter()
        logits = self.step(self.tokens, self.mask, self.positions, self.cache)
        seconds = time.perf_counter() - started
        self.tokens, self.positions = logits.argmax(-1, keepdim=True), self.positions + 1
        return seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=64, help="timings per number (%(default)s)")
    parser.add_argument("--rows", type=int, default=8, help="rows of the batched step")
    args = parser.parse_args(argv)
    from transformers import AutoModelForCausalLM

    variants = [isa for isa, spec in c_kernels.ISAS.items() if spec.supported()]
    for isa in set(c_kernels.ISAS) - set(variants):
        print(f"{c_kernels.ISAS[isa].name}: this CPU does not have it; left out")
    checkpoint = resolve_model("text-bison@002").checkpoint
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    use_int8_weights(model)
    vocab = model.config.vocab_size
    prompt = torch.randint(0, vocab, (PREFILL_TOKENS,),
                           generator=torch.Generator().manual_seed(0)).tolist()
    timings = {(isa, what): [] for isa in variants for what in ("1 row", "rows", "prefill")}
    decodings = {}
    with torch.inference_mode():
        for isa in variants:
            use_variant(isa)
            refused = int8_unavailable_reason()
            if refused:
                raise SystemExit(f"{isa}: {refused}")
            print(f"{isa}: {int8_kernel_name()}", flush=True)
            decodings[isa] = {"1 row": Decoding(model, 1, vocab),
                              "rows": Decoding(model, args.rows, vocab)}
        prefill = PackedPrefill(model)
        for number in range(args.steps):
            for isa in (variants if number % 2 == 0 else variants[::-1]):
                use_variant(isa)
                for what, decoding in decodings[isa].items():
                    timings[isa, what].append(decoding())
                started = time.perf_counter()
                prefill([prompt], [PrefixMatch()])
                timings[isa, "prefill"].append(time.perf_counter() - started)
    median = {key: statistics.median(values) * 1000 for key, values in timings.items()}
    print(f"{torch.get_num_threads()} threads; median of {args.steps}, ms "
          f"(decode steps after {PROMPT_TOKENS}-token prompts):")
    labels = {"1 row": "decode step, 1 row", "rows": f"decode step, {args.rows} rows",
              "prefill": f"prefill, {PREFILL_TOKENS} tokens"}
    for what, label in labels.items():
        cells = "  ".join(f"{c_kernels.ISAS[isa].name} {median[isa, what]:7.2f}"
                          for isa in variants)
        print(f"  {label:24} {cells}")
    avx2, avx512 = median["avx2", "1 row"], median.get(("avx512", "1 row"))
    ratio = "n/a" if avx512 is None else f"{avx2 / avx512:.2f}"
    print(f"BENCH kernels_isa ratio={ratio} avx2_ms={avx2:.2f} "
          f"avx512_ms={'n/a' if avx512 is None else f'{avx512:.2f}'} unit=ms "
          f"{machine_fields(torch.float32)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

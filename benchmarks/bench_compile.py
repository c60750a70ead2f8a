"""Benchmark: does compiling the decoder layers pay for itself? ``compile="on"`` against ``"off"``.

The embedded model (SmolLM2-135M-Instruct) is tuned on the sample data as ``make run`` tunes it
(LoRA rank 8, batch size 8, the precision :mod:`components.common.precision` picks) for a few
steps, once with compiled decoder layers and once without, each in a fresh process with an empty
Inductor cache (what a new user pays). Reported per mode: the compile warm-up, the median step
time after it, and the number of steps after which compiling has paid for its warm-up. These are
the numbers behind ``compile="auto"`` in :mod:`components.tune.acceleration`.

The last line is ``BENCH compile ratio=<eager step / compiled step> ours=<compiled s/step>
baseline=<eager s/step> unit=s/step warm_up=<s> break_even_steps=<n> capability=<CPU> dtype=<dtype>``.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_compile.py [--steps N]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def tokenize_sample(directory: Path) -> Path:
    """The sample training set as transform tokenizes it for the embedded model."""
    from components.common.dataset_formats import token_limits
    from components.common.model_catalog import resolve_model
    from components.common.model_loading import load_tokenizer
    from components.common.encoding import ExampleEncoder
    from components.transform.transform import tokenize_file

    tokenizer = load_tokenizer(resolve_model("text-bison@002").checkpoint)
    encoder = ExampleEncoder(tokenizer, "text", token_limits("text", "8k"))
    tokenize_file(ROOT / "samples" / "support_intents_train.jsonl", encoder, directory / "train")
    return directory / "train"


def run_mode(mode: str, train: Path, steps: int, work: Path) -> dict:
    """One tuning run in a fresh process and Inductor cache; its warm-up and step times."""
    output = work / f"tuned-{mode}"
    script = (
        "import json, sys\n"
        "from components.common.model_catalog import resolve_model\n"
        "from components.tune.trainer import TuneConfig, tune\n"
        f"config = TuneConfig(train_steps={steps}, learning_rate=1e-3, compile={mode!r})\n"
        f"result = tune(resolve_model('text-bison@002').to_dict(), {str(train)!r}, None, "
        f"{str(output)!r}, config)\n"
        "print('RESULT', json.dumps({'compile_seconds': result.compile_seconds, "
        "'precision': result.precision}))\n")
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": tempfile.mkdtemp(prefix="inductor-", dir=work)}
    completed = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, check=True,
                               capture_output=True, text=True)
    result = json.loads(completed.stdout.rsplit("RESULT ", 1)[1])
    records = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    step_seconds = [r["step_seconds"] for r in records if "step_seconds" in r]
    result["step_seconds"] = statistics.median(step_seconds[1:])  # the first step warms caches
    result["tokens_per_second"] = statistics.median(r["tokens_per_second"] for r in records[1:])
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8, help="tuning steps per mode")
    args = parser.parse_args()
    from benchmarks.machine import machine_fields

    with tempfile.TemporaryDirectory(prefix="bench-compile-") as work:
        work = Path(work)
        train = tokenize_sample(work)
        results = {mode: run_mode(mode, train, args.steps, work) for mode in ("on", "off")}
    on, off = results["on"], results["off"]
    for mode, result in results.items():
        print(f"compile={mode}: warm-up {result['compile_seconds']:.1f} s, "
              f"{result['step_seconds']:.2f} s/step ({result['tokens_per_second']:.0f} tokens/s); "
              f"{result['precision']}")
    saving = off["step_seconds"] - on["step_seconds"]
    break_even = on["compile_seconds"] / saving if saving > 0 else float("inf")
    print(f"compiling saves {saving:.2f} s/step; it pays after {break_even:.0f} steps")
    dtype = on["precision"].split()[1].rstrip(":")
    print(f"BENCH compile ratio={off['step_seconds'] / on['step_seconds']:.2f} "
          f"ours={on['step_seconds']:.3f} baseline={off['step_seconds']:.3f} unit=s/step "
          f"warm_up={on['compile_seconds']:.1f} break_even_steps={break_even:.0f} "
          f"{machine_fields(dtype)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

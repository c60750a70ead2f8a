"""GPU check: the whole job on one CUDA GPU in bf16, in a few minutes (``make gpu-check``).

1. the bf16 matmul peak of the GPU: square bf16 products of 8192, timed with CUDA events;
2. data: ``samples/support_intents_train.jsonl`` and ``_eval.jsonl`` through validate_dataset and
   transform (``run_validation``, ``transform_dataset``), as the pipeline runs them;
3. tune: ``components.tune.trainer.tune`` on the GPU, LoRA, bf16 (``precision="bf16"``),
   ``--steps`` steps of Vertex's GPU batch size (8; ``--batch-size``); throughput is input tokens
   per second of training step, steps 2 to the end (step 1 includes the warm-up), and its useful
   FLOP/s (the exact count of ``benchmarks/bench_tune.py``) over the measured peak;
4. evaluate: ``components.evaluate.evaluation.evaluate_tuning_run`` (token metrics and batched
   generation, the base model and the tuned checkpoint) on the GPU;
5. serve: ``components.deploy_endpoint.endpoints.start_endpoint`` starts the endpoint server (a
   real HTTP server on 127.0.0.1, its own process, on the GPU) for the tuned model, one
   prediction is asked of it and the endpoint is stopped.

``TUNEPIPE_DEVICE=cuda`` (the tuner's device), ``TUNEPIPE_PRECISION=bf16`` (every component's
precision, the endpoint process's too) and ``device="cuda"`` for evaluate; the endpoint server
takes the GPU itself (``select_device``). A GPU without bf16 fails at once with the reason. Without a CUDA device the check stops at
once with a message saying why (a CPU-only torch build, or no GPU visible) and exit status 2.

The last line is ``BENCH gpu-check ours=<tokens/s> unit=tokens/s peak_fraction=<useful FLOP/s
over the bf16 peak> capability=<cuda-smXY> dtype=bfloat16``.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/gpu_check.py [--steps 30] [--batch-size 8]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

MODEL = "text-bison@002"
TRAIN = ROOT / "samples" / "support_intents_train.jsonl"
EVAL = ROOT / "samples" / "support_intents_eval.jsonl"
TIME_LIMIT_SECONDS = 300  # the check's promise: at most 5 minutes on one GPU
DEVICE, PRECISION, DTYPE = "cuda", "bf16", "bfloat16"  # what every step runs in


def no_cuda_reason() -> str | None:
    """Why this process cannot use a CUDA GPU, or None when it can."""
    if torch.version.cuda is None:
        version = torch.__version__.split("+")[0]
        return (f"this torch ({torch.__version__}) is a CPU-only build; on a machine with an "
                f"NVIDIA GPU, install a CUDA build into .venv (.venv/bin/pip install "
                f"torch=={version} --index-url https://download.pytorch.org/whl/<CUDA tag>, "
                f"see https://pytorch.org/get-started/locally/)")
    if not torch.cuda.is_available():
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        return (f"torch {torch.__version__} (CUDA {torch.version.cuda}) sees no GPU "
                f"(device count {torch.cuda.device_count()}"
                + (f", CUDA_VISIBLE_DEVICES={visible!r}" if visible is not None else "")
                + "); check the driver with nvidia-smi")
    if not torch.cuda.is_bf16_supported():
        return f"{torch.cuda.get_device_name()} has no bf16 support; this check tunes in bf16"
    return None


def bf16_peak(size: int = 8192, repeats: int = 20, rounds: int = 3) -> float:
    """The best bf16 matmul FLOP/s of ``rounds`` runs of ``repeats`` square products."""
    a = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
    c = torch.empty_like(a)
    for _ in range(3):  # warm-up: cuBLAS picks its kernel
        torch.matmul(a, b, out=c)
    best = 0.0
    for _ in range(rounds):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(repeats):
            torch.matmul(a, b, out=c)
        end.record()
        torch.cuda.synchronize()
        best = max(best, 2 * size ** 3 * repeats / (start.elapsed_time(end) / 1000))
    del a, b, c
    torch.cuda.empty_cache()
    return best


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=30, help="tuning steps (the first is warm-up)")
    parser.add_argument("--batch-size", type=int, default=8, help="examples per step (Vertex: 8)")
    args = parser.parse_args()
    if args.steps < 2 or args.batch_size < 1:
        parser.error("--steps must be at least 2 (the first is not timed), --batch-size at least 1")
    reason = no_cuda_reason()
    if reason:
        print(f"gpu-check: no usable CUDA device: {reason}.", file=sys.stderr)
        return 2
    os.environ["TUNEPIPE_DEVICE"] = DEVICE  # the tuner's device
    os.environ["TUNEPIPE_PRECISION"] = PRECISION

    from benchmarks.bench_tune import LORA_RANK, useful_flops
    from components.common.model_catalog import resolve_model
    from components.common.artifacts.token_dataset import TokenDataset
    from components.deploy_endpoint.endpoints import predict, start_endpoint, stop_endpoint
    from components.evaluate.evaluation import evaluate_tuning_run
    from components.transform.transform import transform_dataset
    from components.tune import settings
    from components.tune.trainer import BatchSampler, TuneConfig, tune
    from components.validate_dataset.validator import run_validation

    started = time.perf_counter()

    def stage(message: str) -> None:
        print(f"[{time.perf_counter() - started:6.1f} s] {message}", flush=True)

    major, minor = torch.cuda.get_device_capability()
    capability = f"cuda-sm{major}{minor}"
    stage(f"GPU: {torch.cuda.get_device_name()} ({capability}), torch {torch.__version__}, "
          f"CUDA {torch.version.cuda}")
    peak = bf16_peak()
    stage(f"bf16 matmul peak (8192^3, best of 3 x 20): {peak / 1e12:.1f} TFLOP/s")
    torch.cuda.reset_peak_memory_stats()

    model = resolve_model(MODEL)
    model_config = json.loads((Path(model.checkpoint) / "config.json").read_text())
    endpoint_name = f"gpu-check-{os.getpid()}"
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as work:
        work = Path(work)
        report = run_validation(str(TRAIN), str(EVAL), "text", MODEL, "", work / "validated")
        report.raise_if_invalid()
        summary = transform_dataset(work / "validated", "text", MODEL, "", "", work / "tokenized")
        stage(f"data: {summary['train']['num_examples']} train examples "
              f"({summary['train']['num_tokens']} tokens), {summary['eval']['num_examples']} eval")

        config = TuneConfig(train_steps=args.steps, batch_size=args.batch_size,
                            learning_rate=settings.learning_rate(model, 1.0, "lora"),
                            adapter_size=LORA_RANK, evaluation_interval=args.steps,
                            enable_early_stopping=False, precision=PRECISION)
        tuned = work / "tuned"
        result = tune(model.to_dict(), work / "tokenized" / "train", work / "tokenized" / "eval",
                      tuned, config)
        if result.device != DEVICE or result.dtype != DTYPE:
            raise RuntimeError(f"the tuner ran on {result.device} in {result.dtype}, not {DEVICE} {DTYPE}")
        records = [json.loads(line) for line in (tuned / "metrics.jsonl").read_text().splitlines()]
        timed = [r for r in records if "step_seconds" in r and r["step"] >= 2]
        tokens = sum(r["num_tokens"] for r in timed)
        seconds = sum(r["step_seconds"] for r in timed)
        rate = tokens / seconds
        dataset = TokenDataset(work / "tokenized" / "train")
        sampler = BatchSampler(len(dataset), args.batch_size, config.seed)
        examples = [dataset[i] for r in timed for i in sampler.indices(r["step"] - 1)]
        fraction = useful_flops(model_config, examples) / seconds / peak
        stage(f"tune: {result.final_step} steps of {args.batch_size} examples, {result.precision}; "
              f"steps 2-{result.final_step}: {int(tokens):,} tokens in {seconds:.2f} s = "
              f"{rate:,.0f} tokens/s = {100 * fraction:.2f}% of the bf16 peak; last train loss "
              f"{timed[-1]['train_total_loss']:.3f}; peak GPU memory "
              f"{torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")

        results, _ = evaluate_tuning_run(tuned, work / "validated", work / "tokenized", MODEL,
                                         device=DEVICE)
        final = results["checkpoints"][-1]["metrics"]
        stage(f"evaluate ({results['precision']}): base exact_match "
              f"{results['base']['metrics'].get('exact_match', float('nan')):.3f}, tuned (step "
              f"{results['checkpoints'][-1]['step']}) exact_match "
              f"{final.get('exact_match', float('nan')):.3f}, eval loss "
              f"{final.get('eval_total_loss', float('nan')):.3f}")

        checkpoint = tuned / result.checkpoints[-1]["dir"]
        prompt = json.loads(EVAL.read_text().splitlines()[0])["input_text"]
        endpoint = start_endpoint(endpoint_name, checkpoint)
        try:
            reply = predict(endpoint_name, [prompt], {"maxOutputTokens": 16, "temperature": 0})
        finally:
            stop_endpoint(endpoint_name, missing_ok=True)
        stage(f"serve: {endpoint.predict_url} answered {reply['predictions'][0]['content']!r}")

    total = time.perf_counter() - started
    print(f"gpu-check done in {total:.0f} s (limit {TIME_LIMIT_SECONDS} s: "
          f"{'met' if total <= TIME_LIMIT_SECONDS else 'NOT met'})")
    print(f"BENCH gpu-check ours={rate:.1f} unit=tokens/s peak_fraction={fraction:.4f} "
          f"capability={capability} dtype={DTYPE}")
    return 0 if total <= TIME_LIMIT_SECONDS else 1


if __name__ == "__main__":
    sys.exit(main())

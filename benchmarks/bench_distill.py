"""Benchmark: distilling step-by-step against label-only tuning, and the teacher's throughput.

1. **The method.** On one task and budget, two students of the same model (the embedded
   SmolLM2-135M-Instruct, ``resolve_model('text-bison@002')``), the same data, the same steps and
   settings (LoRA rank 8, batch size 8, the tuner's defaults, seed 0):

   - label-only: the examples as text data (``input_text`` -> ``output_text``), as
     tune-large-model tunes them;
   - distilled: the same examples with their rationales as distillation data, two tasks per
     example (``[label]``/``[rationale]`` prefixes, loss ``alpha * label + (1 - alpha) *
     rationale``, alpha 0.5), as the distillation template tunes them
     (:mod:`components.common.distillation_tasks`).

   The task is the distillation sample's (``samples/make_samples.py``): route a support message
   to billing, shipping, technical or account; ``--train-per-label`` labeled messages per team
   (8: 32 in all) and 10 held-out messages per team (40). The rationales are the sample's
   hand-written ones, the kind the ``make run-distill`` teacher is tuned to write, so the
   comparison measures the method rather than one teacher's quality; ``--teacher REF`` has a
   teacher (any ``teacher_model_reference``, e.g. ``tuned:support-router-teacher`` after
   ``make run-distill``) write them instead, through the generate_rationales component's code.
   Each student answers the held-out messages greedily (the distilled one with its label
   prefix, as its endpoint prompts it); the score is label accuracy (evaluate's exact match).

2. **The teacher's throughput.** The generate_rationales component's local teacher (batched
   generation, :class:`components.generate_rationales.local_teacher.LocalTeacher`) against a
   naive loop (Hugging Face ``model.generate``, one prompt at a time), on the same
   ``--teacher-prompts`` (24) few-shot chain-of-thought prompts built from the training data by
   the component's own prompt builder, greedy, at most ``--max-output-tokens`` (48) tokens,
   float32 on both sides (the embedded model untuned: throughput does not depend on what it
   says). Throughput is completion tokens per second of wall time. Target: >= 3x.

Report whatever the numbers are. The last line is ``BENCH distill ratio=<teacher batched /
naive> ours=<tokens/s> baseline=<tokens/s> unit=tokens/s distilled_accuracy=<a>
label_only_accuracy=<a> capability=<CPU> dtype=<dtype>`` (the students train in the dtype
``components.common.precision`` chooses for this machine).

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_distill.py [--steps 30]
        [--train-per-label 8] [--teacher REF] [--teacher-prompts 24] [--max-output-tokens 48]
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from benchmarks.bench_evaluate import naive_generate  # noqa: E402
from benchmarks.machine import machine_fields  # noqa: E402
from components.common.distillation_tasks import input_prefix  # noqa: E402
from components.common.generation import generate  # noqa: E402
from components.common.model_catalog import resolve_model  # noqa: E402
from components.common.model_loading import (load_base_model, load_tokenizer,  # noqa: E402
                                              load_tuned_model)
from components.common.precision import choose_precision  # noqa: E402
from components.common.prompts import format_conversation_prompt, format_prompt  # noqa: E402
from components.common.artifacts.validated_dataset import EVAL_FILE, TRAIN_FILE  # noqa: E402
from components.evaluate.metrics import exact_match  # noqa: E402
from components.generate_rationales.examples import read_examples  # noqa: E402
from components.generate_rationales.local_teacher import LocalTeacher  # noqa: E402
from components.generate_rationales.prompting import ANSWER, build_request  # noqa: E402
from components.generate_rationales.teachers import TeacherSettings  # noqa: E402
from components.transform.transform import transform_dataset  # noqa: E402
from components.common.artifacts.tuned_model import read_index  # noqa: E402
from components.tune.trainer import TuneConfig, tune  # noqa: E402

STUDENT = "text-bison@002"
HELD_OUT_PER_LABEL = 10
LEARNING_RATE = 1e-3  # the embedded model's recommended rate (multiplier 1.0)
TARGET_RATIO = 3.0


def sample_generator():
    """``samples/make_samples.py`` as a module (samples/ is not a package)."""
    spec = importlib.util.spec_from_file_location("make_samples", ROOT / "samples" / "make_samples.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def routing_data(train_per_label: int) -> tuple[list[dict], list[dict]]:
    """Training examples (with hand-written rationales) and held-out examples of the routing
    task, disjoint, from the sample generator with a seed of the benchmark's own."""
    samples = sample_generator()
    rng = random.Random(7)
    train = samples.make_routing_examples(rng, train_per_label, exclude=set())
    held_out = samples.make_routing_examples(rng, HELD_OUT_PER_LABEL,
                                             exclude={e["input_text"] for e in train})
    return train, held_out


def write_dataset_folder(folder: Path, train: list[dict], held_out: list[dict]) -> Path:
    """A validated-dataset folder (train.jsonl, eval.jsonl), as transform reads it."""
    folder.mkdir(parents=True)
    for name, rows in ((TRAIN_FILE, train), (EVAL_FILE, held_out)):
        (folder / name).write_text("".join(json.dumps(row) + "\n" for row in rows))
    return folder


def teacher_rationales(reference: str, train: list[dict], work: Path) -> list[dict]:
    """The training examples with the rationales a teacher writes (explaining the gold labels),
    through the generate_rationales component's code."""
    from components.generate_rationales.rationales import (RationaleSettings,
                                                           generate_rationales_for_pipeline)

    source = work / "teacher-input.jsonl"
    source.write_text("".join(json.dumps({"input_text": e["input_text"],
                                          "output_text": e["output_text"]}) + "\n" for e in train))
    run = generate_rationales_for_pipeline(str(source), reference, work / "teacher-output",
                                           RationaleSettings(agreement_examples=0))
    print(f"teacher {reference}: {run.report['parse']}", flush=True)
    return run.records


def train_student(dataset_format: str, folder: Path, work: Path, steps: int) -> tuple[Path, float]:
    """Transforms ``folder`` as ``dataset_format`` and tunes the student on it; returns the final
    checkpoint folder and the tuning seconds."""
    tokens = work / f"tokens-{dataset_format}"
    transform_dataset(folder, dataset_format, STUDENT, "", "", tokens)
    output = work / f"student-{dataset_format}"
    config = TuneConfig(train_steps=steps, learning_rate=LEARNING_RATE, batch_size=8)
    started = time.perf_counter()
    tune(resolve_model(STUDENT).to_dict(), tokens / "train", None, output, config)
    seconds = time.perf_counter() - started
    return output / read_index(output)["checkpoints"][-1]["dir"], seconds


def label_accuracy(checkpoint: Path, held_out: list[dict]) -> float:
    """Exact-match label accuracy of a tuned student on the held-out examples, greedy, each
    prompt starting with the student's own input prefix."""
    device = torch.device("cpu")
    model, tokenizer, metadata = load_tuned_model(checkpoint, device, choose_precision(device).dtype)
    prefix = input_prefix(metadata)
    prompts = [format_prompt(tokenizer, prefix + e["input_text"]) for e in held_out]
    answers = generate(model, tokenizer, prompts, max_output_tokens=8)
    return sum(exact_match(a, e["output_text"]) for a, e in zip(answers, held_out)) / len(held_out)


def teacher_throughput(train_folder: Path, count: int, max_output_tokens: int) -> tuple[float, float]:
    """Completion tokens per second of the batched local teacher and of a naive one-at-a-time
    loop on the same ``count`` few-shot prompts (the embedded model, float32)."""
    examples = read_examples(train_folder)
    requests = [build_request(examples, e, ANSWER, few_shot_count=3, seed=0)
                for e in examples[:count]]
    settings = TeacherSettings(max_output_tokens=max_output_tokens)

    teacher = LocalTeacher(STUDENT, device="cpu")
    completions = []
    teacher.answer(requests[:2], settings, lambda r, c: None)  # warm-up (and the model load)
    started = time.perf_counter()
    teacher.answer(requests, settings, lambda request, completion: completions.append(completion))
    batched = sum(c.completion_tokens for c in completions) / (time.perf_counter() - started)

    checkpoint = resolve_model(STUDENT).checkpoint
    tokenizer = load_tokenizer(checkpoint)
    model = load_base_model(checkpoint, "cpu", torch.float32)
    prompts = [format_conversation_prompt(tokenizer, r.messages) for r in requests]
    naive_generate(model, tokenizer, prompts[:1], max_output_tokens)  # warm-up
    started = time.perf_counter()
    outputs = naive_generate(model, tokenizer, prompts, max_output_tokens)
    naive = sum(len(o) for o in outputs) / (time.perf_counter() - started)
    return batched, naive


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--train-per-label", type=int, default=8)
    parser.add_argument("--teacher", help="a teacher_model_reference to write the rationales")
    parser.add_argument("--teacher-prompts", type=int, default=24)
    parser.add_argument("--max-output-tokens", type=int, default=48)
    args = parser.parse_args(argv)

    train, held_out = routing_data(args.train_per_label)
    with tempfile.TemporaryDirectory(prefix="bench-distill-") as scratch:
        work = Path(scratch)
        if args.teacher:
            train = teacher_rationales(args.teacher, train, work)
        label_only = write_dataset_folder(
            work / "label-only", [{k: e[k] for k in ("input_text", "output_text")} for e in train],
            held_out)
        distilled = write_dataset_folder(work / "distilled", train, held_out)
        print(f"{len(train)} training examples, {len(held_out)} held out, {args.steps} steps of 8",
              flush=True)
        scores = {}
        for name, dataset_format, folder in (("label-only", "text", label_only),
                                             ("distilled", "distillation", distilled)):
            checkpoint, seconds = train_student(dataset_format, folder, work, args.steps)
            scores[name] = label_accuracy(checkpoint, held_out)
            print(f"{name:>10}: label accuracy {scores[name]:.3f} on {len(held_out)} held-out "
                  f"messages (tuned in {seconds:.0f} s)", flush=True)
        batched, naive = teacher_throughput(distilled, args.teacher_prompts, args.max_output_tokens)
    ratio = batched / naive
    print(f"teacher generation: batched {batched:.1f} tokens/s, one at a time {naive:.1f} "
          f"tokens/s, ratio {ratio:.2f} (target >= {TARGET_RATIO})")
    print(f"BENCH distill ratio={ratio:.3f} ours={batched:.1f} baseline={naive:.1f} "
          f"unit=tokens/s distilled_accuracy={scores['distilled']:.3f} "
          f"label_only_accuracy={scores['label-only']:.3f} "
          f"{machine_fields(choose_precision(torch.device('cpu')).dtype)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The tuner: LoRA or full fine-tuning of a causal LM on a token dataset, one readable loop.

Semantics (docs/tuner.md puts them in words for users of the pipelines):

- The run takes ``train_steps`` optimizer steps of ``batch_size`` examples, so it sees
  ``train_steps x batch_size`` examples, cycling through the data in a fresh seeded order each
  epoch (:class:`BatchSampler`: a step's batch depends only on the seed and the step number).
- The loss is the cross-entropy of the target tokens (nonzero loss mask: the output of text
  examples, the assistant turns of chat examples including their end-of-turn token; transform
  writes the masks), summed over the step's whole batch and divided by the batch's number of
  target tokens (``components.common.token_metrics``). :mod:`components.common.packing` computes
  exactly that without padding, with logits only at target positions, and with the prompt
  start that a row's examples share (one template's instruction) computed once per row.
- A multi-task dataset (its meta lists weighted ``tasks``: distilling step-by-step's label and
  rationale tasks, :mod:`components.common.distillation_tasks`; a target's loss-mask value is
  its task) is trained on ``sum over tasks t of weight_t x (summed cross-entropy of t's targets)
  / (t's targets in the step's global batch)`` (:class:`TrainingObjective`; a task without
  targets in the batch adds nothing). metrics.jsonl then also logs every task's mean,
  ``train_<task>_loss`` (``train_label_loss``, ``train_rationale_loss``; absent from a step
  whose batch has none of the task's targets), and ``train_total_loss`` is the weighted sum,
  the objective; ``train_num_predictions`` and the token accuracy count every target. The eval
  metrics stay single-task: a distillation eval set holds the label task only. A single-task
  run computes exactly what it computed before tasks existed.
- Learning rate: linear warmup over ``warmup_fraction`` of the steps, then cosine decay to 10%,
  a function of the step number alone (:func:`learning_rate_at`). AdamW, gradient clipping at
  ``max_grad_norm``.
- LoRA (``method="lora"``): adapters of rank ``adapter_size`` on every linear layer of the
  attention and MLP blocks, alpha = 2 x rank, no dropout, trained in float32 on a frozen base
  held in the compute dtype. Full fine-tuning (``method="full"``): every weight trained, float32
  master weights. With bf16 compute both run their matrix multiplies under bf16 autocast.

Evaluation and checkpoints: with evaluation data, after every ``evaluation_interval`` steps and
after the last step the tuner computes ``eval_total_loss``, ``eval_fraction_of_correct_next_step_preds``
and ``eval_num_predictions`` and writes a checkpoint (:mod:`components.tune.checkpoints`: model
weights, optimizer state, schedule and data position, RNG states, early-stopping state; written
atomically). Without evaluation data the last step writes the only checkpoint.

Early stopping (``enable_early_stopping``, with evaluation data). Let ``a_k`` be the eval token
accuracy of the k-th evaluation. Evaluation k (k >= 2) is *stale* when
``a_k - a_{k-1} < EARLY_STOPPING_MIN_DELTA`` (0.001, i.e. 0.1 percentage point); the first
evaluation is never stale and an evaluation that is not stale resets the count. Training stops
right after an evaluation that makes ``EARLY_STOPPING_PATIENCE`` (2) stale evaluations in a row,
so the earliest stop is the third evaluation: never before the second. Stopping after the last
step is not "stopping early". The stopping evaluation still writes its checkpoint.

Resume (``resume=True``): the run continues from the last checkpoint listed in
``checkpoints.json``: weights, optimizer, schedule position, RNG and early-stopping state are
restored, and metrics.jsonl / TensorBoard records after that step are dropped, so a run killed at
any moment and resumed ends with the same weights and metrics as an uninterrupted one. Without
``resume`` a folder that already holds a run is refused.

Devices (:mod:`components.tune.runtime`): CPU (bf16 where it is fast, see
:mod:`components.common.precision`), one CUDA GPU, several
processes under ``torchrun`` (DDP, or FSDP with ``sharding="fsdp"``), TPU through torch_xla
(untested). In a distributed run every process takes its slice of each step's global batch
(examples ``rank, rank + world_size, ...``) and scales its summed loss by
``world_size / target tokens of the global batch`` (each task's by ``world_size x weight / the
task's target tokens of the global batch``); averaging the gradients over the processes then
gives exactly the single-process gradient. Only rank 0 writes checkpoints and logs.
"""
from __future__ import annotations

import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from components.common.artifacts.token_dataset import TokenDataset
from components.common.artifacts.tuned_model import (CHECKPOINTS_INDEX, METRICS_FILE,
                                                     read_index, write_index)
from components.common.distillation_tasks import (INPUT_PREFIX, WeightedTask, input_prefix,
                                                  weighted_tasks)
from components.common.model_loading import TUNED_MODEL_METADATA, load_base_model, load_tokenizer
from components.common.token_metrics import TokenScores
from components.tune.acceleration import (COMPILE_MODES, compile_decoder_layers,
                                          compiled_token_loss, lora_config, wants_compile)
from components.tune.checkpoints import restore_checkpoint, save_checkpoint
from components.common.packing import (PackedBatch, num_targets, pack_examples, packed_loss,
                                     row_groups, score_packed, token_loss,
                                     use_packed_attention)
from components.common.precision import PRECISIONS
from components.tune.runtime import (SHARDINGS, XLA_ROW_MULTIPLE, Runtime, distribute,
                                     gradient_sync, start_runtime)
from components.tune.settings import ADAPTER_SIZES, METHODS
from components.tune.training_log import QuietLog, TrainingLog

EARLY_STOPPING_MIN_DELTA = 0.001  # absolute gain in eval token accuracy that counts as progress
EARLY_STOPPING_PATIENCE = 2  # stale evaluations in a row that stop training
LORA_TARGET_MODULES = "all-linear"  # every linear layer of attention and MLP blocks
DEFAULT_MAX_TOKENS_PER_MICRO_BATCH = 4096
__all__ = ["TuneConfig", "TuneResult", "BatchSampler", "TrainingObjective", "learning_rate_at",
           "stale_evaluations_after", "tune", "ADAPTER_SIZES", "CHECKPOINTS_INDEX",
           "TUNED_MODEL_METADATA"]

# Fields that decide what a run computes: a resumed run must have the same ones.
_RESUME_FIELDS = ("train_steps", "learning_rate", "batch_size", "adapter_size", "method",
                  "evaluation_interval", "enable_early_stopping", "warmup_fraction",
                  "weight_decay", "max_grad_norm", "seed")


@dataclass
class TuneConfig:
    """Everything that decides what a tuning run computes (and how it is laid out on devices)."""

    train_steps: int
    learning_rate: float
    batch_size: int = 8
    adapter_size: int = 8  # LoRA rank; ignored by full fine-tuning
    method: str = "lora"  # "lora" or "full"
    evaluation_interval: int = 20
    enable_early_stopping: bool = True
    warmup_fraction: float = 0.1
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    seed: int = 0
    precision: str = "auto"  # "auto" (components.common.precision's rule), "bf16" or "fp32"
    compile: str = "auto"  # torch.compile the decoder layers: "auto" (see acceleration), "on", "off"
    sharding: str = "ddp"  # several processes: "ddp" (replicas) or "fsdp" (sharded)
    max_tokens_per_micro_batch: int = DEFAULT_MAX_TOKENS_PER_MICRO_BATCH  # memory, not results

    def __post_init__(self) -> None:
        if self.train_steps < 1:
            raise ValueError(f"train_steps must be at least 1, got {self.train_steps}")
        if self.learning_rate <= 0:
            raise ValueError(f"the learning rate must be positive, got {self.learning_rate}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {self.batch_size}")
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.adapter_size not in ADAPTER_SIZES:
            raise ValueError(f"adapter_size must be one of {ADAPTER_SIZES}, got {self.adapter_size}")
        if self.evaluation_interval < 1:
            raise ValueError(f"evaluation_interval must be at least 1, got {self.evaluation_interval}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.sharding not in SHARDINGS:
            raise ValueError(f"sharding must be one of {SHARDINGS}, got {self.sharding!r}")
        if self.compile not in COMPILE_MODES:
            raise ValueError(f"compile must be one of {COMPILE_MODES}, got {self.compile!r}")
        if self.max_tokens_per_micro_batch < 1:
            raise ValueError("max_tokens_per_micro_batch must be positive")


class BatchSampler:
    """Which examples make up the batch of each step: seeded shuffles, epoch after epoch.

    A step's batch depends only on the seed and the step number, so a resumed run draws the
    same batches as an uninterrupted one.
    """

    def __init__(self, num_examples: int, batch_size: int, seed: int):
        if num_examples < 1:
            raise ValueError("the training dataset is empty")
        self.num_examples, self.batch_size, self.seed = num_examples, batch_size, seed
        self._orders: dict[int, np.ndarray] = {}

    def _order(self, epoch: int) -> np.ndarray:
        if epoch not in self._orders:
            self._orders = {epoch: np.random.default_rng([self.seed, epoch]).permutation(self.num_examples)}
        return self._orders[epoch]

    def indices(self, step: int) -> list[int]:
        """Example indices of 0-based ``step``."""
        positions = range(step * self.batch_size, (step + 1) * self.batch_size)
        return [int(self._order(p // self.num_examples)[p % self.num_examples]) for p in positions]


@dataclass(frozen=True)
class TrainingObjective:
    """What a step minimizes (module doc): the mean cross-entropy over the target tokens of the
    global batch, or with ``tasks`` (a multi-task dataset) the weighted sum of each task's mean.
    """

    tasks: tuple[WeightedTask, ...] = ()

    @property
    def mask_values(self) -> tuple[int, ...]:
        """The loss-mask values whose cross-entropy sums are kept apart (none: one sum)."""
        return tuple(task.mask_value for task in self.tasks)

    def targets(self, batch) -> list[int]:
        """Target tokens of the step's global batch: per task, or ``[all of them]``."""
        if not self.tasks:
            return [sum(num_targets(example) for example in batch)]
        return [sum(num_targets(example, task.mask_value) for example in batch)
                for task in self.tasks]

    def loss_scale(self, targets: list[int], world_size: int, device) -> float | torch.Tensor:
        """What multiplies a process's summed cross-entropy (per task) before backward: the
        gradients summed over its micro-batches and averaged over the processes are then
        exactly those of the objective over the global batch."""
        if not self.tasks:
            return world_size / max(targets[0], 1)
        return torch.tensor([world_size * task.weight / max(count, 1)
                             for task, count in zip(self.tasks, targets)], device=device)

    def metrics(self, loss_sums: list[float], correct: int, targets: list[int]) -> dict[str, float]:
        """The step's train metrics from the global batch's summed cross-entropy (per task),
        correct predictions and targets (per task): Vertex's three and ``train_<task>_loss``
        for every task with targets in the batch."""
        metrics = TokenScores(sum(loss_sums), correct, sum(targets)).metrics("train")
        if self.tasks:
            means = [loss_sum / max(count, 1) for loss_sum, count in zip(loss_sums, targets)]
            metrics["train_total_loss"] = sum(task.weight * mean
                                              for task, mean in zip(self.tasks, means))
            metrics.update({f"train_{task.name}_loss": mean
                            for task, mean, count in zip(self.tasks, means, targets) if count})
        return metrics


def learning_rate_at(step: int, config: TuneConfig) -> float:
    """Linear warmup over ``warmup_fraction`` of the steps, then cosine decay to 10%."""
    warmup = max(1, int(config.train_steps * config.warmup_fraction))
    if step < warmup:
        return config.learning_rate * (step + 1) / warmup
    progress = (step - warmup) / max(1, config.train_steps - warmup)
    return config.learning_rate * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def stale_evaluations_after(stale_evaluations: int, previous_accuracy: float | None,
                            accuracy: float) -> int:
    """The count of stale evaluations in a row after an evaluation with ``accuracy`` (see the
    module docstring); training stops when it reaches ``EARLY_STOPPING_PATIENCE``."""
    if previous_accuracy is None or accuracy - previous_accuracy >= EARLY_STOPPING_MIN_DELTA:
        return 0
    return stale_evaluations + 1


@dataclass
class TuneResult:
    """What a finished run produced."""

    final_step: int
    stopped_early: bool
    checkpoints: list[dict]
    device: str
    dtype: str
    precision: str  # the dtype and why, e.g. "cpu float32: no native bf16 (AVX2)"
    compile_seconds: float  # the compile warm-up before the first step (0: not compiled)
    train_seconds: float  # the training loop, evaluations and checkpoints (warm-up excluded)
    peak_memory_bytes: int
    world_size: int = 1


def tune(base_model: dict, train_data: str | Path, eval_data: str | Path | None,
         output_dir: str | Path, config: TuneConfig, resume: bool = False,
         run_metadata: dict | None = None,
         on_step_end: Callable[[int], None] | None = None) -> TuneResult:
    """Tunes ``base_model`` (a ResolvedModel dict) and writes checkpoints under ``output_dir``.

    ``resume`` continues a run from its last checkpoint (a folder without one starts afresh).
    ``on_step_end(step)`` is called after every optimizer step (progress reporting, tests).
    Under ``torchrun`` every process calls this with the same arguments.
    """
    runtime = start_runtime(config.precision)
    try:
        return _tune(base_model, Path(train_data), Path(eval_data) if eval_data else None,
                     Path(output_dir), config, resume, run_metadata or {}, on_step_end, runtime)
    finally:
        runtime.close()


@dataclass
class _Data:
    """A run's examples: the training set, its objective (tasks and weights), the evaluation
    examples."""

    train_set: TokenDataset
    objective: TrainingObjective
    eval_examples: list


@dataclass
class _Model:
    """The model being trained and what trains it."""

    model: torch.nn.Module
    tokenizer: object
    packs: bool  # its examples can be packed into shared rows
    loss: Callable  # token_loss, compiled when the decoder layers are
    compiled_layers: int  # 0: not compiled
    parameters: list[torch.nn.Parameter]  # the trainable ones
    optimizer: torch.optim.Optimizer


@dataclass
class _Progress:
    """Where the loop is: the steps done, the checkpoints written (as the index lists them) and
    the early-stopping state; restored from the last checkpoint when a run resumes."""

    step: int = 0
    checkpoints: list[dict] = field(default_factory=list)
    stale_evaluations: int = 0
    previous_accuracy: float | None = None
    stopped_early: bool = False


def _setup_data(train_data: Path, eval_data: Path | None) -> _Data:
    """The run's examples (a missing dataset fails before anything is written)."""
    train_set = TokenDataset(train_data)
    return _Data(train_set, TrainingObjective(weighted_tasks(train_set.meta)),
                 list(TokenDataset(eval_data)) if eval_data else [])


def _setup_output(output_dir: Path, resume: bool, runtime: Runtime) -> dict | None:
    """The index of the run to resume (None: a new run); refuses a new run in a folder that
    already holds one."""
    index = read_index(output_dir) if resume else None
    if runtime.is_main:
        output_dir.mkdir(parents=True, exist_ok=True)
        if not resume and ((output_dir / CHECKPOINTS_INDEX).exists()
                           or (output_dir / METRICS_FILE).exists()):
            raise FileExistsError(f"{output_dir} already holds a tuning run: resume it or use an "
                                  "empty folder")
    return index


def _setup_model(base_model: dict, config: TuneConfig, runtime: Runtime) -> _Model:
    """The model to train (distributed over the processes), its tokenizer and its optimizer."""
    tokenizer = load_tokenizer(base_model["checkpoint"])
    model, packs, loss, compiled_layers = _trainable_model(base_model["checkpoint"], config,
                                                           runtime)
    model = distribute(model, runtime, config.sharding)
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=config.learning_rate,
                                  weight_decay=config.weight_decay)
    return _Model(model, tokenizer, packs, loss, compiled_layers, parameters, optimizer)


def _restore(index: dict | None, output_dir: Path, trained: _Model, config: TuneConfig,
             train_examples: int) -> _Progress:
    """The progress of the run being resumed, its model and optimizer restored from its last
    checkpoint; a fresh start without one."""
    if not (index and index["checkpoints"]):
        return _Progress()
    _check_resumable(index, config, train_examples)
    state = restore_checkpoint(output_dir / index["checkpoints"][-1]["dir"], trained.model,
                               trained.optimizer, config.method == "full")
    return _Progress(state["step"], index["checkpoints"],
                     state["early_stopping"]["stale_evaluations"],
                     state["early_stopping"]["previous_accuracy"], index["stopped_early"])


def _tune(base_model: dict, train_data: Path, eval_data: Path | None, output_dir: Path,
          config: TuneConfig, resume: bool, run_metadata: dict, on_step_end,
          runtime: Runtime) -> TuneResult:
    if config.batch_size < runtime.world_size:
        raise ValueError(f"batch size {config.batch_size} is smaller than the number of processes "
                         f"({runtime.world_size}): every process needs at least one example per "
                         "step")
    data = _setup_data(train_data, eval_data)
    index = _setup_output(output_dir, resume, runtime)
    _seed_everything(config.seed)
    trained = _setup_model(base_model, config, runtime)
    sampler = BatchSampler(len(data.train_set), config.batch_size, config.seed)
    row_multiple = XLA_ROW_MULTIPLE if runtime.is_xla else 0
    progress = _restore(index, output_dir, trained, config, len(data.train_set))
    compile_seconds = 0.0
    if trained.compiled_layers:
        first_examples = [data.train_set[i] for i in sampler.indices(progress.step)[:2]]
        compile_seconds = _compile_warm_up(trained.model, first_examples, runtime, config,
                                           trained.packs, row_multiple, trained.loss,
                                           data.objective.mask_values, trained.compiled_layers)
    # The bar starts after the warm-up: its elapsed time and ETA are training steps only.
    log = (TrainingLog(output_dir, total_steps=config.train_steps, start_step=progress.step,
                       resumed=resume) if runtime.is_main else QuietLog())
    _log_setup(log, data, trained, config, runtime, compile_seconds, progress.step)
    run_facts = {
        "base_model": base_model, "tune_config": asdict(config),
        "tuning_method": config.method,
        "adapter_size": None if config.method == "full" else config.adapter_size,
        "batch_size": config.batch_size, "learning_rate": config.learning_rate,
        "device": runtime.device.type, "dtype": runtime.dtype_name,
        "precision": runtime.precision.describe(), "compile_seconds": compile_seconds,
        "world_size": runtime.world_size, INPUT_PREFIX: input_prefix(data.train_set.meta)}

    started = time.perf_counter()
    trained.model.train()
    while progress.step < config.train_steps and not progress.stopped_early:
        learning_rate = learning_rate_at(progress.step, config)
        batch = [data.train_set[i] for i in sampler.indices(progress.step)]
        train_metrics, grad_norm = _train_step(trained, batch, data.objective, learning_rate,
                                               runtime, config, row_multiple)
        progress.step += 1
        step = progress.step
        log.train_step(step, train_metrics, learning_rate, tokens=sum(len(e[0]) for e in batch),
                       grad_norm=grad_norm)
        is_last = step == config.train_steps
        eval_metrics = None
        if data.eval_examples and (step % config.evaluation_interval == 0 or is_last):
            eval_metrics = _evaluate(trained.model, data.eval_examples, runtime, config,
                                     trained.packs, row_multiple, trained.loss)
            log.eval_step(step, eval_metrics)
            _follow_early_stopping(progress, eval_metrics, config, is_last, log)
        if eval_metrics is not None or is_last:
            log.flush()  # the checkpoint never gets ahead of the metrics on disk
            progress.checkpoints.append(_write_checkpoint(
                output_dir, trained, progress, config, runtime,
                {**run_facts, "peak_memory_bytes": log.peak_memory_bytes},
                run_metadata, len(data.train_set), eval_metrics, train_metrics, is_last))
        if on_step_end is not None:
            on_step_end(step)
        log.restart_clock()  # checkpoints and callbacks are not training throughput
    log.close()
    return TuneResult(final_step=progress.step, stopped_early=progress.stopped_early,
                      checkpoints=progress.checkpoints, device=runtime.device.type,
                      dtype=runtime.dtype_name, precision=runtime.precision.describe(),
                      compile_seconds=compile_seconds,
                      train_seconds=time.perf_counter() - started,
                      peak_memory_bytes=log.peak_memory_bytes, world_size=runtime.world_size)


def _log_setup(log, data: _Data, trained: _Model, config: TuneConfig, runtime: Runtime,
               compile_seconds: float, step: int) -> None:
    """The run's first log lines: precision and compilation, then its shape."""
    trainable = sum(p.numel() for p in trained.parameters)
    log.note(f"precision {runtime.precision.describe()}; "
             + (f"compiled {trained.compiled_layers} decoder layers in {compile_seconds:.1f} s "
                "(warm-up)" if trained.compiled_layers else "decoder layers not compiled"))
    log.note(f"device={runtime.device.type} dtype={runtime.dtype_name} "
             f"processes={runtime.world_size} method={config.method} "
             f"trainable_parameters={trainable:,} examples={len(data.train_set)} "
             f"batch_size={config.batch_size} steps={config.train_steps} packed={trained.packs}"
             + "".join(f" {task.name}_loss_weight={task.weight:g}"
                       for task in data.objective.tasks)
             + (f" resumed_at_step={step}" if step else ""))


def _train_step(trained: _Model, batch: list, objective: TrainingObjective,
                learning_rate: float, runtime: Runtime, config: TuneConfig,
                row_multiple: int) -> tuple[dict, float]:
    """One optimizer step on ``batch`` (this process's share of it, in micro-batches, the
    gradients summed across processes); the step's train metrics and gradient norm."""
    for group in trained.optimizer.param_groups:
        group["lr"] = learning_rate
    targets = objective.targets(batch)
    loss_scale = objective.loss_scale(targets, runtime.world_size, runtime.device)
    loss_sum = torch.zeros((), device=runtime.device)  # per task: broadcast to [tasks]
    num_correct = torch.zeros((), dtype=torch.long, device=runtime.device)
    micro_batches = _my_micro_batches(batch, runtime, config, trained.packs, row_multiple,
                                      trained.tokenizer.pad_token_id or 0)
    for number, micro_batch in enumerate(micro_batches):
        micro_batch = micro_batch.to(runtime.device)
        with gradient_sync(trained.model, enabled=number == len(micro_batches) - 1):
            with runtime.autocast():
                micro_loss, micro_correct = packed_loss(trained.model, micro_batch, trained.loss,
                                                        objective.mask_values)
            (micro_loss * loss_scale).sum().backward()  # one task: a sum of one element
        loss_sum = loss_sum + micro_loss.detach()
        num_correct = num_correct + micro_correct
    grad_norm = torch.nn.utils.clip_grad_norm_(trained.parameters, config.max_grad_norm)
    grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm  # FSDP
    trained.optimizer.step()
    trained.optimizer.zero_grad(set_to_none=True)
    runtime.step_done()
    *loss_sums, total_correct = runtime.sum_across([*loss_sum.reshape(-1).tolist(),
                                                    float(num_correct)])
    return objective.metrics(loss_sums, int(total_correct), targets), float(grad_norm)


def _follow_early_stopping(progress: _Progress, eval_metrics: dict, config: TuneConfig,
                           is_last: bool, log) -> None:
    """Counts a stale evaluation (module doc) and stops the run after
    ``EARLY_STOPPING_PATIENCE`` in a row, when early stopping is on."""
    accuracy = eval_metrics["eval_fraction_of_correct_next_step_preds"]
    progress.stale_evaluations = stale_evaluations_after(progress.stale_evaluations,
                                                         progress.previous_accuracy, accuracy)
    progress.previous_accuracy = accuracy
    if config.enable_early_stopping and not is_last and \
            progress.stale_evaluations >= EARLY_STOPPING_PATIENCE:
        progress.stopped_early = True
        log.note(f"early stopping at step {progress.step}: eval token accuracy gained less than "
                 f"{EARLY_STOPPING_MIN_DELTA} for {EARLY_STOPPING_PATIENCE} evaluations in a row")


def _write_checkpoint(output_dir: Path, trained: _Model, progress: _Progress, config: TuneConfig,
                      runtime: Runtime, run_facts: dict, run_metadata: dict, train_examples: int,
                      eval_metrics, train_metrics: dict, is_last: bool) -> dict:
    """The checkpoint of the current step (model, optimizer, positions, early-stopping state;
    its metadata the run's facts, the step's and the caller's ``run_metadata``), then the index
    that lists it; returns its index entry."""
    step = progress.step
    metadata = {**run_facts, "step": step, "eval_metrics": eval_metrics,
                "train_metrics": train_metrics, "examples_seen": step * config.batch_size,
                "epochs_seen": step * config.batch_size / train_examples, **run_metadata}
    training_state = {
        "step": step, "examples_seen": step * config.batch_size,  # data position: the sampler
        "scheduler": {"schedule": "linear warmup, cosine decay to 10%", "next_step": step,
                      "next_learning_rate": learning_rate_at(step, config)},
        "early_stopping": {"stale_evaluations": progress.stale_evaluations,
                           "previous_accuracy": progress.previous_accuracy},
        "world_size": runtime.world_size}
    relative = save_checkpoint(output_dir, step, trained.model, trained.optimizer,
                               trained.tokenizer, config.method == "full", metadata,
                               training_state, runtime)
    entry = {"step": step, "dir": relative, "eval": eval_metrics}
    if runtime.is_main:
        write_index(output_dir, {
            "checkpoints": [*progress.checkpoints, entry], "final_step": step,
            "stopped_early": progress.stopped_early, "finished": is_last or progress.stopped_early,
            "base_model": run_facts["base_model"], "tune_config": asdict(config),
            "tuning_method": config.method, "train_examples": train_examples,
            "peak_memory_bytes": run_facts["peak_memory_bytes"]})
    return entry


def _trainable_model(checkpoint: str, config: TuneConfig, runtime: Runtime):
    """The model to train, whether its examples can be packed into shared rows, the loss
    function (:func:`token_loss`, compiled when the decoder layers are) and how many decoder
    layers were compiled (0: none).

    LoRA: the base frozen in the compute dtype with float32 adapters; full fine-tuning (and
    FSDP, which shards float32 parameters) keeps float32 master weights.
    """
    full = config.method == "full"
    fsdp = runtime.distributed and config.sharding == "fsdp"
    model = load_base_model(checkpoint, runtime.device, torch.float32 if full or fsdp else runtime.dtype)
    packs = use_packed_attention(model)
    if full:
        model.requires_grad_(True)
    else:
        from peft import get_peft_model

        # Adapters in float32; under bf16 autocast their matmuls run in bf16.
        model = get_peft_model(model, lora_config(config.adapter_size, LORA_TARGET_MODULES))
    loss, compiled_layers = token_loss, 0
    if wants_compile(config.compile, model, runtime, packs, config.train_steps):
        compiled_layers = compile_decoder_layers(model)
        loss = compiled_token_loss()
    model.train()
    return model, packs, loss, compiled_layers


def _compile_warm_up(model, examples, runtime: Runtime, config: TuneConfig, packs: bool,
                     row_multiple: int, loss, mask_values: tuple[int, ...],
                     compiled_layers: int) -> float:
    """Compiles the graphs before the first step: a forward and backward of a row of two
    examples (the first of the next step: one would specialise the graphs on rows of a single
    example), gradients then dropped, so no result changes. Returns seconds."""
    if runtime.is_main:
        print(f"tune: compile warm-up: compiling {compiled_layers} decoder layers "
              "(Inductor caches the kernels on disk: later runs start faster)", flush=True)
    started = time.perf_counter()
    batch = pack_examples(examples, config.max_tokens_per_micro_batch, packs, row_multiple)[0]
    with gradient_sync(model, enabled=False):
        with runtime.autocast():
            micro_loss, _ = packed_loss(model, batch.to(runtime.device), loss, mask_values)
        micro_loss.sum().backward()
    for parameter in model.parameters():
        parameter.grad = None
    seconds = time.perf_counter() - started
    if runtime.is_main:
        print(f"tune: compile warm-up done in {seconds:.1f} s", flush=True)
    return seconds


def _my_micro_batches(batch, runtime: Runtime, config: TuneConfig, packs: bool, row_multiple: int,
                      pad_token_id: int) -> list[PackedBatch]:
    """This process's slice of the step's batch, packed into micro-batches.

    Every process runs as many micro-batches as the busiest one (padding with empty ones):
    FSDP gathers parameters in every forward, so the processes must run them in step.
    """
    slices = [batch[rank::runtime.world_size] for rank in range(runtime.world_size)]
    most = max(len(row_groups([len(e[0]) for e in s], config.max_tokens_per_micro_batch, packs))
               for s in slices)
    mine = pack_examples(slices[runtime.rank], config.max_tokens_per_micro_batch, packs,
                         row_multiple, pad_token_id)
    empty = (np.array([pad_token_id], dtype=np.int64), np.zeros(1, dtype=np.uint8))
    while len(mine) < most:
        mine += pack_examples([empty], 1, packs, row_multiple, pad_token_id)
    return mine


def _evaluate(model, eval_examples, runtime: Runtime, config: TuneConfig, packs: bool,
              row_multiple: int, loss) -> dict[str, float]:
    """Eval metrics over all evaluation examples (every process scores all of them: the set is
    small, and FSDP needs the processes to run the same forwards)."""
    scorer = getattr(model, "module", model)  # outside DDP: no collective in an eval forward
    scorer.eval()
    scores = score_packed(scorer, eval_examples, config.max_tokens_per_micro_batch,
                          runtime.device, packs, runtime.autocast, row_multiple, loss)
    scorer.train()
    return scores.metrics("eval")


def _check_resumable(index: dict, config: TuneConfig, num_examples: int) -> None:
    saved = index.get("tune_config", {})
    different = [f"{name}: {saved.get(name)!r} -> {getattr(config, name)!r}"
                 for name in _RESUME_FIELDS if saved.get(name) != getattr(config, name)]
    if index.get("train_examples", num_examples) != num_examples:
        different.append(f"training examples: {index['train_examples']} -> {num_examples}")
    if different:
        raise ValueError("cannot resume: the run was started with other settings ("
                         + "; ".join(different) + ")")


def _seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)

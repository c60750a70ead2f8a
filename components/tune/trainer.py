"""The tuner: LoRA (or full) fine-tuning of a causal LM on a token dataset, one readable loop.

Semantics (SPEC.md): the run takes ``train_steps`` optimizer steps of ``batch_size`` examples, so
it sees ``train_steps x batch_size`` examples, cycling through the data in a fresh seeded order
each epoch. The loss is only on target tokens (loss mask 1). With evaluation data, every
``evaluation_interval`` steps it computes the eval metrics and writes a checkpoint; the final
step always writes one. Checkpoints are written atomically (a temporary folder renamed into
place) and carry the optimizer, scheduler and RNG state, so a killed run resumes from the last
complete checkpoint (``resume=True``) and ends where an uninterrupted run would.

Early stopping (``enable_early_stopping``, with evaluation data): training stops after an
evaluation whose token accuracy improved on the previous evaluation's by less than
``EARLY_STOPPING_MIN_DELTA`` for ``EARLY_STOPPING_PATIENCE`` evaluations in a row.
"""
from __future__ import annotations

import json
import math
import os
import random
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from components.common.model_loading import (ADAPTER_DIR, TUNED_MODEL_METADATA, compute_dtype,
                                             load_base_model, load_tokenizer)
from components.common.token_dataset import TokenDataset
from components.common.token_metrics import TokenScores, collate, score_dataset, score_logits
from components.tune.training_log import TrainingLog

EARLY_STOPPING_MIN_DELTA = 0.001  # absolute gain in eval token accuracy that counts as progress
EARLY_STOPPING_PATIENCE = 2  # evaluations in a row without progress before stopping
LORA_TARGET_MODULES = "all-linear"  # every linear layer of attention and MLP blocks
ADAPTER_SIZES = (1, 4, 8, 16)  # Vertex's adapter sizes: the LoRA rank
CHECKPOINTS_INDEX = "checkpoints.json"
TRAINING_STATE = "training_state.pt"


@dataclass
class TuneConfig:
    """Everything that decides what a tuning run computes."""

    train_steps: int
    learning_rate: float
    batch_size: int = 8
    adapter_size: int = 8  # LoRA rank
    evaluation_interval: int = 20
    enable_early_stopping: bool = True
    warmup_fraction: float = 0.1
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.train_steps < 1:
            raise ValueError(f"train_steps must be at least 1, got {self.train_steps}")
        if self.learning_rate <= 0:
            raise ValueError(f"the learning rate must be positive, got {self.learning_rate}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {self.batch_size}")
        if self.adapter_size not in ADAPTER_SIZES:
            raise ValueError(f"adapter_size must be one of {ADAPTER_SIZES}, got {self.adapter_size}")
        if self.evaluation_interval < 1:
            raise ValueError(f"evaluation_interval must be at least 1, got {self.evaluation_interval}")


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


def learning_rate_at(step: int, config: TuneConfig) -> float:
    """Linear warmup over ``warmup_fraction`` of the steps, then cosine decay to 10%."""
    warmup = max(1, int(config.train_steps * config.warmup_fraction))
    if step < warmup:
        return config.learning_rate * (step + 1) / warmup
    progress = (step - warmup) / max(1, config.train_steps - warmup)
    return config.learning_rate * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


@dataclass
class TuneResult:
    """What a finished run produced."""

    final_step: int
    stopped_early: bool
    checkpoints: list[dict]
    device: str
    dtype: str
    train_seconds: float
    peak_memory_bytes: int


def tune(base_model: dict, train_data: str | Path, eval_data: str | Path | None,
         output_dir: str | Path, config: TuneConfig, resume: bool = False,
         run_metadata: dict | None = None) -> TuneResult:
    """Tunes ``base_model`` (a ResolvedModel dict) and writes checkpoints under ``output_dir``."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = compute_dtype(device)
    torch.manual_seed(config.seed)
    random.seed(config.seed)

    tokenizer = load_tokenizer(base_model["checkpoint"])
    model = _trainable_model(base_model["checkpoint"], config, device, dtype)
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=config.learning_rate,
                                  weight_decay=config.weight_decay)
    train_set = TokenDataset(train_data)
    eval_examples = list(TokenDataset(eval_data)) if eval_data else []
    sampler = BatchSampler(len(train_set), config.batch_size, config.seed)

    checkpoints: list[dict] = []
    start_step, stale_evaluations = 0, 0
    if resume and (output_dir / CHECKPOINTS_INDEX).exists():
        index = json.loads((output_dir / CHECKPOINTS_INDEX).read_text())
        checkpoints = index["checkpoints"]
        if checkpoints:
            start_step, stale_evaluations = _restore(model, optimizer, output_dir / checkpoints[-1]["dir"])
    log = TrainingLog(output_dir, total_steps=config.train_steps, start_step=start_step)
    log.note(f"device={device.type} dtype={str(dtype).removeprefix('torch.')} "
             f"trainable_parameters={sum(p.numel() for p in parameters):,} "
             f"examples={len(train_set)} batch_size={config.batch_size} steps={config.train_steps}")

    stopped_early = False
    previous_accuracy = checkpoints[-1]["eval"]["eval_fraction_of_correct_next_step_preds"] \
        if checkpoints and checkpoints[-1].get("eval") else None
    step = start_step
    started = time.perf_counter()
    model.train()
    while step < config.train_steps and not stopped_early:
        learning_rate = learning_rate_at(step, config)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate
        batch = collate([train_set[i] for i in sampler.indices(step)], tokenizer.pad_token_id).to(device)
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        loss_sum, scores = score_logits(logits, batch.labels)
        (loss_sum / max(scores.num_predictions, 1)).backward()
        torch.nn.utils.clip_grad_norm_(parameters, config.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        log.train_step(step, scores.metrics("train"), learning_rate,
                       tokens=int(batch.attention_mask.sum()))

        is_last = step == config.train_steps
        if eval_examples and (step % config.evaluation_interval == 0 or is_last):
            model.eval()
            eval_metrics = score_dataset(model, eval_examples, tokenizer.pad_token_id,
                                         config.batch_size, device).metrics("eval")
            model.train()
            log.eval_step(step, eval_metrics)
            accuracy = eval_metrics["eval_fraction_of_correct_next_step_preds"]
            if previous_accuracy is not None and accuracy - previous_accuracy < EARLY_STOPPING_MIN_DELTA:
                stale_evaluations += 1
            else:
                stale_evaluations = 0
            previous_accuracy = accuracy
            if config.enable_early_stopping and stale_evaluations >= EARLY_STOPPING_PATIENCE and not is_last:
                stopped_early = True
                log.note(f"early stopping at step {step}: eval token accuracy gained less than "
                         f"{EARLY_STOPPING_MIN_DELTA} for {EARLY_STOPPING_PATIENCE} evaluations")
            checkpoints.append(_save_checkpoint(output_dir, step, model, tokenizer, optimizer,
                                                stale_evaluations, base_model, config,
                                                run_metadata, eval_metrics))
        elif is_last:
            checkpoints.append(_save_checkpoint(output_dir, step, model, tokenizer, optimizer,
                                                stale_evaluations, base_model, config,
                                                run_metadata, None))
        if checkpoints and checkpoints[-1]["step"] == step:
            _write_index(output_dir, checkpoints, step, stopped_early, base_model, config)
    log.close()
    return TuneResult(final_step=step, stopped_early=stopped_early, checkpoints=checkpoints,
                      device=device.type, dtype=str(dtype).removeprefix("torch."),
                      train_seconds=time.perf_counter() - started,
                      peak_memory_bytes=log.peak_memory_bytes)


def _trainable_model(checkpoint: str, config: TuneConfig, device: torch.device, dtype: torch.dtype):
    """The base model, frozen in ``dtype``, with trainable fp32 LoRA adapters."""
    from peft import LoraConfig, get_peft_model

    base = load_base_model(checkpoint, device, dtype)
    lora = LoraConfig(r=config.adapter_size, lora_alpha=2 * config.adapter_size, lora_dropout=0.0,
                      target_modules=LORA_TARGET_MODULES, task_type="CAUSAL_LM")
    return get_peft_model(base, lora)


def _save_checkpoint(output_dir: Path, step: int, model, tokenizer, optimizer, stale_evaluations: int,
                     base_model: dict, config: TuneConfig, run_metadata: dict | None,
                     eval_metrics: dict | None) -> dict:
    """Writes a tuned model folder plus training state for ``step``, atomically."""
    relative = f"checkpoints/step-{step:06d}"
    target = output_dir / relative
    staging = target.with_name(target.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    model.save_pretrained(staging / ADAPTER_DIR)
    tokenizer.save_pretrained(staging)
    metadata = {"base_model": base_model, "step": step, "tune_config": asdict(config),
                "eval_metrics": eval_metrics, "adapter_size": config.adapter_size,
                **(run_metadata or {})}
    (staging / TUNED_MODEL_METADATA).write_text(json.dumps(metadata, indent=2, sort_keys=True))
    torch.save({"step": step, "optimizer": optimizer.state_dict(),
                "stale_evaluations": stale_evaluations,
                "torch_rng": torch.get_rng_state(), "python_rng": random.getstate()},
               staging / TRAINING_STATE)
    shutil.rmtree(target, ignore_errors=True)
    os.replace(staging, target)
    return {"step": step, "dir": relative, "eval": eval_metrics}


def _restore(model, optimizer, checkpoint_dir: Path) -> tuple[int, int]:
    """Loads adapter weights and training state from a checkpoint; returns (step, stale evals)."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    adapter = load_file(str(checkpoint_dir / ADAPTER_DIR / "adapter_model.safetensors"))
    set_peft_model_state_dict(model, adapter)
    state = torch.load(checkpoint_dir / TRAINING_STATE, weights_only=False)
    optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["torch_rng"])
    random.setstate(state["python_rng"])
    return state["step"], state["stale_evaluations"]


def _write_index(output_dir: Path, checkpoints: list[dict], step: int, stopped_early: bool,
                 base_model: dict, config: TuneConfig) -> None:
    index = {"checkpoints": checkpoints, "final_step": step, "stopped_early": stopped_early,
             "base_model": base_model, "tune_config": asdict(config)}
    staging = output_dir / (CHECKPOINTS_INDEX + ".partial")
    staging.write_text(json.dumps(index, indent=2, sort_keys=True))
    os.replace(staging, output_dir / CHECKPOINTS_INDEX)

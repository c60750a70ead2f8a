"""The two tasks of a distilling step-by-step student (Hsieh et al. 2023, "Distilling Step-by-Step!
Outperforming Larger Language Models with Less Training Data and Smaller Model Sizes").

The student learns both tasks from the same inputs, told apart by a prefix of the input:

- label prediction, ``[label] <input_text>`` -> ``output_text`` (every labeled example);
- rationale generation, ``[rationale] <input_text>`` -> the teacher's rationale (the examples
  that have one).

The training loss is ``alpha * label_loss + (1 - alpha) * rationale_loss`` (alpha:
:data:`DEFAULT_LABEL_WEIGHT`, 0.5 as in the paper's code), each task's loss the mean
cross-entropy over that task's target tokens of the step's global batch
(:mod:`components.tune.trainer`). At evaluation and inference the student only predicts labels:
every prompt starts with :data:`LABEL_PREFIX`, recorded as ``input_prefix`` in the token
datasets' meta and the tuned model's metadata, so no rationale is generated or paid for.

In a token dataset the loss-mask value of a target token is its task's :attr:`Task.mask_value`
(label 1, rationale 2; :mod:`components.common.artifacts.token_dataset`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from components.common.dataset_formats import Example, json_type_name


@dataclass(frozen=True)
class Task:
    """One task: its name, the prefix of its inputs and the loss-mask value of its targets."""

    name: str
    prefix: str
    mask_value: int


LABEL_TASK = Task("label", "[label] ", 1)
RATIONALE_TASK = Task("rationale", "[rationale] ", 2)
TASKS = (LABEL_TASK, RATIONALE_TASK)
LABEL_PREFIX = LABEL_TASK.prefix
RATIONALE_PREFIX = RATIONALE_TASK.prefix
DEFAULT_LABEL_WEIGHT = 0.5  # alpha
INPUT_PREFIX = "input_prefix"  # the metadata key of what every prompt must start with


@dataclass(frozen=True)
class WeightedTask:
    """A task of a token dataset and its weight in the training loss."""

    name: str
    mask_value: int
    weight: float


def check_label_weight(label_weight: float) -> float:
    """``label_weight`` (alpha) as a float; ValueError unless it is a number in [0, 1]."""
    if (isinstance(label_weight, bool) or not isinstance(label_weight, (int, float))
            or not math.isfinite(label_weight) or not 0 <= label_weight <= 1):
        raise ValueError(f"label_loss_weight must be a number in [0, 1] (alpha, the label task's "
                         f"share of the loss), got {label_weight!r}")
    return float(label_weight)


def task_examples(record: dict, with_rationale: bool = True) -> list[Example]:
    """The task examples of one labeled record (``input_text``, ``output_text``, optional
    ``rationale``): label prediction, then rationale generation when ``with_rationale`` and the
    record's rationale is a non-empty string. ValueError for a rationale neither string nor null.
    """
    rationale = record.get("rationale")
    if rationale is not None and not isinstance(rationale, str):
        raise ValueError(f"rationale: expected a string or null, got {json_type_name(rationale)}")
    examples = [_task_example(LABEL_TASK, record["input_text"], record["output_text"])]
    if with_rationale and rationale and rationale.strip():
        examples.append(_task_example(RATIONALE_TASK, record["input_text"], rationale))
    return examples


def _task_example(task: Task, input_text: str, output_text: str) -> Example:
    return Example(None, ((task.prefix + input_text, output_text),), target_mask=task.mask_value)


def tasks_metadata(label_weight: float) -> dict:
    """What the meta of a distillation token dataset records: the tasks (name, mask value,
    weight: alpha and 1 - alpha) and the ``input_prefix`` of label prediction."""
    alpha = check_label_weight(label_weight)
    weights = {LABEL_TASK: alpha, RATIONALE_TASK: 1.0 - alpha}
    return {"tasks": [{"name": task.name, "mask_value": task.mask_value, "weight": weight}
                      for task, weight in weights.items()],
            INPUT_PREFIX: LABEL_PREFIX}


def weighted_tasks(meta: dict) -> tuple[WeightedTask, ...]:
    """The tasks a token dataset's meta lists, with their loss weights; () for a single-task
    dataset (no ``tasks``)."""
    return tuple(WeightedTask(task["name"], int(task["mask_value"]), float(task["weight"]))
                 for task in meta.get("tasks") or ())


def input_prefix(metadata: dict) -> str:
    """What every prompt must start with: ``input_prefix`` of a token dataset's meta or of a
    tuned model's metadata ('' when it has none)."""
    return metadata.get(INPUT_PREFIX) or ""

"""What a tuning run reports as it goes: progress bar, metrics JSONL, TensorBoard, loss curve.

TensorBoard scalars carry Vertex's metric names (``/train_total_loss``,
``/train_fraction_of_correct_next_step_preds``, ``/train_num_predictions`` and the ``/eval_*``
three), plus ``/learning_rate``, ``/tokens_per_second`` (input tokens of the global batch per
second of training step; there is no padding to count), ``/memory_bytes`` (peak resident
memory so far, see :func:`peak_resident_memory_bytes`), ``/grad_norm`` (before clipping),
``/num_tokens`` and ``/step_seconds``, and for a multi-task dataset every task's train loss
(``/train_label_loss``, ``/train_rationale_loss``; ``/train_total_loss`` is then their weighted
sum, see :mod:`components.tune.trainer`). metrics.jsonl holds the same records, one JSON object
per line with its ``step``.

Resuming: a resumed run starts its log at the checkpoint's step ``s``. Records after ``s`` (left
by the killed run) are dropped from metrics.jsonl, and the new TensorBoard event file starts with
a purge at step ``s + 1``, which makes TensorBoard readers (``EventAccumulator``) drop the older
events from step ``s + 1`` on: no duplicate or stale points. The trainer flushes the log before
every checkpoint, so the records up to a checkpoint are on disk before the checkpoint is.
"""
from __future__ import annotations

import base64
import json
import os
import resource
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from components.common.artifacts.tuned_model import LOSS_CURVE, METRICS_FILE, TENSORBOARD_DIR


def peak_resident_memory_bytes() -> int:
    """Peak resident memory of this process (and the GPU's peak allocation when on CUDA)."""
    cpu = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    gpu = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else 0
    return cpu + gpu


def _keep_records_up_to(metrics_file: Path, step: int) -> None:
    """Drops records past ``step`` (left by a run killed after its last checkpoint), and a last
    line cut short by the kill; rewrites the file atomically."""
    if not metrics_file.exists():
        return
    kept = []
    for line in metrics_file.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if record["step"] <= step:
            kept.append(line)
    staging = metrics_file.with_name(metrics_file.name + ".partial")
    staging.write_text("".join(line + "\n" for line in kept))
    os.replace(staging, metrics_file)


class TrainingLog:
    """Writes every step's metrics to a JSONL file, TensorBoard and a progress bar."""

    def __init__(self, output_dir: Path, total_steps: int, start_step: int = 0, resumed: bool = False):
        """``resumed``: continue the log of a run resumed at ``start_step`` (see the module doc)."""
        from torch.utils.tensorboard import SummaryWriter

        self.output_dir = output_dir
        if resumed:
            _keep_records_up_to(output_dir / METRICS_FILE, start_step)
        self._metrics = open(output_dir / METRICS_FILE, "a", encoding="utf-8")
        self._tensorboard = SummaryWriter(str(output_dir / TENSORBOARD_DIR),
                                          purge_step=start_step + 1 if resumed else None)
        # On a terminal a live bar; in a pipeline's log (a pipe) a plain line every few seconds.
        interactive = sys.stdout.isatty()
        self._progress = tqdm(total=total_steps, initial=start_step, desc="tune", unit="step",
                              file=sys.stdout, mininterval=2.0 if interactive else 10.0,
                              ncols=110, ascii=not interactive,
                              bar_format=None if interactive else "{desc} {n}/{total} steps "
                              "[{elapsed}<{remaining}] {postfix}\n")
        self._last_time = time.perf_counter()
        self.peak_memory_bytes = peak_resident_memory_bytes()

    def note(self, message: str) -> None:
        """A line of text above the progress bar."""
        self._progress.write(message)

    def _write(self, step: int, record: dict) -> None:
        for name, value in record.items():
            self._tensorboard.add_scalar(f"/{name}", value, step)
        self._metrics.write(json.dumps({"step": step, **record}) + "\n")
        self._metrics.flush()

    def train_step(self, step: int, metrics: dict, learning_rate: float, tokens: int,
                   grad_norm: float | None = None) -> None:
        """Logs one optimizer step's train metrics, learning rate, throughput, memory and the
        gradient norm before clipping."""
        now = time.perf_counter()
        seconds = max(now - self._last_time, 1e-9)
        self._last_time = now
        self.peak_memory_bytes = peak_resident_memory_bytes()
        self._write(step, {**metrics, "learning_rate": learning_rate,
                           "tokens_per_second": tokens / seconds,
                           "memory_bytes": float(self.peak_memory_bytes),
                           "num_tokens": float(tokens), "step_seconds": seconds,
                           **({"grad_norm": grad_norm} if grad_norm is not None else {})})
        tokens_per_second = tokens / seconds
        self._progress.set_postfix(loss=f"{metrics['train_total_loss']:.3f}",
                                   acc=f"{metrics['train_fraction_of_correct_next_step_preds']:.2f}",
                                   tok_s=f"{tokens_per_second:.0f}", refresh=False)
        self._progress.update(1)

    def eval_step(self, step: int, metrics: dict) -> None:
        """Logs an evaluation's metrics."""
        self._write(step, metrics)
        self._last_time = time.perf_counter()  # evaluation time is not training throughput
        self.note(f"step {step}: " + ", ".join(f"{k}={v:.4g}" for k, v in metrics.items()))

    def restart_clock(self) -> None:
        """Time spent since the last step (checkpoint writing) is not training throughput."""
        self._last_time = time.perf_counter()

    def flush(self) -> None:
        """Puts every record written so far on disk."""
        self._metrics.flush()
        os.fsync(self._metrics.fileno())
        self._tensorboard.flush()

    def close(self) -> None:
        """Flushes everything and plots the loss curve."""
        self._progress.close()
        self._tensorboard.close()
        self._metrics.close()
        plot_loss_curve(self.output_dir / METRICS_FILE, self.output_dir / LOSS_CURVE)


class QuietLog:
    """The log of a process that is not rank 0: it writes nothing."""

    peak_memory_bytes = 0

    def note(self, message: str) -> None:
        pass

    def train_step(self, step: int, metrics: dict, learning_rate: float, tokens: int,
                   grad_norm: float | None = None) -> None:
        self.peak_memory_bytes = peak_resident_memory_bytes()

    def eval_step(self, step: int, metrics: dict) -> None:
        pass

    def flush(self) -> None:
        pass

    def restart_clock(self) -> None:
        pass

    def close(self) -> None:
        pass


def plot_loss_curve(metrics_file: Path, png_path: Path) -> None:
    """Train and eval loss per step, from a metrics JSONL file, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(line) for line in metrics_file.read_text().splitlines() if line]
    figure, axes = plt.subplots(figsize=(7, 4))
    for name, style in (("train_total_loss", "-"), ("eval_total_loss", "o-")):
        points = [(r["step"], r[name]) for r in records if name in r]
        if points:
            axes.plot(*zip(*points), style, label=name.replace("_total_loss", " loss"))
    axes.set_xlabel("step")
    axes.set_ylabel("loss (mean per target token)")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(png_path, dpi=100)
    plt.close(figure)


def loss_curve_report(output_dir: str | Path, result, config) -> str:
    """The tune component's Markdown report: the run in one line (a ``TuneResult`` of this
    ``TuneConfig``) and its loss curve, the PNG in ``output_dir`` inlined."""
    png = (Path(output_dir) / LOSS_CURVE).read_bytes()
    return (f"# Tuning\n\n{result.final_step} steps, {result.precision}, "
            f"batch size {config.batch_size}, learning rate {config.learning_rate:g}, "
            f"peak memory {result.peak_memory_bytes / 2**30:.2f} GiB"
            f"{', stopped early' if result.stopped_early else ''}.\n\n"
            f"![loss curve](data:image/png;base64,{base64.b64encode(png).decode()})\n")

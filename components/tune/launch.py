"""Runs the tuner on every local device: in this process, or as ``torchrun`` processes.

With one device (a CPU, one GPU) the tuner runs in the calling process. With several GPUs the
component launches ``python -m torch.distributed.run --standalone --nproc-per-node N -m
components.tune.cli ...`` (one process per GPU, DDP or FSDP) and reads the result back from the
tune output, so a pipeline step on an 8-GPU machine uses all eight.

On a cloud machine (a Kubeflow Pipelines task pod, or a Vertex AI CustomJob) the machine was
chosen for ``accelerator_type``, so :func:`check_cloud_accelerator` refuses to tune on the CPU
there: a GPU task that sees no CUDA device, or a TPU task whose image has no torch_xla, fails at
once with what to fix instead of training for hours on the host's CPU. Local runs are not
checked: there ``accelerator_type`` only sets the batch size.
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from components.common.accelerators import check_accelerator_type
from components.common.artifacts.tuned_model import read_index
from components.common.cluster import in_kfp_cluster
from components.common.model_loading import TUNED_MODEL_METADATA
from components.tune.trainer import TuneConfig, TuneResult, tune


VERTEX_JOB_ENV = "CLOUD_ML_JOB_ID"  # set by Vertex AI in a CustomJob's containers


def on_cloud_machine() -> bool:
    """True in a Kubeflow Pipelines task pod or a Vertex AI CustomJob."""
    return in_kfp_cluster() or bool(os.environ.get(VERTEX_JOB_ENV))


def check_cloud_accelerator(accelerator: str) -> None:
    """On a cloud machine, makes sure the tuner will use the ``accelerator`` (GPU or TPU) it was
    given: a TPU task gets ``PJRT_DEVICE=TPU`` when unset; RuntimeError, saying what to fix,
    when the device is not usable. Does nothing elsewhere but check the spelling."""
    check_accelerator_type(accelerator)
    if not on_cloud_machine():
        return
    if accelerator == "GPU" and not torch.cuda.is_available():
        raise RuntimeError(
            f"accelerator_type GPU, but this task sees no CUDA GPU (torch {torch.__version__}, "
            f"built for CUDA {torch.version.cuda or 'no: a CPU build'}): the image needs torch's "
            "CUDA build (the Dockerfile's default) and the node the NVIDIA driver and device "
            "plugin; refusing to tune on the CPU")
    if accelerator == "TPU":
        if importlib.util.find_spec("torch_xla") is None:
            raise RuntimeError(
                "accelerator_type TPU, but this image has no torch_xla: build the TPU image "
                "(make image VARIANT=tpu IMAGE=REF) and compile the templates for it "
                "(tunepipe compile --image REF); refusing to tune on the CPU")
        os.environ.setdefault("PJRT_DEVICE", "TPU")


def local_processes() -> int:
    """One process per visible CUDA GPU, or one."""
    return max(1, torch.cuda.device_count()) if torch.cuda.is_available() else 1


def cli_arguments(base_reference: str, train_data, eval_data, output_dir, config: TuneConfig) -> list[str]:
    """``components.tune.cli`` arguments that run exactly ``config``."""
    arguments = ["--base", base_reference, "--train", str(train_data), "--output", str(output_dir),
                 "--steps", str(config.train_steps), "--learning-rate", repr(config.learning_rate),
                 "--batch-size", str(config.batch_size), "--method", config.method,
                 "--adapter-size", str(config.adapter_size),
                 "--evaluation-interval", str(config.evaluation_interval),
                 "--precision", config.precision, "--sharding", config.sharding,
                 "--max-tokens-per-micro-batch", str(config.max_tokens_per_micro_batch),
                 "--seed", str(config.seed)]
    if eval_data:
        arguments += ["--eval", str(eval_data)]
    if not config.enable_early_stopping:
        arguments.append("--no-early-stopping")
    defaults = TuneConfig(train_steps=1, learning_rate=1.0)
    for name in ("warmup_fraction", "weight_decay", "max_grad_norm"):
        if getattr(config, name) != getattr(defaults, name):
            raise ValueError(f"the command line has no option for {name}; use tune() directly")
    return arguments


def tune_on_local_devices(base_model: dict, train_data, eval_data, output_dir, config: TuneConfig,
                          resume: bool = False, run_metadata: dict | None = None,
                          processes: int | None = None) -> TuneResult:
    """Tunes with ``processes`` processes (default: one per local GPU, else one)."""
    processes = processes or local_processes()
    if processes == 1:
        return tune(base_model, train_data, eval_data, output_dir, config, resume=resume,
                    run_metadata=run_metadata)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc-per-node={processes}", "-m", "components.tune.cli",
               *cli_arguments(base_model["reference"], train_data, eval_data, output_dir, config),
               "--run-metadata", json.dumps(run_metadata or {})]
    if resume:
        command.append("--resume")
    started = time.perf_counter()
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    subprocess.run(command, check=True, env=env)
    return result_from_output(Path(output_dir), time.perf_counter() - started)


def result_from_output(output_dir: Path, seconds: float) -> TuneResult:
    """A finished run's result, read from its ``checkpoints.json`` and last checkpoint."""
    index = read_index(output_dir)
    if not index or not index["checkpoints"]:
        raise RuntimeError(f"the tuner wrote no checkpoint under {output_dir}")
    last = json.loads((output_dir / index["checkpoints"][-1]["dir"] / TUNED_MODEL_METADATA).read_text())
    return TuneResult(final_step=index["final_step"], stopped_early=index["stopped_early"],
                      checkpoints=index["checkpoints"], device=last["device"], dtype=last["dtype"],
                      precision=last["precision"], compile_seconds=last["compile_seconds"],
                      train_seconds=seconds, peak_memory_bytes=index["peak_memory_bytes"],
                      world_size=last["world_size"])

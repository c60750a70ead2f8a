"""Where the tuner runs: the device, the compute dtype and the processes of a distributed run.

- **Precision**: :func:`components.common.precision.choose_precision`, the rule every component
  follows (bfloat16 where the hardware does it fast: CPUs with AMX, AVX512_BF16 or Arm BF16,
  GPUs with bf16; float32 elsewhere; ``TUNEPIPE_PRECISION`` forces it).
- **One CUDA GPU**: the GPU of ``LOCAL_RANK``.
- **Several GPUs**: launched by ``torchrun --nproc-per-node N -m components.tune.cli ...``, which
  sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``. Every
  process takes its slice of each step's global batch; gradients are averaged by DDP (the
  default, ``sharding="ddp"``: every device holds the whole model) or reduce-scattered by FSDP
  (``sharding="fsdp"``, FSDP2 ``fully_shard`` per decoder layer: parameters, gradients and
  optimizer state sharded across devices, for models that do not fit one device; parameters are
  kept in float32 and gathered in the compute dtype). The same code runs several CPU processes
  with the gloo backend (that is how it is tested).
- **TPU**: through ``torch_xla`` when it is importable and ``PJRT_DEVICE`` is set (or
  ``TUNEPIPE_DEVICE=xla``): the XLA device, bfloat16, the ``xla`` process-group backend for
  several processes (DDP), ``xm.mark_step()`` after every optimizer step and rows padded to a
  multiple of 256 tokens so XLA compiles few shapes. FSDP on XLA is not implemented (torch_xla
  has its own FSDP and SPMD). This path cannot be tested without a TPU: it is written to the
  torch_xla documentation and untested.

``TUNEPIPE_DEVICE`` (``cpu``, ``cuda`` or ``xla``) overrides the automatic choice.
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.distributed as dist

from components.common.precision import Precision, choose_precision

SHARDINGS = ("ddp", "fsdp")
XLA_ROW_MULTIPLE = 256  # XLA compiles one graph per shape: rows padded to a multiple of this


@dataclass
class Runtime:
    """The device, compute dtype and process layout of a run."""

    device: torch.device
    precision: Precision  # the compute dtype (matmuls run in it: bf16 under autocast) and why
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None  # process-group backend when distributed

    @property
    def is_main(self) -> bool:
        """Rank 0: the only process that writes checkpoints and logs."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_xla(self) -> bool:
        return self.device.type == "xla"

    @property
    def dtype(self) -> torch.dtype:
        return self.precision.dtype

    @property
    def dtype_name(self) -> str:
        return self.precision.dtype_name

    def autocast(self):
        """bf16 autocast on the device when the compute dtype is bf16, else nothing."""
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def sum_across(self, values: Sequence[float]) -> list[float]:
        """Element-wise sums of ``values`` over all processes (the values when alone)."""
        if not self.distributed:
            return list(values)
        dtype = torch.float32 if self.is_xla else torch.float64
        device = self.device if self.backend in ("nccl", "xla") else torch.device("cpu")
        tensor = torch.tensor(list(values), dtype=dtype, device=device)
        dist.all_reduce(tensor)
        return tensor.cpu().tolist()

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def step_done(self) -> None:
        """Ends an optimizer step: on XLA, compiles and runs the step's graph."""
        if self.is_xla:
            import torch_xla.core.xla_model as xm

            xm.mark_step()

    def close(self) -> None:
        """Leaves the process group (if this run started one)."""
        if self.distributed and dist.is_initialized():
            dist.destroy_process_group()


def _wants_xla() -> bool:
    forced = os.environ.get("TUNEPIPE_DEVICE", "").lower()
    if forced:
        return forced == "xla"
    return bool(os.environ.get("PJRT_DEVICE")) and importlib.util.find_spec("torch_xla") is not None


def start_runtime(precision: str = "auto") -> Runtime:
    """Picks the device and precision (``auto``: the shared rule, else forced) and joins the
    process group of a ``torchrun`` launch."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    forced = os.environ.get("TUNEPIPE_DEVICE", "").lower()
    if _wants_xla():
        import torch_xla.core.xla_model as xm

        device, backend = xm.xla_device(), "xla"
    elif forced != "cpu" and torch.cuda.is_available():
        device, backend = torch.device("cuda", local_rank), "nccl"
        torch.cuda.set_device(device)
    else:
        device, backend = torch.device("cpu"), "gloo"
    chosen = choose_precision(device, precision)
    if world_size > 1 and not dist.is_initialized():
        if backend == "xla":
            import torch_xla.distributed.xla_backend  # noqa: F401  (registers the backend)

            dist.init_process_group("xla", init_method="xla://")
        else:
            dist.init_process_group(backend)
    return Runtime(device, chosen, rank, world_size, local_rank,
                   backend if world_size > 1 else None)


def distribute(model: torch.nn.Module, runtime: Runtime, sharding: str) -> torch.nn.Module:
    """Wraps ``model`` for a distributed run: DDP, or FSDP2 per decoder layer; as is when alone."""
    if sharding not in SHARDINGS:
        raise ValueError(f"sharding must be one of {SHARDINGS}, got {sharding!r}")
    if not runtime.distributed:
        return model
    if sharding == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [runtime.device.index] if runtime.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=device_ids)
    if runtime.is_xla:
        raise ValueError("sharding='fsdp' is not supported on XLA devices; use 'ddp'")
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy(param_dtype=runtime.dtype, reduce_dtype=torch.float32)
    layer_classes = set(getattr(unwrap(model), "_no_split_modules", None) or [])
    for module in model.modules():
        if type(module).__name__ in layer_classes:
            fully_shard(module, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    return model


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside a DDP wrapper (FSDP2 shards in place: the model itself); for a PEFT
    model, its transformers base model."""
    model = getattr(model, "module", model)
    return model.get_base_model() if hasattr(model, "get_base_model") else model


@contextlib.contextmanager
def gradient_sync(model: torch.nn.Module, enabled: bool):
    """Within it, backward passes only accumulate gradients locally unless ``enabled`` (the
    last micro-batch of a step synchronises: DDP's ``no_sync``, FSDP2's gradient-sync flag)."""
    if enabled:
        yield
    elif hasattr(model, "no_sync"):
        with model.no_sync():
            yield
    elif hasattr(model, "set_requires_gradient_sync"):
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    else:
        yield

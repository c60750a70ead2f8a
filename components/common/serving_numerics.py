"""The numerics a model is served in (the endpoint, the local teacher): chosen for serving on this
machine, not by the tuner's rule (:mod:`components.common.precision`).

Serving is not tuning. A decode step streams every weight from memory, so it goes as fast as the
weights are small; and a request's greedy answer must not depend on the requests it is batched
with. Measured with ``benchmarks/bench_serve.py`` on a 2-core AMD EPYC with AVX512_BF16, where
the tuner's rule picks bfloat16 (native bf16): served in bfloat16 the embedded model answered
1.14 requests/s batched, and 11 of 43 greedy answers changed with their batch (oneDNN's bf16
products round a row differently by the batch's shape); with int8 weights in float32, 2.79
requests/s and 43 of 43 the same. So :func:`choose_serving_numerics`:

- **int8 weights through the kernels**, computing in float32, wherever the kernels build (x86-64
  with AVX2 and a C compiler; :mod:`components.common.int8_linear`), whatever dtype the model
  was tuned in: the model is loaded in float32 and quantized. The kernels add a row's products
  in the same order whatever the batch, so an answer is the same alone and batched;
- **else float32 on a CPU** (weights packed for oneDNN, ``components.common.packed_linear``).
  bfloat16 is not chosen by itself on a CPU: it is faster only where the CPU has bf16 units, and
  there its answers depend on the batch, which no measurement of speed can make up for;
- **a GPU keeps the tuner's rule** (bfloat16 where it is supported): there the weights' memory
  decides (a 7B model in float32 does not fit a 24 GB L4), and the int8 kernels are CPU code.

``TUNEPIPE_SERVING_PRECISION`` (``auto``, the default, ``fp32`` or ``bf16``) forces the compute
dtype: ``bf16`` serves float weights in bfloat16 (and warns that answers then depend on the
batch). ``TUNEPIPE_SERVING_WEIGHTS`` (``auto``, ``int8`` or ``float``) forces the weights
(:func:`components.common.int8_linear.serving_weights_for`). ``TUNEPIPE_PRECISION`` is the
tuner's setting and does not apply to serving.
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass

import torch
from torch import nn

from components.common.int8_linear import ServingWeights, serving_weights_for, use_int8_weights
from components.common.precision import Precision, choose_precision

SERVING_PRECISION_ENV = "TUNEPIPE_SERVING_PRECISION"
SERVING_PRECISIONS = ("auto", "fp32", "bf16")


class BatchDependentWarning(UserWarning):
    """Serving was forced into bf16, where an answer depends on its batch."""


@dataclass(frozen=True)
class ServingNumerics:
    """The compute dtype and the weights a model is served with, and why."""

    precision: Precision
    weights: ServingWeights

    @property
    def dtype(self) -> torch.dtype:
        return self.precision.dtype

    def describe(self) -> str:
        """E.g. ``cpu float32: ..., int8 weights: int8 kernel (AVX2), ...``."""
        return f"{self.precision.describe()}, {self.weights.describe()}"

    def apply(self, model: nn.Module) -> nn.Module:
        """``model`` (loaded in :attr:`dtype`) with these weights: int8 layers where chosen,
        and the rest packed for oneDNN."""
        from components.common.packed_linear import use_packed_weights

        if self.weights.kind == "int8":
            use_int8_weights(model)
        return use_packed_weights(model)


def choose_serving_numerics(device: torch.device | str) -> ServingNumerics:
    """How to serve a model on ``device`` (the module doc's rule). Raises ``ValueError`` for an
    unknown setting, or a forced one that cannot run here."""
    device = torch.device(device)
    setting = os.environ.get(SERVING_PRECISION_ENV, "").strip().lower() or "auto"
    if setting not in SERVING_PRECISIONS:
        raise ValueError(f"{SERVING_PRECISION_ENV}={setting!r}: use one of "
                         f"{list(SERVING_PRECISIONS)}")
    if setting == "bf16":
        warnings.warn(f"{SERVING_PRECISION_ENV}=bf16: a request's greedy answer may change with "
                      "the requests it is batched with", BatchDependentWarning, stacklevel=2)
        return ServingNumerics(
            Precision(device.type, torch.bfloat16, f"forced by {SERVING_PRECISION_ENV}=bf16, "
                                                   "answers depend on the batch"),
            serving_weights_for(device, torch.bfloat16))
    if device.type != "cpu" and setting == "auto":
        precision = choose_precision(device, "auto")
        return ServingNumerics(precision, serving_weights_for(device, precision.dtype))
    weights = serving_weights_for(device, torch.float32)
    if setting == "fp32":
        reason = f"forced by {SERVING_PRECISION_ENV}=fp32"
    elif weights.kind == "int8":
        reason = "the int8 kernel's, an answer the same alone and batched"
    else:
        reason = "for serving, bf16's answers depend on the batch"
    return ServingNumerics(Precision(device.type, torch.float32, reason), weights)

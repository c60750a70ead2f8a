"""The served model's linear layers with int8 weights, for fast decoding on x86 CPUs with AVX2
or AVX-512.

Decoding one request multiplies one row by every weight matrix, so a decode step takes about
the time to stream the weights from memory: 538 MB for SmolLM2-135M in float32. In int8, one
scale per block of 32 weights of a row (as llama.cpp's Q8_0), they are 152 MB. The kernels
(``int8_kernels.c``, an AVX2 and an AVX-512 variant: ``components.common.c_kernels`` picks
one, ``TUNEPIPE_KERNEL_ISA``) convert each weight to float as they read it and multiply in float:
weight-only quantization, the inputs and outputs stay float32, so an answer does not depend on
the other requests of a batch beyond float rounding (as in float32), which quantizing the
inputs too (llama.cpp's Q8_0 products) would break. On a 2-core AMD EPYC with AVX2, a decode
step of SmolLM2-135M for one request (``components.common.fast_decode``): float32 through
transformers about 80 ms, int8 12 to 17 ms.

The kernels are C, built once per machine with the system's C compiler (``$CC``, else ``cc``)
into ``$TUNEPIPE_HOME/cache/kernels`` (about a second); where there is no compiler or no AVX2,
:func:`int8_unavailable_reason` says why and the model keeps its float weights.

``TUNEPIPE_SERVING_WEIGHTS`` (``auto``, the default, ``int8`` or ``float``) chooses the served
model's weights (:func:`serving_weights_for`, for ``components.common.serving_numerics``, which
loads a model in float32 to serve it so): ``auto`` is int8 where the kernel builds and the model
computes in float32 on the CPU, else float (packed for oneDNN,
``components.common.packed_linear``). Rounding each weight to one of 255 levels of its block
changes the model a little: on the sample evaluation set the tuned model's answers were the same
(60 of 60), while a long free-form answer drifts from the float32 one after some words (the
README, "Decoding speed", has the measurements).
``float`` serves the exact model. Evaluate always generates in float.
"""
from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass

import torch
from torch import nn

from components.common.c_kernels import (INT, INT64, POINTER, kernel_isa, load_kernels,
                                         unavailable_reason)

SERVING_WEIGHTS_ENV = "TUNEPIPE_SERVING_WEIGHTS"
SERVING_WEIGHTS = ("auto", "int8", "float")
KERNEL_SOURCE, KERNEL_VARIANTS = "int8_kernels.c", ("avx2", "avx512")  # see c_kernels.ISAS
WEIGHT_BLOCK = 32  # weights of a row share a scale by blocks of 32 (in_features: a multiple)
ROW_GROUP = 4  # output rows the kernel computes together (out_features padded to a multiple)
KERNEL_SIGNATURES = (  # the C functions' parameter types, in order (see int8_kernels.c)
    ("int8_linear", (POINTER, INT64, INT64, POINTER, POINTER, POINTER, POINTER, INT64, INT)),
    # (DecoderLayer*, hidden, rows, cos, sin, key_cache, value_cache, capacity, length, mask,
    #  threads)
    ("int8_decoder_layer", (POINTER, POINTER, INT64, POINTER, POINTER, POINTER, POINTER, INT64,
                            INT64, POINTER, INT)),
    # (DecoderLayer*, hidden, tokens, cos, sin, keys[], values[], positions, capacity, threads)
    ("int8_prefill_layer", (POINTER, POINTER, INT64, POINTER, POINTER, POINTER, POINTER, POINTER,
                            INT64, INT)),
)


def int8_kernels() -> ctypes.CDLL:
    """The kernel library (``int8_kernels.c``), built on first use. Raises
    ``KernelUnavailable``."""
    return load_kernels(KERNEL_SOURCE, KERNEL_SIGNATURES, KERNEL_VARIANTS)


def int8_kernel_name() -> str:
    """``int8 kernel (AVX2)`` or ``int8 kernel (AVX-512)``: the variant that runs here. Raises
    ``KernelUnavailable``."""
    return f"int8 kernel ({kernel_isa(KERNEL_SOURCE, KERNEL_VARIANTS).name})"


def int8_unavailable_reason() -> str | None:
    """Why the int8 kernel cannot run here, or None when it can (building it if need be)."""
    return unavailable_reason(int8_kernels)


class Int8Linear(nn.Module):
    """``nn.Linear`` with int8 weights, one scale per block of 32 weights of a row (inference
    on the CPU)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        padded_rows = -self.out_features % ROW_GROUP
        weight = nn.functional.pad(linear.weight.detach().float(), (0, 0, 0, padded_rows))
        # groups of ROW_GROUP rows with their blocks interleaved: see int8_kernels.c
        blocks = weight.view(-1, ROW_GROUP, self.in_features // WEIGHT_BLOCK,
                             WEIGHT_BLOCK).transpose(1, 2)
        scale = blocks.abs().amax(dim=-1, keepdim=True) / 127
        quantized = torch.round(blocks / scale.clamp(min=torch.finfo(torch.float32).tiny))
        self.register_buffer("weight_int8", quantized.to(torch.int8).contiguous())
        self.register_buffer("scale", scale.squeeze(-1).contiguous())  # [groups, blocks, 4]
        bias = None if linear.bias is None else nn.functional.pad(linear.bias.detach().float(),
                                                                  (0, padded_rows))
        self.register_buffer("bias", bias)

    @property
    def padded_out_features(self) -> int:
        """out_features rounded up to a multiple of ROW_GROUP (the kernel's output width)."""
        return self.weight_int8.shape[0] * ROW_GROUP

    def dequantized_weight(self) -> torch.Tensor:
        """The float weight this layer multiplies by, ``[out_features, in_features]``."""
        blocks = self.weight_int8.float() * self.scale[..., None]  # [groups, blocks, 4, 32]
        return blocks.transpose(1, 2).reshape(-1, self.in_features)[:self.out_features]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # A decode step calls this about 200 times: every tensor operation saved counts.
        inputs = x if x.dtype == torch.float32 and x.is_contiguous() else x.float().contiguous()
        padded = self.padded_out_features
        outputs = x.new_empty((*x.shape[:-1], padded), dtype=torch.float32)
        int8_kernels().int8_linear(inputs.data_ptr(), x.numel() // self.in_features,
                                   self.in_features, self.weight_int8.data_ptr(),
                                   self.scale.data_ptr(),
                                   None if self.bias is None else self.bias.data_ptr(),
                                   outputs.data_ptr(), padded, torch.get_num_threads())
        if padded != self.out_features:
            outputs = outputs[..., :self.out_features]
        return outputs if x.dtype == torch.float32 else outputs.to(x.dtype)


def can_quantize(linear: nn.Module) -> bool:
    """Whether ``linear`` is a plain ``nn.Linear`` the kernel takes (in_features a multiple of
    32) on the CPU."""
    return (type(linear) is nn.Linear and linear.in_features % WEIGHT_BLOCK == 0
            and linear.weight.device.type == "cpu")


def use_int8_weights(model: nn.Module) -> nn.Module:
    """``model`` with every linear layer the kernel takes replaced by an ``Int8Linear``, in
    place (a tied weight is quantized as a copy: the model is for inference only)."""
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if can_quantize(child):
                setattr(module, name, Int8Linear(child))
    return model


@dataclass(frozen=True)
class ServingWeights:
    """The weights a server decodes with, and why."""

    kind: str  # "int8" or "float"
    reason: str

    def describe(self) -> str:
        return f"{self.kind} weights: {self.reason}"


def serving_weights(model: nn.Module) -> ServingWeights:
    """The weights to serve ``model`` with, as loaded (:func:`serving_weights_for`)."""
    parameter = next(model.parameters())
    return serving_weights_for(parameter.device, parameter.dtype)


def serving_weights_for(device: torch.device, dtype: torch.dtype) -> ServingWeights:
    """The weights to serve a model computing in ``dtype`` on ``device`` with, by
    ``TUNEPIPE_SERVING_WEIGHTS`` (module docstring). Raises ``ValueError`` for an unknown
    setting or ``int8`` where the kernel cannot run."""
    setting = os.environ.get(SERVING_WEIGHTS_ENV, "").strip().lower() or "auto"
    if setting not in SERVING_WEIGHTS:
        raise ValueError(f"{SERVING_WEIGHTS_ENV}={setting!r}: use one of {list(SERVING_WEIGHTS)}")
    if setting == "float":
        return ServingWeights("float", f"{SERVING_WEIGHTS_ENV}=float")
    device = torch.device(device)
    unavailable = (f"the model is on {device.type} in {dtype}"
                   if device.type != "cpu" or dtype != torch.float32
                   else int8_unavailable_reason())
    if unavailable and setting == "int8":
        raise ValueError(f"{SERVING_WEIGHTS_ENV}=int8, but {unavailable}")
    if unavailable:
        return ServingWeights("float", unavailable)
    return ServingWeights("int8", f"{int8_kernel_name()}, 3.5x less memory to stream per token"
                          if setting == "auto" else f"{SERVING_WEIGHTS_ENV}=int8")


class Int8Matrix(ctypes.Structure):
    """An ``Int8Linear``'s buffers as ``int8_kernels.c`` takes them (its ``Int8Matrix``)."""

    _fields_ = [("weight", POINTER), ("scale", POINTER), ("bias", POINTER), ("n", INT64),
                ("k", INT64)]

    @classmethod
    def of(cls, linear: Int8Linear) -> "Int8Matrix":
        """The matrix of ``linear`` (whose buffers must outlive it)."""
        return cls(linear.weight_int8.data_ptr(), linear.scale.data_ptr(),
                   None if linear.bias is None else linear.bias.data_ptr(),
                   linear.padded_out_features, linear.in_features)


def stack_int8(linears: list[Int8Linear]) -> Int8Linear:
    """One ``Int8Linear`` computing ``linears`` side by side (their outputs concatenated), for
    layers that read the same input (query, key and value; gate and up). Each one's buffers
    become views into the stacked one's, so the weights are not held twice. Every layer's
    out_features must be a multiple of 4 (no padded rows) and in_features the same."""
    if any(linear.out_features % ROW_GROUP or linear.in_features != linears[0].in_features
           for linear in linears):
        raise ValueError("stack_int8: out_features must be multiples of 4, in_features equal")
    stacked = Int8Linear.__new__(Int8Linear)
    nn.Module.__init__(stacked)
    stacked.in_features = linears[0].in_features
    stacked.out_features = sum(linear.out_features for linear in linears)
    stacked.register_buffer("weight_int8", torch.cat([linear.weight_int8 for linear in linears]))
    stacked.register_buffer("scale", torch.cat([linear.scale for linear in linears]))
    biases = [linear.bias if linear.bias is not None else torch.zeros(linear.out_features)
              for linear in linears]
    stacked.register_buffer("bias", None if all(linear.bias is None for linear in linears)
                            else torch.cat(biases))
    start = 0
    for linear in linears:
        rows, groups = slice(start, start + linear.out_features), slice(
            start // ROW_GROUP, (start + linear.out_features) // ROW_GROUP)
        linear.weight_int8, linear.scale = stacked.weight_int8[groups], stacked.scale[groups]
        if linear.bias is not None:
            linear.bias = stacked.bias[rows]
        start += linear.out_features
    return stacked

"""The served model's linear layers with their weights packed once for oneDNN, on the CPU.

Decoding multiplies a few rows (one per running request) by every weight matrix, so a decode
step takes about the time to stream the weights from memory (538 MB for SmolLM2-135M in
float32). MKL's ``F.linear`` packs the weight again on every call once there are 4 rows or
more, and streams it at about 7 GB/s for one row; oneDNN with the weight packed once at load
(``torch.ops.mkldnn._reorder_linear_weight``, what Inductor's freezing does) does neither. On a
2-core AMD EPYC with AVX2, one thread, every weight of the model multiplied by M rows:

    rows              1      2      4      8     16     32
    F.linear (ms)    72    136    164    174    187    243
    packed (ms)      55     63     72     82    117    172

``use_packed_weights`` packs every ``nn.Linear`` of a CPU model in float32 or bfloat16; other
models are left as they are. Products are the same up to float rounding (summation order).
Every model that generates does so once loaded: the endpoint server's, the local teacher's and
evaluate's (after its token metrics).
"""
from __future__ import annotations

import torch
from torch import nn

PACKED_FOR_ROWS = 16  # the row count oneDNN chooses its weight blocking for (any count works)


class PackedLinear(nn.Module):
    """``nn.Linear`` with its weight packed for oneDNN (inference only)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.packed_weight = nn.Parameter(torch.ops.mkldnn._reorder_linear_weight(
            linear.weight.detach(), PACKED_FOR_ROWS), requires_grad=False)
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed_weight, self.bias, "none", [], "")


def can_pack(model: nn.Module) -> bool:
    """Whether ``model`` is on the CPU, in float32 or bfloat16, with oneDNN available."""
    parameter = next(model.parameters())
    return (parameter.device.type == "cpu" and parameter.dtype in (torch.float32, torch.bfloat16)
            and torch.backends.mkldnn.is_available())


def use_packed_weights(model: nn.Module) -> nn.Module:
    """``model`` with every ``nn.Linear`` replaced by a ``PackedLinear``, in place, where
    ``can_pack`` (a tied weight is packed as a copy: the model is for inference only)."""
    if not can_pack(model):
        return model
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if type(child) is nn.Linear:
                setattr(module, name, PackedLinear(child))
    return model

"""Causal attention of a packed row in float32 on x86 CPUs, forward and backward in C.

A packed row holds several examples one after another, each attending within itself
(``components.common.packing``). PyTorch's CPU flash-attention kernel, called once per
example, ran at 22-40 GFLOP/s on the short examples of tuning (SmolLM2's 9 heads of 64
dimensions, 100-600 tokens, 2-core AVX2 CPU), its backward slowest: the attention took about a
fifth of a float32 training step. ``attention_kernels.c`` takes the whole row in one call, cut
into (example, head, 48 queries) blocks that see only the keys up to their last query, each a
few small matrix products on AVX2 register tiles and an exact softmax (see the C file). A row
may start with a shared prefix that all its other examples continue (``shared_prefix``; see
``components.common.packing``).
:func:`packed_causal_attention_fp32` is the autograd function; the results equal
``scaled_dot_product_attention``'s up to float rounding.

Used by ``components.common.packing`` for float32 rows on CPUs where the kernels build
(:func:`fast_attention_unavailable_reason`), else PyTorch's kernel.
"""
from __future__ import annotations

import ctypes

import torch

from components.common.c_kernels import FLOAT, INT, INT64, POINTER, load_kernels, unavailable_reason

KERNEL_SIGNATURES = (  # the C functions' parameter types, in order (see attention_kernels.c)
    # (query, key, value, lengths, examples, prefix, heads, kv_heads, dim, scale, output, lse,
    #  threads)
    ("causal_attention_forward", (POINTER, POINTER, POINTER, POINTER, INT64, INT64, INT64, INT64,
                                  INT64, FLOAT, POINTER, POINTER, INT)),
    # (query, key, value, output, lse, d_output, lengths, examples, prefix, heads, kv_heads, dim,
    #  scale, d_query, d_key, d_value, threads)
    ("causal_attention_backward", (POINTER, POINTER, POINTER, POINTER, POINTER, POINTER, POINTER,
                                   INT64, INT64, INT64, INT64, INT64, FLOAT, POINTER, POINTER,
                                   POINTER, INT)),
)


def attention_kernels() -> ctypes.CDLL:
    """The kernel library (``attention_kernels.c``), built on first use. Raises
    ``components.common.c_kernels.KernelUnavailable``."""
    return load_kernels("attention_kernels.c", KERNEL_SIGNATURES)


def fast_attention_unavailable_reason() -> str | None:
    """Why the attention kernels cannot run here, or None when they can."""
    return unavailable_reason(attention_kernels)


def fast_attention_applies(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                           dropout: float) -> bool:
    """Whether :func:`packed_causal_attention_fp32` computes this attention: float32 on the CPU,
    no dropout, whole groups of heads per key, and the kernels available here."""
    return (query.device.type == "cpu" and dropout == 0.0
            and all(t.dtype == torch.float32 for t in (query, key, value))
            and query.shape[1] % key.shape[1] == 0
            and fast_attention_unavailable_reason() is None)


class _PackedCausalAttention(torch.autograd.Function):
    """Causal attention within each example of a row (after its shared prefix, if any):
    tensors ``[tokens, heads, dim]``."""

    @staticmethod
    def forward(ctx, query, key, value, lengths, shared_prefix: int, scale: float):
        tokens, heads, dim = query.shape
        output = torch.empty_like(query)
        lse = torch.empty(tokens, heads, dtype=torch.float32)
        attention_kernels().causal_attention_forward(
            query.data_ptr(), key.data_ptr(), value.data_ptr(), lengths.data_ptr(),
            lengths.numel(), shared_prefix, heads, key.shape[1], dim, scale, output.data_ptr(),
            lse.data_ptr(), torch.get_num_threads())
        ctx.save_for_backward(query, key, value, output, lse, lengths)
        ctx.shared_prefix, ctx.scale = shared_prefix, scale
        return output

    @staticmethod
    def backward(ctx, d_output):
        query, key, value, output, lse, lengths = ctx.saved_tensors
        d_output = d_output.contiguous()
        d_query, d_key, d_value = (torch.empty_like(t) for t in (query, key, value))
        tokens, heads, dim = query.shape
        attention_kernels().causal_attention_backward(
            query.data_ptr(), key.data_ptr(), value.data_ptr(), output.data_ptr(), lse.data_ptr(),
            d_output.data_ptr(), lengths.data_ptr(), lengths.numel(), ctx.shared_prefix, heads,
            key.shape[1], dim, ctx.scale, d_query.data_ptr(), d_key.data_ptr(), d_value.data_ptr(),
            torch.get_num_threads())
        return d_query, d_key, d_value, None, None, None


def packed_causal_attention_fp32(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                                 lengths: list[int], scale: float | None = None,
                                 shared_prefix: bool = False) -> torch.Tensor:
    """Causal attention within each example of a packed row, in float32 on the CPU.

    ``query`` is ``[1, heads, tokens, dim]``, ``key``/``value`` ``[1, kv_heads, tokens, dim]``
    (``heads`` a multiple of ``kv_heads``), ``lengths`` the examples' lengths in order (summing
    to ``tokens``). With ``shared_prefix`` the first "example" is a prefix that every other one
    continues: each of their tokens attends to all of it before its own tokens. Returns
    ``[1, tokens, heads, dim]``, differentiable in all three inputs.
    """
    dim = query.shape[-1]
    scale = scale if scale is not None else dim ** -0.5
    as_rows = [t[0].transpose(0, 1).contiguous() for t in (query, key, value)]  # [tokens, h, d]
    lengths_tensor = torch.tensor(lengths, dtype=torch.int64)
    if int(lengths_tensor.sum()) != query.shape[2]:
        raise ValueError(f"example lengths {lengths} do not add up to the row's "
                         f"{query.shape[2]} tokens")
    prefix = lengths[0] if shared_prefix else 0
    return _PackedCausalAttention.apply(*as_rows, lengths_tensor, prefix, float(scale))[None]

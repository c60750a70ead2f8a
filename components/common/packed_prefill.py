"""Prefill of Llama-architecture models with every prompt's tokens packed into one sequence.

A batch prefilled through transformers' forward is a rectangle: each prompt left padded to the
longest, so a batch of short and long prompts spends most of its matrix products on padding (the
held-out support conversations of ``benchmarks/bench_serve.py``, 16 at a time: 3,900 rows for
1,300 tokens). :class:`PackedPrefill` runs the prompts' tokens one after another as one sequence:
the linear layers, RMSNorms and rotary embeddings see only real tokens, and attention runs prompt
by prompt (each prompt's queries against its own keys, causal). A prompt may start with keys and
values found in a ``PrefixCache`` (``components.common.prefix_cache``): then only its remaining
tokens are packed, at their positions after the reused ones.

It computes what transformers' forward computes, from the same modules (``q_proj``...``down_proj``,
whatever their kind: ``nn.Linear``, ``Int8Linear``, packed), up to float rounding. With int8
weights the decode kernel takes (``fast_decode.int8_layer_weights``: the endpoint's), each layer
is instead one call of ``int8_prefill_layer`` over every new token (``int8_kernels.c``), and the
keys and values are float16, as decoding keeps them: a prompt of 20 new tokens joins a running
batch in about 90 ms instead of 130, most of the difference a dozen tensor operations a layer.
It leaves a ``DynamicCache`` in the layout decoding expects (rows left padded to the longest
prompt, a mask of the real positions), the next-token logits of every prompt, and every
prompt's own keys and values, which the prefix cache keeps. Models: :func:`supports_fast_decode`'s.
"""
from __future__ import annotations

import ctypes
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from components.common.fast_decode import KERNEL_CACHE_DTYPE, int8_layer_weights, rms_norm
from components.common.int8_linear import int8_kernels
from components.common.packing import causal_mask_after
from components.common.prefix_cache import PrefixMatch

Layers = list[tuple[torch.Tensor, torch.Tensor]]  # per layer: keys, values [heads, length, dim]


@dataclass
class PrefillResult:
    """What a prefill leaves: the cache, its mask ``[rows, width]`` (0: padding), the logits of
    each prompt's next token ``[rows, vocab]``, and each prompt's keys and values."""

    cache: object  # transformers' DynamicCache
    attention_mask: torch.Tensor
    logits: torch.Tensor
    prompt_layers: list[Layers]


class PackedPrefill:
    """Prefills prompts of a Llama-architecture model packed into one sequence (module doc)."""

    def __init__(self, model: nn.Module):
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        self.model = model
        self.apply_rotary = apply_rotary_pos_emb
        # int8 weights the decode kernel takes: each layer is one call into it (its float16
        # key/value cache, as decoding keeps it), instead of a dozen tensor operations
        self.int8_layers = int8_layer_weights(model)

    @torch.no_grad()
    def __call__(self, prompts: Sequence[Sequence[int]],
                 matches: Sequence[PrefixMatch]) -> PrefillResult:
        """Prefills ``prompts``, each after the first ``matches[i].length`` tokens, whose keys
        and values come from ``matches[i]`` (a ``PrefixMatch()`` for none)."""
        from transformers import DynamicCache

        inner = self.model.model
        device = inner.embed_tokens.weight.device
        fresh = [list(prompt[match.length:]) for prompt, match in zip(prompts, matches)]
        if not all(fresh):
            raise ValueError("every prompt needs a token after its reused prefix")
        ends = torch.tensor([len(tokens) for tokens in fresh]).cumsum(0).tolist()
        starts = [0] + ends[:-1]
        positions = torch.cat([torch.arange(match.length, len(prompt))
                               for prompt, match in zip(prompts, matches)]).to(device)
        input_ids = torch.tensor([t for tokens in fresh for t in tokens], device=device)
        hidden = inner.embed_tokens(input_ids)  # [tokens, hidden_size]
        cos, sin = inner.rotary_emb(hidden[None], positions[None])
        if self.int8_layers:
            return self._in_kernel(prompts, matches, ends, positions, hidden, cos[0], sin[0])
        masks = [causal_mask_after(match.length, len(tokens), device)
                 for tokens, match in zip(fresh, matches)]
        prompt_layers: list[Layers] = [[] for _ in prompts]
        for index, layer in enumerate(inner.layers):
            attention = layer.self_attn
            normed = rms_norm(layer.input_layernorm, hidden)
            query, key, value = (projection(normed).view(len(input_ids), -1, attention.head_dim)
                                 .transpose(0, 1)[None]
                                 for projection in (attention.q_proj, attention.k_proj,
                                                    attention.v_proj))
            query, key = self.apply_rotary(query, key, cos, sin)
            outputs = []
            for row, (start, end, match, mask) in enumerate(zip(starts, ends, matches, masks)):
                # new tensors (torch.cat, or contiguous copies): a prefix cache keeps them, and
                # must not keep the whole batch's keys alive through a view
                keys, values = key[0, :, start:end], value[0, :, start:end]
                reused = match.layer(index)
                if reused is not None:
                    keys, values = torch.cat([reused[0], keys], 1), torch.cat([reused[1], values], 1)
                else:
                    keys, values = keys.contiguous(), values.contiguous()
                prompt_layers[row].append((keys, values))
                outputs.append(F.scaled_dot_product_attention(
                    query[:, :, start:end], keys[None], values[None], attn_mask=mask,
                    is_causal=mask is None, scale=attention.scaling, enable_gqa=True)[0])
            attended = torch.cat(outputs, 1).transpose(0, 1).reshape(len(input_ids), -1)
            hidden = hidden + attention.o_proj(attended)
            mlp = layer.mlp
            normed = rms_norm(layer.post_attention_layernorm, hidden)
            hidden = hidden + mlp.down_proj(mlp.act_fn(mlp.gate_proj(normed)) * mlp.up_proj(normed))
        cache, attention_mask = _left_padded_cache(prompt_layers, DynamicCache(
            config=self.model.config))
        return PrefillResult(cache, attention_mask, self._logits(hidden, ends), prompt_layers)

    def _logits(self, hidden: torch.Tensor, ends: list[int]) -> torch.Tensor:
        """Each prompt's next-token logits, from the hidden state of its last token."""
        last = torch.tensor([end - 1 for end in ends], device=hidden.device)
        return self.model.lm_head(rms_norm(self.model.model.norm, hidden[last]))

    def _in_kernel(self, prompts: Sequence[Sequence[int]], matches: Sequence[PrefixMatch],
                   ends: list[int], positions: torch.Tensor, hidden: torch.Tensor,
                   cos: torch.Tensor, sin: torch.Tensor) -> PrefillResult:
        """The prefill with int8 weights: each layer one ``int8_prefill_layer`` call over every
        new token, writing each prompt's keys and values, in float16, right aligned in a cache
        of the prompts left padded to the longest (the cache decoding takes as it is)."""
        from transformers import DynamicCache

        attention = self.model.model.layers[0].self_attn
        kv_heads = attention.k_proj.out_features // attention.head_dim
        lengths = [len(prompt) for prompt in prompts]
        width, rows, head_dim = max(lengths), len(prompts), attention.head_dim
        # where each token's prompt starts in a layer's cache, in bytes from its start
        starts = torch.tensor([(row * kv_heads * width + width - length) * head_dim
                               * KERNEL_CACHE_DTYPE.itemsize for row, length in enumerate(lengths)])
        token_starts = starts.repeat_interleave(
            torch.tensor([length - match.length for length, match in zip(lengths, matches)]))
        positions, hidden = positions.contiguous(), hidden.contiguous()
        cos, sin = cos.contiguous(), sin.contiguous()
        cache, prompt_layers = DynamicCache(config=self.model.config), [[] for _ in prompts]
        for index, (weights, _) in enumerate(self.int8_layers):
            keys = torch.zeros((rows, kv_heads, width, head_dim), dtype=KERNEL_CACHE_DTYPE)
            values = torch.zeros_like(keys)
            for row, (match, length) in enumerate(zip(matches, lengths)):
                reused = match.layer(index)
                if reused is not None:
                    keys[row, :, width - length:width - length + match.length] = reused[0]
                    values[row, :, width - length:width - length + match.length] = reused[1]
            key_pointers = token_starts + keys.data_ptr()
            value_pointers = token_starts + values.data_ptr()
            int8_kernels().int8_prefill_layer(
                ctypes.addressof(weights), hidden.data_ptr(), hidden.shape[0], cos.data_ptr(),
                sin.data_ptr(), key_pointers.data_ptr(), value_pointers.data_ptr(),
                positions.data_ptr(), width, torch.get_num_threads())
            cache.update(keys, values, index)
            for row, length in enumerate(lengths):  # copies: the prefix cache keeps them
                prompt_layers[row].append((keys[row, :, width - length:].clone(),
                                           values[row, :, width - length:].clone()))
        return PrefillResult(cache, _left_padding_mask(lengths, hidden.device),
                             self._logits(hidden, ends), prompt_layers)


def _left_padded_cache(prompt_layers: list[Layers], cache) -> tuple[object, torch.Tensor]:
    """``cache`` filled with every prompt's keys and values, rows left padded to the longest,
    and the mask of real positions ``[rows, width]``."""
    lengths = [layers[0][0].shape[1] for layers in prompt_layers]
    width = max(lengths)
    for index in range(len(prompt_layers[0])):
        cache.update(_left_padded([layers[index][0] for layers in prompt_layers], width),
                     _left_padded([layers[index][1] for layers in prompt_layers], width), index)
    return cache, _left_padding_mask(lengths, prompt_layers[0][0][0].device)


def _left_padding_mask(lengths: list[int], device: torch.device) -> torch.Tensor:
    """The mask ``[rows, longest]`` of rows of ``lengths`` left padded to the longest: 0 for
    padding, 1 for real positions."""
    width = max(lengths)
    mask = torch.zeros((len(lengths), width), dtype=torch.long, device=device)
    for row, length in enumerate(lengths):
        mask[row, width - length:] = 1
    return mask


def _left_padded(tensors: list[torch.Tensor], width: int) -> torch.Tensor:
    """``[heads, length, dim]`` tensors stacked ``[rows, heads, width, dim]``, zeros before."""
    heads, _, dim = tensors[0].shape
    padded = tensors[0].new_zeros((len(tensors), heads, width, dim))
    for row, tensor in enumerate(tensors):
        padded[row, :, width - tensor.shape[1]:] = tensor
    return padded

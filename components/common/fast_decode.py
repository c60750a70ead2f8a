"""Decode steps of Llama-architecture models with a fraction of transformers' per-step work.

A decode step feeds each running request one token. transformers' forward spends more time
around the matrix products than in them once the weights are int8
(``components.common.int8_linear``): on a 2-core AVX2 CPU, SmolLM2-135M's products take about
12 ms a step and the forward adds about 18 ms (the key/value cache grows by ``torch.cat``, a
copy of the whole cache every step; masks and rotary embeddings come from general code; each
RMSNorm is six operations). :class:`FastDecodeStep` computes the same step, from the same
modules' parameters and transformers' own rotary embedding:

- the cache's key/value tensors become views into buffers with room to grow, so a step writes
  one position instead of copying the cache; the cache stays transformers' ``DynamicCache``,
  so prefill, row selection and merging work on it unchanged;
- with int8 weights (the endpoint's, where the kernel builds) each layer is one call into
  ``int8_kernels.c`` (RMSNorm, the projections, rotary embedding, the cache write, attention,
  the SiLU-gated MLP and the residual adds, in one OpenMP region): about 20 ms a step in all,
  against 30 ms through transformers with the same int8 layers. Its buffers keep keys and
  values in float16, as llama.cpp's cache does: a step of 16 rows at 200 cached positions
  reads 147 MB of them in float32, and half as much takes half the time;
- otherwise (float weights: evaluate, the local teacher) ``F.rms_norm`` and one
  ``scaled_dot_product_attention`` per layer, a padding mask only when some row has padding.

It takes models whose ``config.model_type`` is ``llama`` (SmolLM, Llama 2/3, TinyLlama and
their kin): :func:`supports_fast_decode`. Others decode with transformers' forward.
"""
from __future__ import annotations

import ctypes
import weakref

import torch
import torch.nn.functional as F
from torch import nn

from components.common.int8_linear import (ROW_GROUP, Int8Linear, Int8Matrix, int8_kernels,
                                            stack_int8)

FAST_DECODE_MODEL_TYPES = ("llama",)
CACHE_GROWTH = 64  # positions a cache buffer gains each time it is full
ROW_GROWTH = 8  # rows a new cache buffer has room for, beyond the batch's, for rows to join
KERNEL_HEAD_DIM_MULTIPLE = 8  # the kernel's attention works on 8 floats at a time
KERNEL_CACHE_DTYPE = torch.float16  # the int8 kernel's keys and values (int8_kernels.c)


def supports_fast_decode(model: nn.Module) -> bool:
    """Whether ``model`` is a transformers Llama-architecture causal LM that
    :class:`FastDecodeStep` computes exactly (up to float rounding)."""
    config = getattr(model, "config", None)
    inner = getattr(model, "model", None)
    return (getattr(config, "model_type", None) in FAST_DECODE_MODEL_TYPES
            and hasattr(inner, "layers") and hasattr(inner, "rotary_emb")
            and hasattr(model, "lm_head"))


class DecoderLayerWeights(ctypes.Structure):
    """A decoder layer as ``int8_decoder_layer`` takes it (``DecoderLayer`` in int8_kernels.c)."""

    _fields_ = [("qkv", Int8Matrix), ("output", Int8Matrix), ("gate_up", Int8Matrix),
                ("down", Int8Matrix), ("input_norm", ctypes.c_void_p),
                ("post_attention_norm", ctypes.c_void_p), ("input_eps", ctypes.c_float),
                ("post_attention_eps", ctypes.c_float), ("attention_scale", ctypes.c_float),
                ("hidden_size", ctypes.c_int64), ("head_dim", ctypes.c_int64),
                ("query_heads", ctypes.c_int64), ("kv_heads", ctypes.c_int64),
                ("inner", ctypes.c_int64)]


# Each model's layer weights, stacked once: every generate call and request run alone starts a
# new FastDecodeStep, and stacking the embedded model's layers copies 70 MB (about 20 ms). Kept
# with the first layer's query projection they were made from: converting the model's layers
# afterwards (use_int8_weights) replaces it, and the weights are made again.
_INT8_LAYERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def int8_layer_weights(model: nn.Module) -> list[tuple[DecoderLayerWeights, list]] | None:
    """Every decoder layer's ``DecoderLayerWeights`` (with the stacked modules it points into,
    to keep them alive) when the model's projections are all ``Int8Linear`` with out_features
    multiples of 4, its MLP SiLU-gated and its head_dim a multiple of 8; else None. Computed
    once per model."""
    query_projection = model.model.layers[0].self_attn.q_proj
    made_from, layers = _INT8_LAYERS.get(model, (None, None))
    if made_from is not query_projection:
        layers = _stacked_int8_layers(model)
        _INT8_LAYERS[model] = query_projection, layers
    return layers


def _stacked_int8_layers(model: nn.Module) -> list[tuple[DecoderLayerWeights, list]] | None:
    config = model.config
    if getattr(config, "hidden_act", None) != "silu" or config.hidden_size % ROW_GROUP:
        return None
    layers = []
    for layer in model.model.layers:
        attention, mlp = layer.self_attn, layer.mlp
        projections = (attention.q_proj, attention.k_proj, attention.v_proj, attention.o_proj,
                       mlp.gate_proj, mlp.up_proj, mlp.down_proj)
        if (attention.head_dim % KERNEL_HEAD_DIM_MULTIPLE
                or not all(isinstance(linear, Int8Linear) and linear.out_features % ROW_GROUP == 0
                           for linear in projections)):
            return None
        qkv = stack_int8([attention.q_proj, attention.k_proj, attention.v_proj])
        gate_up = stack_int8([mlp.gate_proj, mlp.up_proj])
        weights = DecoderLayerWeights(
            Int8Matrix.of(qkv), Int8Matrix.of(attention.o_proj), Int8Matrix.of(gate_up),
            Int8Matrix.of(mlp.down_proj), layer.input_layernorm.weight.data_ptr(),
            layer.post_attention_layernorm.weight.data_ptr(),
            layer.input_layernorm.variance_epsilon,
            layer.post_attention_layernorm.variance_epsilon, attention.scaling,
            config.hidden_size, attention.head_dim,
            attention.q_proj.out_features // attention.head_dim,
            attention.k_proj.out_features // attention.head_dim, mlp.down_proj.in_features)
        layers.append((weights, [qkv, gate_up]))
    return layers


class FastDecodeStep:
    """One decode step of a Llama-architecture model: one new token per row."""

    def __init__(self, model: nn.Module):
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        self.model = model
        self.apply_rotary = apply_rotary_pos_emb
        self.buffers: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.int8_layers = int8_layer_weights(model)
        # the kernel keeps keys and values in float16 (half the memory a step of many rows
        # reads); the torch path in the model's own dtype
        self.cache_dtype = KERNEL_CACHE_DTYPE if self.int8_layers else None

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 position_ids: torch.Tensor, cache) -> torch.Tensor:
        """The next-token logits ``[rows, vocab]`` for ``input_ids`` ``[rows, 1]`` at
        ``position_ids`` ``[rows, 1]``; ``attention_mask`` ``[rows, cached + 1]`` (0: padding);
        appends the step's keys and values to ``cache`` (a ``DynamicCache``)."""
        inner = self.model.model
        hidden = inner.embed_tokens(input_ids)
        cos, sin = inner.rotary_emb(hidden, position_ids)
        padded = not bool(attention_mask.all())
        if self.int8_layers:
            mask = attention_mask.to(torch.int64).contiguous() if padded else None
            hidden, cos, sin = hidden.contiguous(), cos.contiguous(), sin.contiguous()
            for index, (weights, _) in enumerate(self.int8_layers):
                self._int8_layer(index, weights, hidden, cos, sin, mask, cache.layers[index])
        else:
            padding = attention_mask[:, None, None, :].bool() if padded else None
            for index, layer in enumerate(inner.layers):
                hidden = hidden + self._attention(index, layer, hidden, cos, sin, padding,
                                                  cache.layers[index])
                mlp = layer.mlp
                normed = rms_norm(layer.post_attention_layernorm, hidden)
                hidden = hidden + mlp.down_proj(mlp.act_fn(mlp.gate_proj(normed))
                                                * mlp.up_proj(normed))
        return self.model.lm_head(rms_norm(inner.norm, hidden))[:, -1, :]

    def _int8_layer(self, index: int, weights: DecoderLayerWeights, hidden: torch.Tensor,
                    cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None,
                    cache_layer) -> None:
        """One decoder layer on ``hidden`` ``[rows, 1, hidden_size]``, in place, in the kernel."""
        keys, values, length = self._room_for_one(index, cache_layer)
        int8_kernels().int8_decoder_layer(
            ctypes.addressof(weights), hidden.data_ptr(), hidden.shape[0], cos.data_ptr(),
            sin.data_ptr(), keys.data_ptr(), values.data_ptr(), keys.shape[2], length,
            None if mask is None else mask.data_ptr(), torch.get_num_threads())
        cache_layer.keys, cache_layer.values = keys[:, :, :length + 1], values[:, :, :length + 1]

    def _attention(self, index: int, layer: nn.Module, hidden: torch.Tensor, cos: torch.Tensor,
                   sin: torch.Tensor, padding: torch.Tensor | None, cache_layer) -> torch.Tensor:
        attention = layer.self_attn
        rows, head_dim = hidden.shape[0], attention.head_dim
        normed = rms_norm(layer.input_layernorm, hidden)
        query = attention.q_proj(normed).view(rows, 1, -1, head_dim).transpose(1, 2)
        key = attention.k_proj(normed).view(rows, 1, -1, head_dim).transpose(1, 2)
        value = attention.v_proj(normed).view(rows, 1, -1, head_dim).transpose(1, 2)
        query, key = self.apply_rotary(query, key, cos, sin)
        keys, values, length = self._room_for_one(index, cache_layer)
        keys[:, :, length], values[:, :, length] = key[:, :, 0], value[:, :, 0]
        cache_layer.keys, cache_layer.values = keys[:, :, :length + 1], values[:, :, :length + 1]
        output = F.scaled_dot_product_attention(query, cache_layer.keys, cache_layer.values,
                                                attn_mask=padding, scale=attention.scaling,
                                                enable_gqa=True)
        return attention.o_proj(output.transpose(1, 2).reshape(rows, 1, -1))

    def _room_for_one(self, index: int, cache_layer) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Contiguous key and value buffers ``[rows, heads, capacity, head_dim]`` that start
        with the layer's cache and have room for one more position, and the cache's length:
        the layer's own buffers (their first rows) when its cache is a view of them, else new
        ones (a copy)."""
        rows, length = cache_layer.keys.shape[0], cache_layer.keys.shape[2]
        buffers = self._own_buffers(index, cache_layer)
        if buffers is None or length >= buffers[0].shape[2]:
            buffers = (_grown(cache_layer.keys, self.cache_dtype),
                       _grown(cache_layer.values, self.cache_dtype))
            self.buffers[index] = buffers
        return buffers[0][:rows], buffers[1][:rows], length

    def _own_buffers(self, index: int, cache_layer) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The layer's buffers when its cache is a view of their first rows and positions."""
        buffers = self.buffers.get(index)
        if buffers and _is_prefix_view(cache_layer.keys, buffers[0]) \
                and _is_prefix_view(cache_layer.values, buffers[1]):
            return buffers
        return None

    def keep_rows(self, cache, kept: list[int]) -> bool:
        """Keeps rows ``kept`` of ``cache`` (a ``DynamicCache``) in place in this step's buffers:
        row i takes row ``kept[i]``'s keys and values, copied where they differ. ``kept`` in the
        order ``swap_remove_order`` gives copies one row per hole; False, with nothing changed,
        for another order or when the cache is not in the buffers (then the caller selects)."""
        owned = [self._own_buffers(index, layer) for index, layer in enumerate(cache.layers)]
        moves = [(row, source) for row, source in enumerate(kept) if row != source]
        if not all(owned) or any(source < len(kept) for _, source in moves):
            return False  # a move could overwrite a row still to be read
        for layer, buffers in zip(cache.layers, owned):
            length = layer.keys.shape[2]
            for buffer in buffers:
                for row, source in moves:
                    buffer[row, :, :length] = buffer[source, :, :length]
            layer.keys = buffers[0][:len(kept), :, :length]
            layer.values = buffers[1][:len(kept), :, :length]
        return True

    def append_rows(self, cache, fresh) -> bool:
        """Appends the rows of ``fresh`` (a ``DynamicCache`` no longer than ``cache``) to
        ``cache``, in place in this step's buffers, each row's positions right aligned (left
        padded with zeros). False, with nothing changed, when the cache is not in the buffers,
        or they lack the rows or positions (then the caller merges)."""
        owned = [self._own_buffers(index, layer) for index, layer in enumerate(cache.layers)]
        rows, length = cache.layers[0].keys.shape[0], cache.layers[0].keys.shape[2]
        added, fresh_length = fresh.layers[0].keys.shape[0], fresh.layers[0].keys.shape[2]
        if not all(owned) or fresh_length > length \
                or rows + added > owned[0][0].shape[0]:
            return False
        for layer, new, buffers in zip(cache.layers, fresh.layers, owned):
            for buffer, tensor in zip(buffers, (new.keys, new.values)):
                buffer[rows:rows + added, :, :length - fresh_length] = 0
                buffer[rows:rows + added, :, length - fresh_length:length] = tensor
            layer.keys = buffers[0][:rows + added, :, :length]
            layer.values = buffers[1][:rows + added, :, :length]
        return True


def swap_remove_order(kept: list[int], rows: int) -> list[int]:
    """The rows ``kept`` (ascending, of ``rows``) in the order that moves fewest rows: each row
    stays where it is, but the rows past the end of the kept ones move into the holes."""
    count = len(kept)
    kept_set = set(kept)
    tail = iter(row for row in kept if row >= count)
    return [row if row in kept_set else next(tail) for row in range(count)]


def rms_norm(norm: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """transformers' LlamaRMSNorm in one operation."""
    return F.rms_norm(hidden, (hidden.shape[-1],), norm.weight, norm.variance_epsilon)


def _is_prefix_view(tensor: torch.Tensor, buffer: torch.Tensor) -> bool:
    """Whether ``tensor`` is ``buffer[:rows, :, :length]`` for some rows and length."""
    return (tensor.data_ptr() == buffer.data_ptr() and tensor.shape[1] == buffer.shape[1]
            and tensor.shape[0] <= buffer.shape[0] and tensor.shape[2] <= buffer.shape[2]
            and tensor.stride() == buffer.stride())


def _grown(tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """A contiguous ``[rows + ROW_GROWTH, heads, length + CACHE_GROWTH, dim]`` buffer of
    ``dtype`` (None: the tensor's) starting with ``tensor``: room for rows to join and positions
    to come."""
    rows, heads, length, dim = tensor.shape
    buffer = tensor.new_empty((rows + ROW_GROWTH, heads, length + CACHE_GROWTH, dim),
                              dtype=dtype or tensor.dtype)
    buffer[:rows, :, :length] = tensor
    return buffer

"""components.common.int8_linear and components.common.fast_decode: int8 layers, the C kernels,
and decode steps that must compute what transformers' forward computes."""
from __future__ import annotations

import dataclasses
import os
import re

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from torch import nn
from transformers import DynamicCache, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from components.common import c_kernels, generation, int8_linear
from components.common.fast_decode import (CACHE_GROWTH, FastDecodeStep, supports_fast_decode,
                                            swap_remove_order)
from components.common.int8_linear import (Int8Linear, int8_kernel_name, int8_unavailable_reason,
                                           serving_weights, stack_int8, use_int8_weights)
from tests.tolerances import (assert_within, chain_bound, decoder_lengths, float16_rounding_bound,
                              logit_magnitude, sum_bound, unit_roundoff)


# The int8 kernels' variants this CPU has (c_kernels.ISAS): the kernel tests run under each.
KERNEL_VARIANTS = [isa for isa, spec in c_kernels.ISAS.items() if spec.supported()]


@pytest.fixture(params=KERNEL_VARIANTS)
def kernel_variant(request, kernel_switch):
    """Runs a test under each int8 kernel variant the CPU has (the variants a CPU lacks are
    checked to be refused: test_auto_picks_the_best_variant_and_a_missing_one_is_refused)."""
    kernel_switch(request.param)
    assert int8_kernel_name() == f"int8 kernel ({c_kernels.ISAS[request.param].name})"
    return request.param


def tiny_llama(layers: int = 2, seed: int = 0, attention_bias: bool = False) -> LlamaForCausalLM:
    config = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=96,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=512, initializer_range=0.2,
                         attention_bias=attention_bias, tie_word_embeddings=True)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


@pytest.mark.c_kernels
def test_the_kernels_build_on_this_machine(kernel_variant):
    # The test machines are x86-64 with AVX2 and a C compiler: the int8 path must be the one
    # exercised here, never silently replaced by the float fallback.
    assert int8_unavailable_reason() is None


@pytest.mark.c_kernels
def test_auto_picks_the_best_variant_and_a_missing_one_is_refused(monkeypatch, kernel_switch):
    best = c_kernels.ISAS[KERNEL_VARIANTS[-1]]
    kernel_switch("auto")
    assert int8_kernel_name() == f"int8 kernel ({best.name})"
    for isa, spec in c_kernels.ISAS.items():  # each variant the CPU has, and none other, runs
        kernel_switch(isa)
        assert int8_unavailable_reason() == (
            None if isa in KERNEL_VARIANTS
            else f"TUNEPIPE_KERNEL_ISA={isa}, but this CPU has no {spec.name}")
    # attention_kernels.c has an AVX2 variant only: asked for AVX-512, it runs that
    assert c_kernels.kernel_isa("attention_kernels.c").name == "AVX2"
    # a CPU without AVX-512: auto takes AVX2, and avx512 is refused with the reason
    missing = dataclasses.replace(c_kernels.ISAS["avx512"], supported=lambda: False)
    monkeypatch.setitem(c_kernels.ISAS, "avx512", missing)
    kernel_switch("auto")
    assert int8_kernel_name() == "int8 kernel (AVX2)" and int8_unavailable_reason() is None
    kernel_switch("avx512")
    assert int8_unavailable_reason() == "TUNEPIPE_KERNEL_ISA=avx512, but this CPU has no AVX-512"
    kernel_switch("sse")
    with pytest.raises(ValueError, match=r"TUNEPIPE_KERNEL_ISA='sse': use one of"):
        int8_unavailable_reason()


@pytest.mark.c_kernels
@pytest.mark.parametrize("out_features,bias,rows",
                         [(64, False, 1), (70, True, 3), (8, True, 41), (70, True, 300)])
def test_int8_linear_multiplies_by_its_dequantized_weight(out_features, bias, rows,
                                                          kernel_variant):
    torch.manual_seed(1)
    linear = nn.Linear(96, out_features, bias=bias)
    layer = Int8Linear(linear)
    x = torch.randn(2, rows, 96)
    expected = nn.functional.linear(x, layer.dequantized_weight(), linear.bias)
    assert layer(x).shape == (2, rows, out_features)
    # the kernel and oneDNN add the 96 products in their own orders
    magnitude = x.abs() @ layer.dequantized_weight().abs().T
    if linear.bias is not None:
        magnitude = magnitude + linear.bias.detach().abs()
    assert_within(layer(x), expected, sum_bound(96 + bias, magnitude), "int8 linear")
    # Rows alone (converting each weight as read) and in a batch (converting each group once,
    # in chunks of rows) add in the same order: the same bits, whatever the batch.
    alone = torch.stack([torch.stack([layer(x[i, j:j + 1])[0] for j in range(rows)])
                         for i in range(2)])
    assert torch.equal(layer(x), alone)
    # and the quantization itself is close to the float layer: within half a level of its block
    # (amax / 254), plus float32's rounding of the scale, the dequantizing product and the
    # difference (u each, relative to at most amax)
    blocks = linear.weight.detach().view(out_features, -1, 32)
    error = (layer.dequantized_weight() - linear.weight).abs().view(out_features, -1, 32)
    amax = blocks.abs().amax(dim=-1, keepdim=True)
    assert (error <= amax / 254 + 3 * unit_roundoff() * amax).all()


@pytest.mark.c_kernels
def test_stacked_layers_compute_side_by_side_and_share_their_buffers(kernel_variant):
    torch.manual_seed(2)
    parts = [Int8Linear(nn.Linear(64, n, bias=n == 8)) for n in (32, 8, 12)]
    x = torch.randn(5, 64)
    separate = [part(x) for part in parts]
    stacked = stack_int8(parts)
    # each output row adds its products in the same order, stacked or not: the same bits
    assert torch.equal(stacked(x), torch.cat(separate, dim=1))
    for part, alone in zip(parts, separate):  # the parts now read the stacked buffers
        assert part.weight_int8.untyped_storage().data_ptr() == \
            stacked.weight_int8.untyped_storage().data_ptr()
        assert torch.equal(part(x), alone)
    with pytest.raises(ValueError, match="multiples of 4"):
        stack_int8([Int8Linear(nn.Linear(64, 6))])


def test_layers_the_kernel_cannot_take_stay_float():
    model = nn.Sequential(nn.Linear(64, 10), nn.Linear(10, 3))  # in_features 10: not 32k
    use_int8_weights(model)
    assert isinstance(model[0], Int8Linear) and type(model[1]) is nn.Linear


class Float16RoundedCache(DynamicCache):
    """A cache that keeps keys and values rounded to float16 (in float32 tensors), as the int8
    kernel's cache keeps them: transformers' forward then attends over the same numbers."""

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        return super().update(key_states.half().float(), value_states.half().float(), layer_idx,
                              *args, **kwargs)


def _forced_logits(model, step: FastDecodeStep | None, steps: int, padded: bool,
                   cache_class: type = DynamicCache) -> torch.Tensor:
    """Next-token logits for ``steps`` given tokens after a prefill of two rows (the second
    left-padded by 5 when ``padded``), through ``step`` or transformers' forward."""
    torch.manual_seed(3)
    prompt, forced = torch.randint(0, 300, (2, 12)), torch.randint(0, 300, (2, steps))
    mask = torch.ones(2, 12, dtype=torch.long)
    if padded:
        mask[1, :5] = 0
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    cache = cache_class(config=model.config)
    cache_argument = {generation._cache_argument_name(model): cache}  # the name varies
    logits = []
    with torch.inference_mode():
        model(input_ids=prompt, attention_mask=mask, position_ids=positions, use_cache=True,
              **cache_argument)
        following = positions[:, -1:] + 1
        for index in range(steps):
            mask = torch.cat([mask, mask.new_ones((2, 1))], dim=1)
            token = forced[:, index:index + 1]
            if step is None:
                logits.append(model(input_ids=token, attention_mask=mask, position_ids=following,
                                    use_cache=True, **cache_argument).logits[:, -1])
            else:
                logits.append(step(token, mask, following, cache))
            following = following + 1
    return torch.stack(logits)


@pytest.mark.parametrize("padded", [False, True])
def test_fast_step_in_float_equals_transformers_forward(padded):
    model = tiny_llama()
    step = FastDecodeStep(model)
    assert step.int8_layers is None  # float weights: the torch path
    expected = _forced_logits(model, None, CACHE_GROWTH + 6, padded)  # the buffers grow once
    # the same sums in other orders (F.rms_norm, one SDPA call): the float32 bound of the
    # decoder's chain over the 12 + 70 positions (tests/tolerances.py)
    bound = chain_bound(decoder_lengths(model.config, 12 + CACHE_GROWTH + 6),
                        logit_magnitude(model))
    assert_within(_forced_logits(model, step, CACHE_GROWTH + 6, padded), expected, bound,
                  "logits")


@pytest.mark.c_kernels
@pytest.mark.parametrize("padded,bias", [(False, False), (True, True)])
def test_int8_kernel_step_equals_transformers_forward_with_the_same_int8_layers(padded, bias,
                                                                                kernel_variant):
    model = use_int8_weights(tiny_llama(attention_bias=bias))
    step = FastDecodeStep(model)
    assert step.int8_layers is not None  # the whole layer in the C kernel
    expected = _forced_logits(model, None, CACHE_GROWTH + 6, padded, Float16RoundedCache)
    actual = _forced_logits(model, step, CACHE_GROWTH + 6, padded, Float16RoundedCache)
    assert step.buffers[0][0].dtype == torch.float16  # the cache's keys and values
    # The float32 bound of the decoder's chain over 12 + 70 positions; and where float rounding
    # puts a key or value on the other side of a float16 rounding boundary, the two round it a
    # float16 step apart: each layer's keys and values, one more stage of that relative error.
    magnitude = logit_magnitude(model)
    layers = model.config.num_hidden_layers
    bound = (chain_bound(decoder_lengths(model.config, 12 + CACHE_GROWTH + 6), magnitude)
             + 2 * layers * float16_rounding_bound(magnitude))
    assert_within(actual, expected, bound, "logits")


@pytest.mark.c_kernels
def test_the_kernels_float16_cache_stays_close_to_a_float32_cache(kernel_variant):
    model = use_int8_weights(tiny_llama())
    expected = _forced_logits(model, None, 8, padded=True)
    actual = _forced_logits(model, FastDecodeStep(model), 8, padded=True)
    # rounding each layer's keys and values to float16 changes them by u16 relative at most:
    # two stages of that error a layer, on top of the float32 chain over 12 + 8 positions
    magnitude = logit_magnitude(model)
    bound = (chain_bound(decoder_lengths(model.config, 20), magnitude)
             + model.config.num_hidden_layers * float16_rounding_bound(magnitude))
    assert_within(actual, expected, bound, "logits")


@pytest.mark.c_kernels
def test_int8_model_stays_close_to_the_float_model(kernel_variant):
    model = tiny_llama()
    expected = _forced_logits(model, None, 8, padded=True)
    quantized = _forced_logits(use_int8_weights(model), FastDecodeStep(model), 8, padded=True)
    assert (quantized - expected).abs().max() < 0.05 * expected.abs().max()


def test_only_llama_models_take_the_fast_step():
    assert supports_fast_decode(tiny_llama())
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_embd=32, n_layer=1, n_head=2))
    assert not supports_fast_decode(gpt2)


def test_serving_weights_follow_the_setting(monkeypatch):
    model = tiny_llama()
    monkeypatch.delenv(int8_linear.SERVING_WEIGHTS_ENV, raising=False)
    refused = int8_unavailable_reason()  # TUNEPIPE_C_KERNELS=off, or no compiler or AVX2
    weights = serving_weights(model)
    if refused is None:
        assert (weights.kind, weights.reason) == (
            "int8", f"{int8_kernel_name()}, 3.5x less memory to stream per token")
    else:
        assert (weights.kind, weights.reason) == ("float", refused)
        monkeypatch.setenv(int8_linear.SERVING_WEIGHTS_ENV, "int8")
        refusal = re.escape(f"TUNEPIPE_SERVING_WEIGHTS=int8, but {refused}")
        with pytest.raises(ValueError, match=refusal):
            serving_weights(model)
    monkeypatch.setenv(int8_linear.SERVING_WEIGHTS_ENV, "float")
    assert serving_weights(model).describe() == "float weights: TUNEPIPE_SERVING_WEIGHTS=float"
    monkeypatch.setenv(int8_linear.SERVING_WEIGHTS_ENV, "int4")
    with pytest.raises(ValueError, match="use one of"):
        serving_weights(model)
    monkeypatch.setenv(int8_linear.SERVING_WEIGHTS_ENV, "auto")
    assert serving_weights(model.to(torch.bfloat16)).kind == "float"  # int8 is for float32


def test_without_a_compiler_auto_serves_float_and_int8_is_an_error(monkeypatch, tmp_path):
    monkeypatch.delenv(c_kernels.SWITCH_ENV, raising=False)  # the kernels' own refusal, not it
    monkeypatch.setenv("TUNEPIPE_CACHE", str(tmp_path))  # no kernel built there yet
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    c_kernels.forget_kernels()
    try:
        model = tiny_llama()
        monkeypatch.setenv(int8_linear.SERVING_WEIGHTS_ENV, "auto")
        weights = serving_weights(model)
        assert weights.kind == "float" and "no-such-compiler" in weights.reason
        monkeypatch.setenv(int8_linear.SERVING_WEIGHTS_ENV, "int8")
        with pytest.raises(ValueError, match="TUNEPIPE_SERVING_WEIGHTS=int8, but"):
            serving_weights(model)
    finally:
        c_kernels.forget_kernels()


def _random_cache(model, rows: int, length: int) -> DynamicCache:
    cache = DynamicCache(config=model.config)
    for index in range(model.config.num_hidden_layers):
        cache.update(torch.randn(rows, 2, length, 16), torch.randn(rows, 2, length, 16), index)
    return cache


@pytest.mark.parametrize("int8", [False, pytest.param(True, marks=pytest.mark.c_kernels)])
def test_rows_leave_and_join_in_place_in_the_step_buffers(int8):
    """Finished rows leave and new rows join by copying those rows only, in the buffers a decode
    step left the cache in (float16 for the int8 kernel); what the cache holds is what selecting
    and concatenating give."""
    model = use_int8_weights(tiny_llama()) if int8 else tiny_llama()
    step = FastDecodeStep(model)
    torch.manual_seed(7)
    cache = _random_cache(model, 5, 6)
    with torch.no_grad():  # one step puts the cache into the step's buffers (as generation)
        step(torch.randint(0, 300, (5, 1)), torch.ones(5, 7, dtype=torch.long),
             torch.full((5, 1), 6), cache)
    before = [(layer.keys.clone(), layer.values.clone()) for layer in cache.layers]
    order = swap_remove_order([0, 2, 4], 5)
    assert order == [0, 4, 2]  # row 4 fills the hole at 1; rows 0 and 2 stay
    assert step.keep_rows(cache, order)
    for (keys, values), layer in zip(before, cache.layers):
        assert torch.equal(layer.keys, keys[order]) and torch.equal(layer.values, values[order])
    assert not step.keep_rows(cache, [2, 0])  # row 0 would be overwritten before it is read
    kept = [(layer.keys.clone(), layer.values.clone()) for layer in cache.layers]
    fresh = _random_cache(model, 2, 4)
    assert step.append_rows(cache, fresh)
    for (keys, values), new, layer in zip(kept, fresh.layers, cache.layers):
        assert layer.keys.shape == layer.values.shape == (5, 2, 7, 16)
        assert torch.equal(layer.keys[:3], keys) and torch.equal(layer.values[:3], values)
        assert layer.keys.dtype == (torch.float16 if int8 else torch.float32)
        assert torch.equal(layer.keys[3:, :, 3:], new.keys.to(layer.keys.dtype))
        assert torch.equal(layer.values[3:, :, 3:], new.values.to(layer.keys.dtype))
        assert layer.keys[3:, :, :3].eq(0).all() and layer.values[3:, :, :3].eq(0).all()
    assert not step.append_rows(cache, _random_cache(model, 1, 9))  # longer: the caller merges
    assert not step.append_rows(_random_cache(model, 2, 7), fresh)  # not in the buffers


@pytest.mark.c_kernels
def test_a_row_decodes_to_the_same_bits_alone_and_left_padded_in_a_batch(kernel_variant):
    """The kernel's step gives a row the same logits alone as in a batch of rows of other
    lengths, left padded to the longest (its products add up in the same order whatever the
    batch; its attention counts positions back from the newest)."""
    model = use_int8_weights(tiny_llama())
    torch.manual_seed(11)
    lengths = [37, 50, 29, 44, 61, 33]  # 6 rows: the batch takes the kernel's many-row products
    layers = model.config.num_hidden_layers
    prefixes = [[(4 * torch.randn(1, 2, length, 16), torch.randn(1, 2, length, 16))
                 for _ in range(layers)] for length in lengths]
    tokens = torch.randint(0, 300, (len(lengths), 12))

    def decode(rows: list[int]) -> torch.Tensor:
        width = max(lengths[row] for row in rows)  # alone: no padding
        cache = DynamicCache(config=model.config)
        for index in range(layers):
            keys = torch.zeros(len(rows), 2, width, 16)
            values = torch.zeros(len(rows), 2, width, 16)
            for i, row in enumerate(rows):
                keys[i, :, width - lengths[row]:] = prefixes[row][index][0][0]
                values[i, :, width - lengths[row]:] = prefixes[row][index][1][0]
            cache.update(keys, values, index)
        mask = torch.zeros(len(rows), width, dtype=torch.long)
        for i, row in enumerate(rows):
            mask[i, width - lengths[row]:] = 1
        positions = torch.tensor([[lengths[row]] for row in rows])
        step, logits = FastDecodeStep(model), []
        with torch.inference_mode():
            for index in range(tokens.shape[1]):
                mask = torch.cat([mask, mask.new_ones((len(rows), 1))], dim=1)
                logits.append(step(tokens[rows, index:index + 1], mask, positions, cache))
                positions = positions + 1
        return torch.stack(logits, 1)

    batched = decode(list(range(len(lengths))))
    for row in range(len(lengths)):
        assert torch.equal(decode([row])[0], batched[row])

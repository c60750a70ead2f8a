"""components.common.prefix_cache and components.common.packed_prefill: prompts packed into one
sequence, after the keys and values of earlier prompts, must compute what transformers' forward
computes on each prompt alone."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

from components.common import generation
from components.common.generation import SamplingParams, generate_token_ids
from components.common.int8_linear import use_int8_weights
from components.common.packed_prefill import PackedPrefill
from components.common.prefix_cache import PrefixCache, PrefixMatch
from tests.test_int8_decode import KERNEL_VARIANTS, Float16RoundedCache, tiny_llama
from tests.tolerances import (assert_within, chain_bound, decoder_lengths, float16_rounding_bound,
                              logit_magnitude)


def kv(length: int, value: float = 0.0, layers: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Keys and values ``[2 heads, length, 4]`` of ``layers`` layers: 64 bytes a token a layer."""
    return [(torch.full((2, length, 4), value), torch.full((2, length, 4), value))
            for _ in range(layers)]


def test_a_prompt_reuses_the_longest_start_it_shares_and_keeps_its_last_token():
    cache = PrefixCache()
    cache.add([1, 2, 3, 4, 5], kv(5, 1.0))
    cache.add([1, 2, 9], kv(3, 2.0))
    assert cache.longest([7, 1, 2]) == PrefixMatch()
    match = cache.longest([1, 2, 3, 8])
    assert match.length == 3 and match.cached.tokens == (1, 2, 3, 4, 5)
    keys, values = match.layer(0)
    assert keys.shape == values.shape == (2, 3, 4) and keys.eq(1.0).all()
    assert cache.longest([1, 2, 9, 6]).cached.tokens == (1, 2, 9)
    # a prompt cached whole still computes its last token: the next token's logits need it
    assert cache.longest([1, 2, 3, 4, 5]).length == 4
    assert cache.longest([1, 2, 3]).length == 2
    assert PrefixMatch().layer(0) is None


def test_a_longer_prompt_replaces_the_cached_prompts_it_starts_with():
    cache = PrefixCache()
    cache.add([1, 2], kv(2))
    cache.add([1, 2, 3], kv(3))
    assert len(cache) == 1 and cache.bytes == 3 * 64
    cache.add([1, 2], kv(2))  # already there, as the start of [1, 2, 3]
    assert len(cache) == 1 and cache.longest([1, 2, 3, 4]).length == 3


def test_the_least_recently_used_prompts_go_first_when_over_budget():
    cache = PrefixCache(max_bytes=10 * 64)
    cache.add([1, 1, 1, 1], kv(4))
    cache.add([2, 2, 2, 2], kv(4))
    cache.longest([1, 1, 1, 7])  # [1, ...] used last: [2, ...] goes
    cache.add([3, 3, 3, 3], kv(4))
    assert cache.bytes == 8 * 64 and cache.longest([2, 2, 2, 9]).length == 0
    assert cache.longest([1, 1, 1, 9]).length == 3 and cache.longest([3, 3, 9]).length == 2
    cache.add(list(range(20)), kv(20))  # alone over the budget: not kept, nothing evicted
    assert len(cache) == 2
    nothing = PrefixCache(max_bytes=0)  # keeps nothing
    nothing.add([1, 2], kv(2))
    assert len(nothing) == 0 and nothing.longest([1, 2, 3]) == PrefixMatch()
    with pytest.raises(ValueError, match=">= 0 bytes"):
        PrefixCache(max_bytes=-1)


def test_describe_counts_prompt_tokens_and_reused_ones():
    cache = PrefixCache(max_bytes=1000)
    cache.record(10, 0)
    cache.record(12, 9)
    cache.add([1, 2], kv(2))
    assert cache.describe() == {"prompts": 1, "bytes": 128, "max_bytes": 1000,
                                "prompt_tokens": 22, "reused_tokens": 9}


def _prefill_alone(model, prompt: list[int], cache_class: type | None = None):
    """transformers' forward on one prompt: its next-token logits and its cache (a
    ``cache_class``, default ``DynamicCache``)."""
    from transformers import DynamicCache

    cache = (cache_class or DynamicCache)(config=model.config)
    ids = torch.tensor([prompt])
    logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True,
                   **{generation._cache_argument_name(model): cache}).logits[0, -1]
    return logits, cache


@pytest.mark.parametrize("weights", ["float"] + [
    pytest.param(f"int8 {isa}", marks=pytest.mark.c_kernels) for isa in KERNEL_VARIANTS])
def test_packed_prefill_equals_each_prompt_through_transformers_forward(weights, kernel_switch):
    """With int8 weights each layer runs in the kernel, keys and values in float16 as decoding
    keeps them: transformers' forward then keeps its cache rounded to float16 too.

    The two add up in different orders (the kernel's, oneDNN's): logits within the float32
    bound of a decoder's chain of sums (tests/tolerances.py) over the longest prompt, 17
    positions. In float16 a key or value of the two may round a float16 step apart (where their
    float32 values fall either side of a rounding boundary): keys and values within one step
    plus the float32 bound of their own sums, logits with each layer's keys and values as one
    more stage of that relative error."""
    model = tiny_llama(layers=3, attention_bias=True)
    int8 = weights.startswith("int8")
    if int8:  # "int8 avx2": under that kernel variant
        kernel_switch(weights.split()[1])
        use_int8_weights(model)
    cache_class = Float16RoundedCache if int8 else None
    rounding_steps = 2 * model.config.num_hidden_layers if int8 else 0
    magnitude = logit_magnitude(model)
    logit_bound = (chain_bound(decoder_lengths(model.config, 17), magnitude)
                   + rounding_steps * float16_rounding_bound(magnitude))
    key_lengths = decoder_lengths(model.config, 17)[:-2]  # at most every layer's sums before
    torch.manual_seed(4)
    start = torch.randint(0, 300, (9,)).tolist()  # shared by two prompts and then cached
    prompts = [start + torch.randint(0, 300, (5,)).tolist(), torch.randint(0, 300, (17,)).tolist(),
               start + torch.randint(0, 300, (1,)).tolist(), [7]]
    cache = PrefixCache()
    prefill = PackedPrefill(model)
    with torch.inference_mode():
        cache.add(start, prefill([start], [PrefixMatch()]).prompt_layers[0])
        matches = [cache.longest(prompt) for prompt in prompts]
        assert [match.length for match in matches] == [9, 0, 9, 0]
        result = prefill(prompts, matches)
        width = max(map(len, prompts))
        assert result.attention_mask.tolist() == [[0] * (width - len(p)) + [1] * len(p)
                                                  for p in prompts]
        for row, prompt in enumerate(prompts):
            logits, alone = _prefill_alone(model, prompt, cache_class)
            assert_within(result.logits[row], logits, logit_bound, f"logits of prompt {row}")
            for layer, (packed, own) in enumerate(zip(result.cache.layers, alone.layers)):
                for name in ("keys", "values"):
                    mine, reference = getattr(packed, name), getattr(own, name)[0]
                    mine = mine[row, :, width - len(prompt):].float()
                    bound = chain_bound(key_lengths, float(reference.abs().max()))
                    if int8:
                        bound = bound + float16_rounding_bound(reference.abs())
                    assert_within(mine, reference, bound, f"{name} of prompt {row}, layer {layer}")
                assert packed.keys[row, :, :width - len(prompt)].eq(0).all()
                assert torch.equal(result.prompt_layers[row][layer][0],
                                   packed.keys[row, :, width - len(prompt):])
    with pytest.raises(ValueError, match="a token after its reused prefix"):
        prefill([[1, 2]], [PrefixMatch(2, cache.longest(start + [1]).cached)])


def test_generation_reuses_earlier_prompts_and_answers_as_without():
    """A conversation's next turn reuses the cached turn before it; greedy answers are the ones
    generated with nothing reused."""
    model = tiny_llama(layers=2, seed=5)
    torch.manual_seed(6)
    first = torch.randint(0, 300, (30,)).tolist()
    turns = [first, first + torch.randint(0, 300, (12,)).tolist(), torch.randint(0, 300, (8,)).tolist()]
    params = SamplingParams(6, 0.0, 1.0, 0)
    options = dict(stop_token_ids=[299], pad_token_id=0)
    fresh = [generate_token_ids(model, [turn], params, **options,
                                prefix_cache=PrefixCache(max_bytes=0))[0] for turn in turns]
    shared = PrefixCache()
    reused = [generate_token_ids(model, [turn], params, **options, prefix_cache=shared)[0]
              for turn in turns]
    assert reused == fresh
    assert shared.describe()["prompt_tokens"] == 30 + 42 + 8
    assert shared.describe()["reused_tokens"] == 30  # the second turn's first 30 tokens
    together = generate_token_ids(model, turns, params, **options, prefix_cache=PrefixCache())
    assert together == fresh

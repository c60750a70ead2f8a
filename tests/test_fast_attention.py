"""The C causal attention of packed rows (components/common/fast_attention.py) against PyTorch's
scaled_dot_product_attention on each example: outputs and the gradients of query, key and value."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from components.common import c_kernels, fast_attention, packing
from components.common.fast_attention import (fast_attention_applies,
                                              fast_attention_unavailable_reason,
                                              packed_causal_attention_fp32)
from tests.tolerances import assert_within, attention_bound, chain_bound


def _row(lengths, heads, kv_heads, dim, seed=0):
    """query [1, heads, tokens, dim] and key/value [1, kv_heads, tokens, dim], laid out as a
    transformers attention layer makes them (a transpose of [1, tokens, heads, dim])."""
    generator = torch.Generator().manual_seed(seed)
    tokens = sum(lengths)
    return [torch.randn(1, tokens, h, dim, generator=generator).transpose(1, 2).requires_grad_()
            for h in (heads, kv_heads, kv_heads)]


def _reference(query, key, value, lengths, scale=None):
    pieces = [F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale,
                                             enable_gqa=True).transpose(1, 2)
              for q, k, v in zip(query.split(lengths, 2), key.split(lengths, 2),
                                 value.split(lengths, 2))]
    return torch.cat(pieces, dim=1)


def _assert_attention_close(output, gradients, expected, expected_gradients, query, key, value,
                            tokens, scale=None):
    """Outputs within :func:`attention_bound` of the values' scale; the gradients, whose backward
    adds up the same scores, head_dim products twice (the weights' and the softmax's gradients)
    and then the positions, within that chain relative to each gradient's scale."""
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    relative = attention_bound(query, key, scale, tokens)
    assert_within(output, expected, relative * float(value.detach().abs().max()), "attention")
    backward = relative + chain_bound([query.shape[-1], query.shape[-1], tokens], 1.0)
    for name, got, want in zip("qkv", gradients or (), expected_gradients or ()):
        assert_within(got, want, backward * float(want.abs().max()), f"gradient of {name}")


@pytest.mark.c_kernels
def test_the_kernels_build_on_this_machine():
    assert fast_attention_unavailable_reason() is None


@pytest.mark.c_kernels
@pytest.mark.parametrize("lengths, heads, kv_heads, dim", [
    ([5], 2, 1, 8),  # less than a register tile
    ([1, 7, 50, 13], 4, 2, 16),  # a one-token example; grouped heads
    ([100, 61, 300], 9, 3, 64),  # SmolLM2's heads; several query blocks per example
    ([49, 48, 47, 97], 3, 3, 20),  # a dim that is not a multiple of 8; block edges
])
@pytest.mark.parametrize("threads", [1, 2])
def test_attention_and_its_gradients_match_sdpa(lengths, heads, kv_heads, dim, threads):
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        query, key, value = _row(lengths, heads, kv_heads, dim)
        grad = torch.randn(1, sum(lengths), heads, dim, generator=torch.Generator().manual_seed(1))
        output = packed_causal_attention_fp32(query, key, value, lengths)
        gradients = torch.autograd.grad(output, (query, key, value), grad)
        expected = _reference(query, key, value, lengths)
        expected_gradients = torch.autograd.grad(expected, (query, key, value), grad)
    finally:
        torch.set_num_threads(previous)
    assert output.shape == expected.shape == (1, sum(lengths), heads, dim)
    _assert_attention_close(output, gradients, expected, expected_gradients, query, key,
                            value, max(lengths))


@pytest.mark.c_kernels
def test_an_explicit_scale_is_applied():
    lengths = [30, 20]
    query, key, value = _row(lengths, 2, 1, 16)
    output = packed_causal_attention_fp32(query, key, value, lengths, scale=0.5)
    _assert_attention_close(output, None, _reference(query, key, value, lengths, scale=0.5), None,
                            query, key, value, max(lengths), scale=0.5)


def test_lengths_that_do_not_cover_the_row_are_an_error():
    query, key, value = _row([10, 10], 2, 1, 8)
    with pytest.raises(ValueError, match=r"lengths \[10, 9\] do not add up to the row's 20"):
        packed_causal_attention_fp32(query, key, value, [10, 9])


def test_it_applies_to_float32_cpu_attention_without_dropout_only():
    query, key, value = _row([8], 2, 1, 8)
    # where the kernels are refused (TUNEPIPE_C_KERNELS=off, no compiler or AVX2), never
    assert fast_attention_applies(query, key, value, 0.0) == (
        fast_attention_unavailable_reason() is None)
    assert not fast_attention_applies(query, key, value, 0.1)
    assert not fast_attention_applies(*(t.bfloat16() for t in (query, key, value)), 0.0)
    _, three_keys, three_values = _row([8], 2, 3, 8)  # 2 query heads cannot share 3 keys
    assert not fast_attention_applies(query, three_keys, three_values, 0.0)


def test_without_a_compiler_packed_attention_falls_back_to_sdpa(monkeypatch, tmp_path):
    monkeypatch.delenv(c_kernels.SWITCH_ENV, raising=False)  # the kernels' own refusal, not it
    monkeypatch.setenv("TUNEPIPE_CACHE", str(tmp_path))  # no kernel built there yet
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    c_kernels.forget_kernels()
    try:
        reason = fast_attention.fast_attention_unavailable_reason()
        assert "no-such-compiler" in reason
        monkeypatch.delenv("CC")  # a refusal is remembered: no build attempt per attention call
        assert fast_attention.fast_attention_unavailable_reason() == reason
        lengths = [12, 20]
        query, key, value = _row(lengths, 4, 2, 8)
        assert not fast_attention_applies(query, key, value, 0.0)
        output, _ = packing.packed_causal_attention(None, query, key, value, None,
                                                    packed_lengths=torch.tensor(lengths))
    finally:
        c_kernels.forget_kernels()
    _assert_attention_close(output, None, _reference(query, key, value, lengths), None, query, key,
                            value, max(lengths))


def _reference_after_prefix(query, key, value, lengths):
    """The first segment causal; every other attends to all of it, then causally to itself."""
    queries, keys, values = (t.split(lengths, 2) for t in (query, key, value))
    pieces = [F.scaled_dot_product_attention(queries[0], keys[0], values[0], is_causal=True,
                                             enable_gqa=True)]
    for q, k, v in zip(queries[1:], keys[1:], values[1:]):
        count, prefix = q.shape[2], lengths[0]
        mask = torch.arange(prefix + count)[None] <= prefix + torch.arange(count)[:, None]
        pieces.append(F.scaled_dot_product_attention(q, torch.cat([keys[0], k], 2),
                                                     torch.cat([values[0], v], 2),
                                                     attn_mask=mask, enable_gqa=True))
    return torch.cat([piece.transpose(1, 2) for piece in pieces], dim=1)


@pytest.mark.c_kernels
@pytest.mark.parametrize("lengths, heads, kv_heads, dim", [
    ([3, 1, 2], 2, 1, 8),  # segments shorter than a register tile
    ([54, 24, 30, 1, 20], 9, 3, 64),  # the sample prompts' shape: a 54-token instruction
    ([70, 49, 96], 3, 3, 20),  # prefix and rests across query blocks; dim not a multiple of 8
])
@pytest.mark.parametrize("threads", [1, 2])
def test_a_shared_prefix_is_attended_by_every_example_and_gets_all_their_gradients(
        lengths, heads, kv_heads, dim, threads):
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        query, key, value = _row(lengths, heads, kv_heads, dim, seed=2)
        grad = torch.randn(1, sum(lengths), heads, dim, generator=torch.Generator().manual_seed(3))
        output = packed_causal_attention_fp32(query, key, value, lengths, shared_prefix=True)
        gradients = torch.autograd.grad(output, (query, key, value), grad)
        expected = _reference_after_prefix(query, key, value, lengths)
        expected_gradients = torch.autograd.grad(expected, (query, key, value), grad)
    finally:
        torch.set_num_threads(previous)
    # every example attends over the prefix and itself
    tokens = lengths[0] + max(lengths[1:])
    _assert_attention_close(output, gradients, expected, expected_gradients, query, key, value,
                            tokens)
    # not the attention without the prefix: the examples' outputs do depend on it
    assert not torch.allclose(output, _reference(query, key, value, lengths), atol=1e-3)


@pytest.mark.parametrize("lengths, heads, kv_heads, dim", [
    ([3, 1, 2], 2, 1, 8), ([54, 24, 30, 1, 20], 9, 3, 64)])
def test_the_fallback_attends_to_a_shared_prefix_as_sdpa_does(lengths, heads, kv_heads, dim,
                                                              monkeypatch):
    """Packed attention's fallback (SDPA per example: bf16, CUDA, no kernels) and its
    gradients."""
    monkeypatch.setattr(packing, "fast_attention_applies", lambda *unused: False)
    query, key, value = _row(lengths, heads, kv_heads, dim, seed=2)
    grad = torch.randn(1, sum(lengths), heads, dim, generator=torch.Generator().manual_seed(3))
    output, _ = packing.packed_causal_attention(
        None, query, key, value, None, packed_lengths=torch.tensor(lengths),
        packed_shared_prefix=torch.tensor(lengths[0]))
    gradients = torch.autograd.grad(output, (query, key, value), grad)
    expected = _reference_after_prefix(query, key, value, lengths)
    expected_gradients = torch.autograd.grad(expected, (query, key, value), grad)
    _assert_attention_close(output, gradients, expected, expected_gradients, query, key, value,
                            lengths[0] + max(lengths[1:]))


@pytest.mark.c_kernels
def test_the_gradients_repeat_exactly_from_call_to_call():
    # each thread sums its blocks' key and value gradients; a resumed run must repeat an
    # uninterrupted one bit for bit, so which thread takes which block must not vary
    lengths = [54, 24, 30, 17, 20, 26, 31, 22, 25]
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        query, key, value = _row(lengths, 9, 3, 64, seed=4)
        grad = torch.randn(1, sum(lengths), 9, 64, generator=torch.Generator().manual_seed(5))
        runs = [torch.autograd.grad(packed_causal_attention_fp32(query, key, value, lengths,
                                                                 shared_prefix=True),
                                    (query, key, value), grad) for _ in range(8)]
    finally:
        torch.set_num_threads(previous)
    for run in runs[1:]:
        for name, got, first in zip("qkv", run, runs[0]):
            assert torch.equal(got, first), f"gradient of {name}"

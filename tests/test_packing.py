"""The tuner's optimized loss (packed rows, target-only logits) equals the straightforward one."""
from __future__ import annotations

from contextlib import contextmanager

import numpy as np
import pytest
import torch

from components.common.model_loading import load_base_model
from tests.reference_scoring import collate, score_dataset, score_logits
from tests.tolerances import (assert_within, chain_bound, gradient_bound, loss_sum_bound,
                              probabilistic_sum_bound, unit_roundoff)
from components.tune.acceleration import FusedLoraLinear, lora_config
from components.common import packing
from components.common.packing import (MIN_SHARED_PREFIX_TOKENS, SHORT_EXAMPLE_TOKENS,
                                       num_targets, pack_examples, packed_loss, row_groups,
                                       score_examples, score_packed, shared_prefix_length,
                                       token_loss, use_packed_attention)


def _examples(seed: int = 0, count: int = 5, vocab: int = 1000, long: bool = False,
              instruction: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """Examples of varied lengths: a prompt (mask 0) then an answer (mask 1), like transform's.
    ``long``: the second is longer than ``SHORT_EXAMPLE_TOKENS`` (the flash-attention path);
    ``instruction``: every prompt starts with the same this many tokens (one template's)."""
    rng = np.random.default_rng(seed)
    start = rng.integers(5, vocab, instruction)
    examples = []
    for number in range(count):
        prompt, answer = int(rng.integers(3, 30)), int(rng.integers(1, 12))
        if long and number == 1:
            prompt = SHORT_EXAMPLE_TOKENS + 20
        ids = rng.integers(5, vocab, prompt + answer)
        ids = np.r_[start, ids].astype(np.uint32)
        prompt += instruction
        examples.append((ids, np.r_[np.zeros(prompt), np.ones(answer)].astype(np.uint8)))
    return examples


def _lora_model(tiny_model_dir, fused: bool = True):
    """The tiny model with LoRA as the tuner builds it (fused layers) or as PEFT does."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = load_base_model(tiny_model_dir, "cpu", torch.float32)
    packs = use_packed_attention(model)
    config = lora_config(4, "all-linear") if fused else LoraConfig(
        r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0, task_type="CAUSAL_LM")
    model = get_peft_model(model, config)
    torch.manual_seed(1)
    for name, parameter in model.named_parameters():  # non-zero B: gradients reach every layer
        if "lora_B" in name:
            torch.nn.init.normal_(parameter, std=0.02)
    return model.train(), packs


def _grads(model) -> dict[str, torch.Tensor]:
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return grads


@contextmanager
def _attention(model, implementation: str):
    base = model.get_base_model()
    previous = base.config._attn_implementation
    base.set_attn_implementation(implementation)
    try:
        yield
    finally:
        base.set_attn_implementation(previous)


def _straightforward(model, examples, pad_token_id: int):
    """The reference: a right-padded batch through transformers' own SDPA attention with the
    padding mask, logits at every position, token_metrics' loss."""
    batch = collate(examples, pad_token_id)
    with _attention(model, "sdpa"):
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    loss_sum, scores = score_logits(logits, batch.labels)
    (loss_sum / scores.num_predictions).backward()
    return float(loss_sum.detach()), scores, _grads(model)


@pytest.mark.parametrize("max_tokens, long, instruction, kernel", [
    (10_000, False, 0, True),  # one packed row
    (40, False, 0, True),  # several micro-batches
    (10_000, True, 0, True),  # one example long enough for the flash-attention backward
    (10_000, False, 20, True),  # one template's prompts: their start held once in the row
    (10_000, False, 20, False),  # the same through PyTorch's attention (bf16, CUDA, no compiler)
])
def test_packed_loss_and_gradients_equal_the_straightforward_computation(
        tiny_model_dir, max_tokens, long, instruction, kernel, monkeypatch):
    model, packs = _lora_model(tiny_model_dir)
    assert packs, "the tiny Llama must use packed attention"
    if not kernel:
        monkeypatch.setattr(packing, "fast_attention_applies", lambda *unused: False)
    examples = _examples(long=long, instruction=instruction)
    expected_loss, expected_scores, expected_grads = _straightforward(model, examples, 2)

    total_targets = sum(num_targets(e) for e in examples)
    assert total_targets == expected_scores.num_predictions
    micro_batches = pack_examples(examples, max_tokens)
    assert (len(micro_batches) == 1) == (max_tokens == 10_000)
    assert [b.shared_prefix for b in micro_batches] == [instruction] * len(micro_batches)
    assert any(len(e[0]) > SHORT_EXAMPLE_TOKENS for e in examples) == long
    loss, correct = 0.0, 0
    for batch in micro_batches:
        micro_loss, micro_correct = packed_loss(model, batch)
        (micro_loss / total_targets).backward()
        loss += float(micro_loss.detach())
        correct += int(micro_correct)
    grads = _grads(model)

    # The same decoder, its sums in other orders (packed rows, the kernel's attention): the loss
    # and the gradients within the float32 bounds of its forward (and backward) over the
    # longest example (tests/tolerances.py).
    tokens, positions = max(len(ids) for ids, _ in examples), sum(len(ids) for ids, _ in examples)
    base = model.get_base_model()
    assert_within(torch.tensor(loss), torch.tensor(expected_loss),
                  loss_sum_bound(base, tokens, total_targets, expected_loss), "loss")
    assert correct == expected_scores.num_correct
    assert grads.keys() == expected_grads.keys()
    for name, grad in grads.items():
        expected = expected_grads[name]
        bound = gradient_bound(base.config, tokens, positions, float(expected.abs().max()))
        assert_within(grad, expected, bound, name)
    assert any(float(g.abs().sum()) > 0 for n, g in grads.items() if "lora_A" in n)


def test_unpacked_rows_and_xla_padding_give_the_same_loss(tiny_model_dir):
    model, _ = _lora_model(tiny_model_dir)
    examples = _examples(seed=1)
    with torch.no_grad():
        reference = sum(float(packed_loss(model, b)[0]) for b in pack_examples(examples, 10_000))
        one_per_row = pack_examples(examples, 10_000, pack=False)
        assert len(one_per_row) == len(examples) and all(b.segments is None for b in one_per_row)
        unpacked = sum(float(packed_loss(model, b)[0]) for b in one_per_row)
        padded_rows = pack_examples(examples, 10_000, pad_to_multiple=64, pad_token_id=2)
        assert all(b.input_ids.shape[1] % 64 == 0 and b.targets.shape[0] % 64 == 0 for b in padded_rows)
        padded = sum(float(packed_loss(model, b)[0]) for b in padded_rows)
    # the same sums in other orders and rows of other widths: within the forward's float32
    # bound (tests/tolerances.py) over the longest example
    bound = loss_sum_bound(model.get_base_model(), max(len(ids) for ids, _ in examples),
                           sum(num_targets(e) for e in examples), reference)
    for loss in (unpacked, padded):
        assert_within(torch.tensor(loss), torch.tensor(reference), bound, "loss")


def test_eval_scores_equal_score_dataset(tiny_model_dir):
    model, _ = _lora_model(tiny_model_dir)
    model.eval()
    examples = _examples(seed=2, count=7)
    with _attention(model, "sdpa"):
        expected = score_dataset(model, examples, pad_token_id=2, batch_size=3)
    scores = score_packed(model, examples, max_tokens=50)
    assert scores.num_predictions == expected.num_predictions
    assert scores.num_correct == expected.num_correct
    _assert_loss_sum_close(model.get_base_model(), examples, scores, expected)


def test_score_examples_is_the_padded_reference_and_restores_attention(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), attn_implementation="sdpa").eval()
    examples = _examples(seed=4, count=9)
    expected = score_dataset(model, examples, pad_token_id=2, batch_size=4)
    scores = score_examples(model, examples, max_tokens=60)
    assert model.config._attn_implementation == "sdpa"  # generation needs its own attention back
    assert (scores.num_predictions, scores.num_correct) == (expected.num_predictions, expected.num_correct)
    _assert_loss_sum_close(model, examples, scores, expected)


def _assert_loss_sum_close(model, examples, scores, expected) -> None:
    """Packed rows against padded batches: the same sums in other orders, within the forward's
    float32 bound (tests/tolerances.py) over the longest example."""
    bound = loss_sum_bound(model, max(len(ids) for ids, _ in examples), expected.num_predictions,
                           expected.loss_sum)
    assert_within(torch.tensor(scores.loss_sum), torch.tensor(expected.loss_sum), bound, "loss")


def test_packing_keeps_order_and_targets():
    examples = _examples(seed=3, count=4)
    lengths = [len(e[0]) for e in examples]
    groups = row_groups(lengths, max_tokens=max(lengths) + 1)
    assert [i for g in groups for i in g] == [0, 1, 2, 3]
    assert all(sum(lengths[i] for i in g) <= max(lengths) + 1 for g in groups)
    (batch,) = pack_examples(examples, max_tokens=10_000)
    ids = batch.input_ids[0].numpy()
    assert batch.segments[0] == (0, lengths[0]) and batch.segments[-1][1] == sum(lengths)
    assert batch.position_ids[0, lengths[0]] == 0  # positions restart at every example
    # Every target is the token after its position, and exactly the masked tokens are targets.
    assert (ids[batch.target_positions.numpy() + 1] == batch.targets.numpy()).all()
    masked = np.concatenate([e[1] for e in examples]).astype(bool)
    starts = np.cumsum([0] + lengths[:-1])
    masked[starts] = False  # an example's first token has nothing before it
    assert sorted(batch.target_positions.numpy() + 1) == list(np.flatnonzero(masked))



def _example(tokens, first_target: int) -> tuple[np.ndarray, np.ndarray]:
    """An example of ``tokens`` whose targets are its tokens from ``first_target`` on."""
    mask = np.zeros(len(tokens), np.uint8)
    mask[first_target:] = 1
    return np.asarray(tokens, np.uint32), mask


def test_a_row_holds_its_examples_common_start_once_before_the_first_target():
    start = list(range(100, 130))  # 30 tokens of one template
    examples = [_example(start + [5, 6, 7], 31), _example(start + [8, 9], 30),
                _example(start + [5, 6, 7, 1], 32)]
    # the longest start every target is predicted after: token 30 is example 1's first target,
    # predicted from position 29, which must be in every example's own part
    assert shared_prefix_length(examples) == 29
    (batch,) = pack_examples(examples, max_tokens=10_000)
    ids, positions = batch.input_ids[0].tolist(), batch.position_ids[0].tolist()
    assert batch.shared_prefix == 29 and batch.segments == [(0, 29), (29, 33), (33, 36), (36, 41)]
    assert ids == start[:29] + [129, 5, 6, 7] + [129, 8, 9] + [129, 5, 6, 7, 1]
    assert positions == list(range(29)) + [29, 30, 31, 32] + [29, 30, 31] + [29, 30, 31, 32, 33]
    # the same targets as without sharing, each predicted from its example's own part
    assert batch.targets.tolist() == [6, 7, 8, 9, 7, 1]
    assert (torch.tensor(ids)[batch.target_positions + 1] == batch.targets).all()
    assert batch.num_tokens == 41 and batch.num_targets == 6


def test_no_shared_start_under_the_minimum_for_one_example_or_without_packing():
    start = list(range(100, 100 + MIN_SHARED_PREFIX_TOKENS))
    two = [_example(start + [5, 6], len(start) + 1), _example(start + [7, 8], len(start) + 1)]
    assert shared_prefix_length(two) == MIN_SHARED_PREFIX_TOKENS
    early_target = [two[0], _example(start + [7, 8], MIN_SHARED_PREFIX_TOKENS - 1)]
    assert shared_prefix_length(early_target) == 0  # 14 tokens before that target: too few
    assert shared_prefix_length(two[:1]) == 0
    different = [two[0], _example([1] + start[1:] + [7, 8], len(start) + 1)]
    assert shared_prefix_length(different) == 0
    assert all(b.shared_prefix == 0 for b in pack_examples(two, 10_000, pack=False))
    # an example with no targets (a process's padding) still keeps a token of its own
    same = [_example(start + [5, 6], 0)[0], np.zeros(len(start) + 2, np.uint8)]
    assert shared_prefix_length([two[0], tuple(same)]) == MIN_SHARED_PREFIX_TOKENS
    assert shared_prefix_length([two[0], (np.asarray(start, np.uint32),
                                          np.zeros(len(start), np.uint8))]) == 0

def test_targets_carry_their_task_and_the_loss_sums_each_task():
    # Loss-mask values are tasks (distillation: 1 label, 2 rationale).
    examples = [(np.arange(5, 11, dtype=np.uint32), np.array([0, 0, 1, 1, 2, 2], np.uint8)),
                (np.arange(20, 24, dtype=np.uint32), np.array([0, 2, 2, 0], np.uint8))]
    assert [num_targets(e) for e in examples] == [4, 2]
    assert [num_targets(e, 2) for e in examples] == [2, 2] and num_targets(examples[1], 1) == 0
    (batch,) = pack_examples(examples, max_tokens=100, pad_to_multiple=8)
    assert batch.targets.tolist() == [7, 8, 9, 10, 21, 22, -100, -100]
    assert batch.target_tasks.tolist() == [1, 1, 2, 2, 2, 2, 0, 0]  # padding: no task
    logits = torch.randn(8, 30)
    per_task, correct = token_loss(logits, batch.targets, batch.target_tasks, (1, 2))
    total, same_correct = token_loss(logits, batch.targets)
    per_token = torch.nn.functional.cross_entropy(logits[:6], batch.targets[:6], reduction="none")
    torch.testing.assert_close(per_task, torch.stack([per_token[:2].sum(), per_token[2:].sum()]))
    torch.testing.assert_close(per_task.sum(), total)
    assert correct == same_correct


def _step(model, examples, loss=token_loss):
    """Packed loss and gradients of one step over ``examples``."""
    total_targets = sum(num_targets(e) for e in examples)
    total = 0.0
    for batch in pack_examples(examples, 10_000):
        micro_loss, _ = packed_loss(model, batch, loss)
        (micro_loss / total_targets).backward()
        total += float(micro_loss.detach())
    return total, _grads(model)


def test_fused_lora_layers_compute_what_peft_computes(tiny_model_dir):
    fused, _ = _lora_model(tiny_model_dir, fused=True)
    plain, _ = _lora_model(tiny_model_dir, fused=False)
    assert any(isinstance(m, FusedLoraLinear) for m in fused.modules())
    assert not any(isinstance(m, FusedLoraLinear) for m in plain.modules())
    assert fused.peft_config["default"].to_dict() == plain.peft_config["default"].to_dict()
    examples = _examples(seed=4)
    fused_loss, fused_grads = _step(fused, examples)
    plain_loss, plain_grads = _step(plain, examples)
    # the same products, the adapter's added inside the matrix multiplies: the decoder's sums
    # in other orders, within its float32 bounds (tests/tolerances.py)
    tokens, positions = max(len(ids) for ids, _ in examples), sum(len(ids) for ids, _ in examples)
    base = plain.get_base_model()
    targets = sum(num_targets(e) for e in examples)
    assert_within(torch.tensor(fused_loss), torch.tensor(plain_loss),
                  loss_sum_bound(base, tokens, targets, plain_loss), "loss")
    for name, grad in plain_grads.items():
        bound = gradient_bound(base.config, tokens, positions, float(grad.abs().max()))
        assert_within(fused_grads[name], grad, bound, name)


@pytest.mark.parametrize("query_block", [256, 16])  # one block; three blocks, the last short
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_short_example_attention_backward_equals_sdpa(dtype, query_block, monkeypatch):
    from components.common import packing
    from components.common.packing import _ShortCausalAttention

    monkeypatch.setattr(packing, "QUERY_BLOCK_TOKENS", query_block)
    torch.manual_seed(0)
    query = torch.randn(1, 6, 40, 16, dtype=dtype, requires_grad=True)  # 6 heads sharing 2 keys
    key = torch.randn(1, 2, 40, 16, dtype=dtype, requires_grad=True)
    value = torch.randn(1, 2, 40, 16, dtype=dtype, requires_grad=True)
    grad = torch.randn(1, 6, 40, 16, dtype=dtype)
    expected_out = torch.nn.functional.scaled_dot_product_attention(query, key, value, is_causal=True,
                                                                    enable_gqa=True)
    expected = torch.autograd.grad(expected_out, (query, key, value), grad)
    out = _ShortCausalAttention.apply(query, key, value, 16 ** -0.5)
    got = torch.autograd.grad(out, (query, key, value), grad)
    assert torch.equal(out, expected_out)  # the same CPU flash-attention kernel on the same data
    for mine, reference in zip(got, expected):
        # A gradient sums the scores' and their gradients' 16 products, then at most 40
        # positions (x 3 heads); each side rounds the result to its dtype, the two up to a step
        # apart, 2 u |value|. float32: the worst case of that chain. bfloat16 (u = 2^-8): each
        # side rounds the probabilities or score gradients to it once (k = 2), within the
        # probabilistic bound of random data (tests/tolerances.py).
        scale = float(reference.abs().max())
        step = 2 * unit_roundoff(dtype) * reference.float().abs()
        if dtype == torch.float32:
            bound = chain_bound([16, 16, 3 * 40], scale) + step
        else:
            bound = probabilistic_sum_bound(scale, roundings=2) + step
        assert_within(mine, reference, bound, "gradient")

"""The tuner's optimized loss (packed rows, target-only logits) equals the straightforward one."""
from __future__ import annotations

from contextlib import contextmanager

import numpy as np
import pytest
import torch

from components.common.model_loading import load_base_model
from tests.reference_scoring import collate, score_dataset, score_logits
from components.tune.acceleration import FusedLoraLinear, lora_config
from components.common.packing import (score_examples, SHORT_EXAMPLE_TOKENS, num_targets, pack_examples, packed_loss, row_groups,
                                     score_packed, token_loss, use_packed_attention)


def _examples(seed: int = 0, count: int = 5, vocab: int = 1000,
              long: bool = False) -> list[tuple[np.ndarray, np.ndarray]]:
    """Examples of varied lengths: a prompt (mask 0) then an answer (mask 1), like transform's.
    ``long``: the second is longer than ``SHORT_EXAMPLE_TOKENS`` (the flash-attention path)."""
    rng = np.random.default_rng(seed)
    examples = []
    for number in range(count):
        prompt, answer = int(rng.integers(3, 30)), int(rng.integers(1, 12))
        if long and number == 1:
            prompt = SHORT_EXAMPLE_TOKENS + 20
        ids = rng.integers(5, vocab, prompt + answer).astype(np.uint32)
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


@pytest.mark.parametrize("max_tokens, long", [
    (10_000, False),  # one packed row
    (40, False),  # several micro-batches
    (10_000, True),  # one example long enough for the flash-attention backward
])
def test_packed_loss_and_gradients_equal_the_straightforward_computation(tiny_model_dir, max_tokens,
                                                                       long):
    model, packs = _lora_model(tiny_model_dir)
    assert packs, "the tiny Llama must use packed attention"
    examples = _examples(long=long)
    expected_loss, expected_scores, expected_grads = _straightforward(model, examples, 2)

    total_targets = sum(num_targets(e) for e in examples)
    assert total_targets == expected_scores.num_predictions
    micro_batches = pack_examples(examples, max_tokens)
    assert (len(micro_batches) == 1) == (max_tokens == 10_000)
    assert any(len(e[0]) > SHORT_EXAMPLE_TOKENS for e in examples) == long
    loss, correct = 0.0, 0
    for batch in micro_batches:
        micro_loss, micro_correct = packed_loss(model, batch)
        (micro_loss / total_targets).backward()
        loss += float(micro_loss.detach())
        correct += int(micro_correct)
    grads = _grads(model)

    assert loss == pytest.approx(expected_loss, rel=1e-5)
    assert correct == expected_scores.num_correct
    assert grads.keys() == expected_grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected_grads[name], rtol=1e-4, atol=1e-6, msg=name)
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
    assert unpacked == pytest.approx(reference, rel=1e-5)
    assert padded == pytest.approx(reference, rel=1e-5)


def test_eval_scores_equal_score_dataset(tiny_model_dir):
    model, _ = _lora_model(tiny_model_dir)
    model.eval()
    examples = _examples(seed=2, count=7)
    with _attention(model, "sdpa"):
        expected = score_dataset(model, examples, pad_token_id=2, batch_size=3)
    scores = score_packed(model, examples, max_tokens=50)
    assert scores.num_predictions == expected.num_predictions
    assert scores.num_correct == expected.num_correct
    assert scores.loss_sum == pytest.approx(expected.loss_sum, rel=1e-5)


def test_score_examples_is_the_padded_reference_and_restores_attention(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), attn_implementation="sdpa").eval()
    examples = _examples(seed=4, count=9)
    expected = score_dataset(model, examples, pad_token_id=2, batch_size=4)
    scores = score_examples(model, examples, max_tokens=60)
    assert model.config._attn_implementation == "sdpa"  # generation needs its own attention back
    assert (scores.num_predictions, scores.num_correct) == (expected.num_predictions, expected.num_correct)
    assert scores.loss_sum == pytest.approx(expected.loss_sum, rel=1e-5)


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
    assert fused_loss == pytest.approx(plain_loss, rel=1e-6)
    for name, grad in plain_grads.items():
        torch.testing.assert_close(fused_grads[name], grad, rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.parametrize("query_block", [256, 16])  # one block; three blocks, the last short
@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
def test_short_example_attention_backward_equals_sdpa(dtype, tolerance, query_block, monkeypatch):
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
    torch.testing.assert_close(out, expected_out, rtol=tolerance, atol=tolerance)
    for mine, reference in zip(got, expected):
        scale = float(reference.abs().max())
        torch.testing.assert_close(mine.float() / scale, reference.float() / scale, rtol=tolerance,
                                   atol=tolerance)

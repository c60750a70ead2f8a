"""Padding-free batches: examples packed into rows, logits only where the loss needs them.

The one token scorer: the tuner trains and evaluates with it (:func:`packed_loss`,
:func:`score_packed`) and the evaluate component scores every model with it
(:func:`score_examples`).

The loss (``components.common.token_metrics``) is the cross-entropy of every target token
(nonzero loss mask) predicted from the tokens before it, summed over the step's global batch and
divided by the number of target tokens; a multi-task dataset's loss weighs each task's sum
(:mod:`components.tune.trainer`), for which :func:`token_loss` also sums per task (the target's
loss-mask value). This module computes exactly those sums with less work than a padded batch
through ``model(...).logits``:

- **Packing.** A micro-batch is one row: its examples concatenated, with position ids that
  restart at 0 for every example, so no padding token is ever computed. Attention stays within
  each example: the registered attention function ``tunepipe_packed`` computes causal attention
  on each example's span of the row (no block-diagonal mask over the whole row, whose cost would
  grow with the square of the row length): in float32 on an AVX2 CPU with the C kernels of
  ``components.common.fast_attention`` (the whole row in one call), else with
  ``scaled_dot_product_attention`` on each example.
- **Shared prefixes.** Examples made from one template start with the same tokens (an
  instruction, a system prompt: 54 of the 78 tokens of every sample support-intents prompt).
  When all the examples of a row start with at least ``MIN_SHARED_PREFIX_TOKENS`` common tokens
  before their first target, the row holds that start once, then the rest of each example
  (positions continuing after it): each example's tokens attend to the whole shared start, then
  to their own tokens up to themselves. Causal attention makes the start's hidden states the
  same in every example, and with no dropout (tunepipe's LoRA has none, nor has the attention
  of Llama-family models) the loss, the scores and every gradient are the ones of the full
  examples, up to float rounding (the start's gradients are summed over the examples instead of
  computed once each; with attention dropout, one mask over the start serves the whole row).
  Training and scoring then compute fewer tokens: 54 + 8 x 24 instead of 8 x 78 for a sample
  step (``benchmarks/bench_shared_prefix.py``: steps about twice as fast).
- **Target-only logits.** The LM head (hidden size x vocabulary: 576 x 49,152 for SmolLM2, a
  third of its per-token FLOPs) and the cross-entropy run only at the positions whose next
  token is a target, through the model's own ``logits_to_keep`` argument (so any logit
  processing the model applies is kept).

Each micro-batch holds at most ``max_tokens`` tokens (one longer example gets a row of its own);
a step's micro-batches accumulate gradients, which changes nothing in the sum. Models whose
attention is not plain causal attention (sliding windows, soft-capping) or that do not use
transformers' attention interface are not packed: each example gets a row of its own and the
model's own attention, still padding-free and with target-only logits.
"""
from __future__ import annotations

from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from components.common.fast_attention import fast_attention_applies, packed_causal_attention_fp32
from components.common.token_metrics import IGNORE_INDEX, TokenScores

PACKED_ATTENTION = "tunepipe_packed"
MIN_SHARED_PREFIX_TOKENS = 16  # a shorter common start of a row's examples is not stored once


@dataclass
class PackedBatch:
    """One micro-batch: a row of concatenated examples and the positions the loss is on."""

    input_ids: torch.Tensor  # [1, tokens]
    position_ids: torch.Tensor  # [1, tokens]: each example's own (0, 1, ...; after a shared prefix)
    segments: list[tuple[int, int]] | None  # (start, end) of every example; None: one example
    # (with a shared prefix the first segment is the prefix, the others the examples' rest)
    target_positions: torch.Tensor  # [n]: positions whose next token is a target
    targets: torch.Tensor  # [n]: those next tokens (IGNORE_INDEX for alignment padding)
    target_tasks: torch.Tensor  # [n]: their tasks, the loss-mask values (0 for alignment padding)
    num_tokens: int  # tokens in the row (alignment padding excluded)
    num_targets: int  # real targets
    shared_prefix: int = 0  # tokens of the row's first segment, which every other continues

    def to(self, device) -> "PackedBatch":
        return PackedBatch(self.input_ids.to(device), self.position_ids.to(device), self.segments,
                           self.target_positions.to(device), self.targets.to(device),
                           self.target_tasks.to(device), self.num_tokens, self.num_targets,
                           self.shared_prefix)


def num_targets(example: tuple[np.ndarray, np.ndarray], task: int | None = None) -> int:
    """Target tokens of one ``(token_ids, loss_mask)`` example: nonzero mask after the first
    token (only those of ``task``, a loss-mask value, when given)."""
    mask = example[1][1:]
    return int(np.count_nonzero(mask if task is None else mask == task))


def row_groups(lengths: Sequence[int], max_tokens: int, pack: bool = True) -> list[list[int]]:
    """Which examples (indices into ``lengths``) share each row: in order, a new row whenever
    the next example would take the row past ``max_tokens`` (or for every example without
    ``pack``)."""
    rows: list[list[int]] = []
    width = 0
    for index, length in enumerate(lengths):
        if not rows or not pack or width + length > max_tokens:
            rows.append([])
            width = 0
        rows[-1].append(index)
        width += length
    return rows


def pack_examples(examples: Sequence[tuple[np.ndarray, np.ndarray]], max_tokens: int,
                  pack: bool = True, pad_to_multiple: int = 0,
                  pad_token_id: int = 0) -> list[PackedBatch]:
    """Packs ``(token_ids, loss_mask)`` examples, in order, into rows of at most ``max_tokens``
    (:func:`row_groups`).

    With ``pack=False`` every example gets a row of its own. ``pad_to_multiple`` pads each row
    (with a dummy example that has no targets) and its target list (with ignored targets) to a
    multiple of that size, for compilers that want few distinct shapes (XLA).
    """
    groups = row_groups([len(example[0]) for example in examples], max_tokens, pack)
    return [_packed_row([examples[i] for i in group], pad_to_multiple, pad_token_id, single=not pack)
            for group in groups]


def shared_prefix_length(row: Sequence[tuple[np.ndarray, np.ndarray]]) -> int:
    """How many tokens at the start of every ``(token_ids, loss_mask)`` example of ``row`` a
    packed row holds once (module doc): their common start, cut before the token that predicts
    any example's first target (so every target is predicted from an example's own part) and
    leaving every example a token of its own; 0 for fewer than two examples or under
    ``MIN_SHARED_PREFIX_TOKENS``."""
    if len(row) < 2:
        return 0
    first = row[0][0]
    shared = len(first)
    for tokens, mask in row:
        span = min(len(first), len(tokens))
        differences = np.flatnonzero(first[:span] != tokens[:span])
        shared = min(shared, int(differences[0]) if differences.size else span)
        predicting = np.flatnonzero(mask[1:])  # position i predicts token i + 1
        shared = min(shared, int(predicting[0]) if predicting.size else len(tokens) - 1)
    return shared if shared >= MIN_SHARED_PREFIX_TOKENS else 0


def _packed_row(row, pad_to_multiple: int, pad_token_id: int, single: bool) -> PackedBatch:
    ids, positions, segments, target_positions, targets, tasks = [], [], [], [], [], []
    shared = 0 if single else shared_prefix_length(row)
    if shared:
        ids.append(row[0][0][:shared].astype(np.int64))
        positions.append(np.arange(shared, dtype=np.int64))
        segments.append((0, shared))
    offset = shared
    for tokens, mask in row:
        length = len(tokens)
        tokens = tokens.astype(np.int64)
        ids.append(tokens[shared:])
        positions.append(np.arange(shared, length, dtype=np.int64))
        segments.append((offset, offset + length - shared))
        predicting = np.flatnonzero(mask[1:])  # position i predicts token i + 1
        target_positions.append(predicting - shared + offset)
        targets.append(tokens[predicting + 1])
        tasks.append(mask[predicting + 1].astype(np.int64))
        offset += length - shared
    num_tokens = offset
    real_targets = int(sum(len(t) for t in targets))
    if pad_to_multiple:
        padding = -num_tokens % pad_to_multiple
        if padding:
            ids.append(np.full(padding, pad_token_id, dtype=np.int64))
            positions.append(np.arange(padding, dtype=np.int64))
            segments.append((offset, offset + padding))
        target_padding = -real_targets % pad_to_multiple if real_targets else pad_to_multiple
        target_positions.append(np.zeros(target_padding, dtype=np.int64))
        targets.append(np.full(target_padding, IGNORE_INDEX, dtype=np.int64))
        tasks.append(np.zeros(target_padding, dtype=np.int64))
    return PackedBatch(
        input_ids=torch.from_numpy(np.concatenate(ids))[None],
        position_ids=torch.from_numpy(np.concatenate(positions))[None],
        segments=None if single else segments,
        target_positions=torch.from_numpy(np.concatenate(target_positions)),
        targets=torch.from_numpy(np.concatenate(targets)),
        target_tasks=torch.from_numpy(np.concatenate(tasks)),
        num_tokens=num_tokens, num_targets=real_targets, shared_prefix=shared)


def token_loss(logits: torch.Tensor, targets: torch.Tensor,
               target_tasks: torch.Tensor | None = None,
               tasks: tuple[int, ...] = ()) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed cross-entropy of ``logits`` ([n, vocabulary]) against ``targets`` and the number of
    targets that are the argmax, ignoring ``IGNORE_INDEX`` targets.

    With ``tasks`` (loss-mask values), the summed cross-entropy is per task: a tensor whose
    element i sums the targets whose ``target_tasks`` value is ``tasks[i]``.

    The definition of ``token_metrics.score_logits``: logits cast to float32 before the
    cross-entropy and the argmax.
    """
    logits = logits.float()
    correct = ((logits.argmax(-1) == targets) & (targets != IGNORE_INDEX)).sum()
    if not tasks:
        return F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="sum"), correct
    losses = F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="none")
    task_sums = [torch.where(target_tasks == task, losses, 0.0).sum() for task in tasks]
    return torch.stack(task_sums), correct


def packed_loss(model, batch: PackedBatch, loss=token_loss,
                tasks: tuple[int, ...] = ()) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed cross-entropy over the batch's targets (a tensor, for backward; per task with
    ``tasks``) and the number of targets the model predicts correctly (argmax), as a tensor
    (:func:`token_loss`, or ``loss``: the same function compiled)."""
    extra = {}
    if batch.segments is not None:  # tensors: compiled layers do not specialise on their values
        extra["packed_lengths"] = torch.tensor([end - start for start, end in batch.segments])
        extra["packed_shared_prefix"] = torch.tensor(batch.shared_prefix)
    logits = model(input_ids=batch.input_ids, position_ids=batch.position_ids,
                   logits_to_keep=batch.target_positions, use_cache=False, **extra).logits
    return loss(logits[0], batch.targets, batch.target_tasks, tasks)


@torch.no_grad()
def score_packed(model, examples: Sequence[tuple[np.ndarray, np.ndarray]], max_tokens: int,
                 device: torch.device | str = "cpu", pack: bool = True, autocast=None,
                 pad_to_multiple: int = 0, loss=token_loss) -> TokenScores:
    """Token scores of ``model`` over ``examples`` (no gradient): ``score_dataset``'s numbers.

    ``autocast`` is a context-manager factory (e.g. bf16 autocast) entered around each forward.
    """
    total_loss, total_correct, total_targets = 0.0, 0, 0
    order = sorted(range(len(examples)), key=lambda i: len(examples[i][0]))
    for batch in pack_examples([examples[i] for i in order], max_tokens, pack, pad_to_multiple):
        batch = batch.to(device)
        with (autocast or nullcontext)():
            loss_sum, correct = packed_loss(model, batch, loss)
        total_loss += float(loss_sum)
        total_correct += int(correct)
        total_targets += batch.num_targets
    return TokenScores(total_loss, total_correct, total_targets)


SHORT_EXAMPLE_TOKENS = 640  # on CPU, examples up to this length take _ShortCausalAttention's backward
QUERY_BLOCK_TOKENS = 256  # _ShortCausalAttention's backward takes the queries this many at a time


@contextmanager
def _float32_products_of_bfloat16(enabled: bool):
    """Within it (when ``enabled``), float32 matrix products on CPU run on the bf16 units
    (oneDNN's ``fp32_precision = "bf16"``) with float32 accumulation and output. For inputs
    that are bf16 values cast to float32 this is exact up to summation order, and several times
    faster than float32 products."""
    previous = torch.backends.mkldnn.matmul.fp32_precision
    if enabled:
        torch.backends.mkldnn.matmul.fp32_precision = "bf16"
    try:
        yield
    finally:
        torch.backends.mkldnn.matmul.fp32_precision = previous


class _ShortCausalAttention(torch.autograd.Function):
    """Causal attention of one example of moderate length on CPU, for training.

    The forward is the CPU flash-attention kernel's (it also returns each row's log-sum-exp).
    The backward takes the queries in blocks of ``QUERY_BLOCK_TOKENS`` positions; a block only
    sees the keys up to its last position, which skips most of the masked upper triangle. For
    each block it recomputes the scores ``S = Q K^T`` and ``dP = dO V^T`` in float32 (from bf16
    inputs on the bf16 units: :func:`_float32_products_of_bfloat16`) and the probabilities
    ``P = exp(s S - lse)``, and applies the usual formulas (``dV = P^T dO``,
    ``dS = P (dP - rowsum(dO O))``, ``dQ = s dS K``, ``dK = s dS^T Q``, key and value gradients
    summed in float32 over the blocks) with a few batched matrix multiplies. Heads that share
    keys and values (grouped-query attention) are stacked so no key or value is copied.

    Forward and backward of SmolLM2's attention (9 heads sharing 3 keys) on 2 cores, best of 7
    interleaved runs (benchmarks/bench_tune.py's machine): 2.7 ms against the flash kernel's
    4.2 ms at 256 tokens, 4.8 against 8.3 ms at 400; the two are about even from 640 tokens
    on, hence ``SHORT_EXAMPLE_TOKENS``.
    """

    @staticmethod
    def forward(ctx, query, key, value, scale):
        output, logsumexp = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            query, key, value, 0.0, True, attn_mask=None, scale=scale)[:2]
        ctx.save_for_backward(query, key, value, output, logsumexp)
        ctx.scale = scale
        return output

    @staticmethod
    def backward(ctx, grad_output):
        query, key, value, output, logsumexp = ctx.saved_tensors
        scale, dtype = ctx.scale, query.dtype
        _, heads, length, dim = query.shape
        kv_heads = key.shape[1]
        group = heads // kv_heads  # [kv_heads, group, positions, ...]: the heads sharing a key/value
        q = query.view(kv_heads, group, length, dim)
        k, v = key.view(kv_heads, length, dim), value.view(kv_heads, length, dim)
        d_out = grad_output.to(dtype).reshape(kv_heads, group, length, dim)
        lse = logsumexp.view(kv_heads, group, length, 1)
        row_dot = (d_out.float() * output.reshape(kv_heads, group, length, dim).float()).sum(-1, keepdim=True)
        d_query = torch.empty_like(q)
        d_key = torch.zeros(kv_heads, length, dim, dtype=torch.float32, device=query.device)
        d_value = torch.zeros_like(d_key)
        for start in range(0, length, QUERY_BLOCK_TOKENS):
            end = min(start + QUERY_BLOCK_TOKENS, length)  # the block's queries see keys [0, end)
            rows = group * (end - start)
            q_block = q[:, :, start:end].reshape(kv_heads, rows, dim)
            d_out_block = d_out[:, :, start:end].reshape(kv_heads, rows, dim)
            k_seen, v_seen = k[:, :end], v[:, :end]
            with _float32_products_of_bfloat16(dtype == torch.bfloat16):
                scores = torch.bmm(q_block.float(), k_seen.float().transpose(1, 2))
                d_probabilities = torch.bmm(d_out_block.float(), v_seen.float().transpose(1, 2))
            probabilities = (scores.view(kv_heads, group, end - start, end).mul_(scale)
                             .sub_(lse[:, :, start:end]).exp_().tril_(diagonal=start)
                             .view(kv_heads, rows, end))
            d_value[:, :end] += torch.bmm(probabilities.to(dtype).transpose(1, 2), d_out_block).float()
            d_scores = (d_probabilities.view(kv_heads, group, end - start, end)
                        .sub_(row_dot[:, :, start:end]).view(kv_heads, rows, end)
                        .mul_(probabilities).to(dtype))
            d_query[:, :, start:end] = torch.bmm(d_scores, k_seen).view(kv_heads, group, end - start, dim)
            d_key[:, :end] += torch.bmm(d_scores.transpose(1, 2), q_block).float()
        return (d_query.mul_(scale).view_as(query), d_key.mul_(scale).to(dtype).view_as(key),
                d_value.to(dtype).view_as(value), None)


def causal_mask_after(reused: int, count: int, device: torch.device) -> torch.Tensor | None:
    """The attention mask of ``count`` new tokens after ``reused`` earlier ones: each sees the
    earlier tokens and the new ones up to itself (None where that is plain causal)."""
    if not reused:
        return None
    return (torch.arange(reused + count, device=device)[None]
            <= reused + torch.arange(count, device=device)[:, None])


def _attention_after_prefix(prefix_key, prefix_value, query, key, value, dropout: float,
                            scale: float | None):
    """Attention of the rest of an example that continues a shared prefix: each token sees
    the whole prefix, then its own tokens up to itself."""
    return F.scaled_dot_product_attention(
        query, torch.cat([prefix_key, key], 2), torch.cat([prefix_value, value], 2),
        attn_mask=causal_mask_after(prefix_key.shape[2], query.shape[2], query.device),
        dropout_p=dropout, scale=scale, enable_gqa=query.shape[1] != key.shape[1])


def _causal_attention(query, key, value, dropout: float, scale: float | None):
    """Causal attention of one example: ``_ShortCausalAttention`` up to ``SHORT_EXAMPLE_TOKENS``
    on CPU when training in bf16, else ``scaled_dot_product_attention`` (in float32 its backward
    is the faster one: 29 against 38 ms at 334 tokens, 78 against 113 ms at 600, SmolLM2's 9
    heads on an AVX2 CPU)."""
    if (query.device.type == "cpu" and query.dtype == torch.bfloat16
            and query.shape[2] <= SHORT_EXAMPLE_TOKENS and dropout == 0.0
            and torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value))):
        scale = scale if scale is not None else query.shape[-1] ** -0.5
        return _ShortCausalAttention.apply(query, key, value, scale)
    return F.scaled_dot_product_attention(query, key, value, dropout_p=dropout, is_causal=True,
                                          scale=scale, enable_gqa=query.shape[1] != key.shape[1])


@torch.compiler.disable  # a Python loop over examples: outside compiled decoder layers
def packed_causal_attention(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                            attention_mask, dropout: float = 0.0, scaling: float | None = None,
                            packed_lengths: torch.Tensor | None = None,
                            packed_shared_prefix: torch.Tensor | None = None, **kwargs):
    """Causal attention within each example of a packed row (transformers' attention interface).

    ``query`` is ``[1, heads, tokens, head_dim]``, ``key``/``value`` may have fewer (grouped)
    heads; ``packed_lengths`` are the lengths of the row's segments, in order (none: the row is
    one example); a nonzero ``packed_shared_prefix`` makes the first segment a prefix that every
    other continues (module doc). Returns ``([1, tokens, heads, head_dim], None)``.
    """
    lengths = packed_lengths.tolist() if packed_lengths is not None else [query.shape[2]]
    shared = packed_shared_prefix is not None and bool(packed_shared_prefix)
    if fast_attention_applies(query, key, value, dropout):
        return packed_causal_attention_fp32(query, key, value, lengths, scaling, shared), None
    if len(lengths) == 1:
        output = _causal_attention(query, key, value, dropout, scaling)
        return output.transpose(1, 2).contiguous(), None
    # split, not slicing: a slice's backward writes its gradient into a zero tensor of the whole
    # row, once per example; split's backward concatenates the pieces once.
    queries, keys, values = (t.split(lengths, dim=2) for t in (query, key, value))
    pieces = [_causal_attention(queries[0], keys[0], values[0], dropout, scaling)]
    pieces += [_attention_after_prefix(keys[0], values[0], q, k, v, dropout, scaling) if shared
               else _causal_attention(q, k, v, dropout, scaling)
               for q, k, v in zip(queries[1:], keys[1:], values[1:])]
    return torch.cat([piece.transpose(1, 2) for piece in pieces], dim=1), None


def supports_packing(model) -> bool:
    """Whether ``tunepipe_packed`` attention computes this model's attention exactly.

    It does for decoder-only models with plain causal softmax attention through transformers'
    attention interface (Llama, SmolLM, Qwen2, Mistral without a sliding window, ...).
    """
    config = model.config
    return (bool(getattr(model, "_supports_attention_backend", False))
            and not getattr(config, "sliding_window", None)
            and not getattr(config, "attn_logit_softcapping", None)
            and not getattr(config, "is_encoder_decoder", False))


@contextmanager
def packed_attention(model):
    """Within it, ``model`` uses ``tunepipe_packed`` attention where it supports it (yields
    whether it does); its own attention is restored after (generation needs it)."""
    previous = model.config._attn_implementation
    packs = use_packed_attention(model)
    try:
        yield packs
    finally:
        if packs:
            model.set_attn_implementation(previous)


@torch.no_grad()
def score_examples(model, examples: Sequence[tuple[np.ndarray, np.ndarray]],
                   max_tokens: int = 4096) -> TokenScores:
    """Token scores of a model in eval mode over ``(token_ids, loss_mask)`` examples: packed
    rows where the model supports it, on the model's device, in the model's dtype."""
    with packed_attention(model) as packs:
        return score_packed(model, examples, max_tokens, next(model.parameters()).device, packs)


def use_packed_attention(model) -> bool:
    """Switches ``model`` (a transformers model) to ``tunepipe_packed`` attention when it
    supports it; returns whether it did."""
    if not supports_packing(model):
        return False
    from transformers import AttentionInterface

    AttentionInterface.register(PACKED_ATTENTION, packed_causal_attention)
    model.set_attn_implementation(PACKED_ATTENTION)
    return True

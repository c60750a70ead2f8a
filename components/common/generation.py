"""Batched text generation with a KV cache: one implementation for evaluate and the endpoint.

``generate(model, tokenizer, prompts, max_output_tokens, ...)`` answers many prompts at once:

- prompts are tokenized (``prompt_token_ids``), sorted by length and cut into batches of at most
  ``batch_size`` rows and ``max_batch_tokens`` padded prompt tokens, so rows of a batch have
  similar lengths and little padding;
- each batch is prefilled into a ``DynamicCache``, then decodes one token per step for every
  unfinished row. Llama-architecture models prefill the batch's prompts packed into one
  sequence, each after the longest start it shares with a prompt prefilled before (the chat
  template's system turn, shared instructions, earlier turns of a conversation:
  ``components.common.packed_prefill``, ``components.common.prefix_cache``). Other models run
  the prompts' common token prefix once, copy its cache to every row, then the rest of every
  prompt left padded after the prefix (padding masked out). Rows of the cache are left padded
  to the longest, and position ids count real tokens only, so a row computes what it would
  alone;
- a row stops at an end-of-turn id (``prompts.end_of_turn_token_ids``; not part of the output)
  or after ``max_output_tokens`` tokens; finished rows are dropped from the batch (and from the
  cache) at once, and when half the rows are free the next prompts are prefilled and merged in
  (caches left padded to a common length), so the batch stays full instead of decoding a long
  tail of a few long answers;
- decode steps of Llama-architecture models skip most of transformers' per-step work
  (``components.common.fast_decode``); other models step through their own forward;
- the batch is a ``DecodeBatch``: rows join it (prefilled, then merged in) and leave it between
  decode steps, each with its own ``RowSampling`` (parameters and generator); the endpoint
  server runs its requests on one too, joining them as they arrive (continuous batching);
- ``temperature == 0`` is greedy decoding (argmax), deterministic. In float32 it gives the same
  outputs as generating one prompt at a time, except where two logits tie to within rounding
  (padding changes matrix shapes, hence the order of float additions).

Sampling follows Vertex AI's parameter semantics (temperature, maxOutputTokens, topP, topK): the
candidates are the ``top_k`` most probable tokens (0 or None: all), then the smallest set of them
whose probability reaches ``top_p`` (under the model's own distribution), and the token is drawn
from those with probabilities ``softmax(logits / temperature)``. Draws come from one
``torch.Generator`` seeded with ``seed`` (per request, in a ``DecodeBatch``): the same call gives
the same answers.

Prompts longer than the model's context keep their last ``context - max_output_tokens`` tokens.
"""
from __future__ import annotations

import inspect
import math
from collections import deque
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F

from components.common.fast_decode import FastDecodeStep, supports_fast_decode, swap_remove_order
from components.common.packed_prefill import PackedPrefill
from components.common.prefix_cache import PrefixCache

DEFAULT_BATCH_SIZE = 32
DEFAULT_MAX_BATCH_TOKENS = 16384  # rows x longest prompt in a batch (prefill activations)
MIN_SHARED_PREFIX = 4  # tokens; a shorter common prefix is not worth a separate forward
MAX_OUTPUT_TOKENS_LIMIT = 1024  # Vertex's text models answer with at most 1024 tokens
FINISH_STOP = "stop"  # an end-of-turn token
FINISH_LENGTH = "length"  # max_output_tokens reached


@dataclass(frozen=True)
class SamplingParams:
    """Decoding settings, validated; ``from_vertex`` reads Vertex's parameter names.

    The defaults are the neutral ones (greedy, no filtering); Vertex's own per-model defaults
    for an endpoint are the endpoint's to choose.
    """

    max_output_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int | None = 0

    def __post_init__(self) -> None:
        problems = []
        if not isinstance(self.max_output_tokens, int) or self.max_output_tokens < 1:
            problems.append(f"maxOutputTokens must be a positive integer, got {self.max_output_tokens!r}")
        if not (isinstance(self.temperature, (int, float)) and math.isfinite(self.temperature)
                and self.temperature >= 0):
            problems.append(f"temperature must be a number >= 0, got {self.temperature!r}")
        if not (isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1):
            problems.append(f"topP must be in (0, 1], got {self.top_p!r}")
        if self.top_k is not None and (not isinstance(self.top_k, int) or self.top_k < 0):
            problems.append(f"topK must be an integer >= 0 (0: no top-k filter), got {self.top_k!r}")
        if problems:
            raise ValueError("; ".join(problems))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @classmethod
    def from_vertex(cls, parameters: Mapping[str, Any], default_max_output_tokens: int) -> "SamplingParams":
        """From a Vertex ``parameters`` object: ``temperature``, ``maxOutputTokens``, ``topP``, ``topK``.

        Missing keys take the defaults above (``default_max_output_tokens`` for maxOutputTokens);
        unknown keys raise ``ValueError`` naming them.
        """
        known = {"temperature", "maxOutputTokens", "topP", "topK"}
        unknown = sorted(set(parameters) - known)
        if unknown:
            raise ValueError(f"unknown generation parameter(s) {', '.join(unknown)}; "
                             f"known: {', '.join(sorted(known))}")
        top_k = parameters.get("topK", 0)
        return cls(
            max_output_tokens=_as_int(parameters.get("maxOutputTokens", default_max_output_tokens),
                                      "maxOutputTokens"),
            temperature=float(parameters.get("temperature", 0.0)),
            top_p=float(parameters.get("topP", 1.0)),
            top_k=None if top_k is None else _as_int(top_k, "topK"),
        )


def _as_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    try:
        number = float(value)
    except ValueError:
        raise ValueError(f"{name} must be an integer, got {value!r}") from None
    if not number.is_integer():
        raise ValueError(f"{name} must be an integer, got {value!r}")
    return int(number)


@dataclass
class Generation:
    """One answer: its text, its token ids (end-of-turn token excluded) and why it ended."""

    text: str
    token_ids: list[int]
    finish_reason: str  # FINISH_STOP or FINISH_LENGTH
    prompt_tokens: int


def prompt_token_ids(tokenizer, prompt: str) -> list[int]:
    """Token ids of a formatted prompt (``prompts.format_prompt``), tokenized as transform
    tokenizes training prompts: ``add_special_tokens=False`` (the chat template writes them)."""
    return list(tokenizer(prompt, add_special_tokens=False)["input_ids"])


def plan_batches(lengths: Sequence[int], batch_size: int = DEFAULT_BATCH_SIZE,
                 max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS) -> list[list[int]]:
    """Indices of ``lengths`` grouped into batches: sorted by length (longest first), each batch
    at most ``batch_size`` rows and ``rows x longest <= max_batch_tokens`` (always >= 1 row)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches: list[list[int]] = []
    current: list[int] = []
    for index in order:
        longest = lengths[current[0]] if current else lengths[index]
        if current and (len(current) >= batch_size or (len(current) + 1) * longest > max_batch_tokens):
            batches.append(current)
            current = []
        current.append(index)
    if current:
        batches.append(current)
    return batches


def generate(model, tokenizer, prompts: Sequence[str], max_output_tokens: int,
             temperature: float = 0.0, top_p: float = 1.0, top_k: int | None = 0,
             batch_size: int = DEFAULT_BATCH_SIZE, seed: int = 0, *,
             max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS,
             stop_token_ids: Sequence[int] | None = None) -> list[str]:
    """The answers to ``prompts`` (formatted prompt texts), in order; see the module doc."""
    return [g.text for g in generate_detailed(
        model, tokenizer, prompts, SamplingParams(max_output_tokens, temperature, top_p, top_k),
        batch_size=batch_size, seed=seed, max_batch_tokens=max_batch_tokens,
        stop_token_ids=stop_token_ids)]


def generate_detailed(model, tokenizer, prompts: Sequence[str], params: SamplingParams, *,
                      batch_size: int = DEFAULT_BATCH_SIZE, seed: int = 0,
                      max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS,
                      stop_token_ids: Sequence[int] | None = None) -> list[Generation]:
    """Like ``generate`` with token ids, finish reasons and prompt lengths."""
    stops, pad_id = stop_and_pad_token_ids(tokenizer, stop_token_ids)
    encoded = [prompt_token_ids(tokenizer, p) for p in prompts]
    outputs = generate_token_ids(model, encoded, params, stop_token_ids=stops, pad_token_id=pad_id,
                                 batch_size=batch_size, seed=seed, max_batch_tokens=max_batch_tokens)
    return [decoded_generation(tokenizer, prompt, output)
            for prompt, output in zip(encoded, outputs)]


def stop_and_pad_token_ids(tokenizer, stop_token_ids: Sequence[int] | None = None
                           ) -> tuple[list[int], int]:
    """The ids a row stops at (``stop_token_ids``, else the end-of-turn ids) and pads with."""
    from components.common.prompts import end_of_turn_token_ids

    stops = list(stop_token_ids) if stop_token_ids is not None else end_of_turn_token_ids(tokenizer)
    pad_id = tokenizer.pad_token_id
    if pad_id is None:
        pad_id = stops[0] if stops else 0
    return stops, pad_id


def decoded_generation(tokenizer, prompt: Sequence[int],
                       output: tuple[list[int], str]) -> Generation:
    """The ``Generation`` of a tokenized prompt's ``(output token ids, finish reason)``."""
    ids, reason = output
    return Generation(tokenizer.decode(ids, skip_special_tokens=True), ids, reason, len(prompt))


@torch.no_grad()
def generate_token_ids(model, prompts: Sequence[Sequence[int]], params: SamplingParams, *,
                       stop_token_ids: Sequence[int], pad_token_id: int,
                       batch_size: int = DEFAULT_BATCH_SIZE, seed: int = 0,
                       max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS,
                       prefix_cache: PrefixCache | None = None) -> list[tuple[list[int], str]]:
    """``(output token ids, finish reason)`` for every tokenized prompt, in order;
    ``prefix_cache``: as ``DecodeBatch`` takes it."""
    batch = DecodeBatch(model, stop_token_ids, pad_token_id, prefix_cache)
    prompts = batch.fit_to_context(prompts, params.max_output_tokens)
    sampling = batch.sampling(params, seed)
    queue = deque(plan_batches([len(p) for p in prompts], batch_size, max_batch_tokens))
    while queue or batch.rows:
        group = queue[0] if queue else []
        longest = max((len(prompts[i]) for i in group), default=0)
        # Refill when half the rows are free: fill the free rows, the rest of the group waits.
        if group and (not batch.rows or (2 * batch.rows <= batch_size and batch.can_join(
                min(len(group), batch_size - batch.rows), longest, batch_size, max_batch_tokens))):
            queue.popleft()
            free = batch_size - batch.rows
            if free < len(group):
                queue.appendleft(group[free:])
                group = group[:free]
            batch.join([prompts[i] for i in group], group, [sampling] * len(group))
        else:
            batch.step()
    return [batch.result(i) for i in range(len(prompts))]


@dataclass(frozen=True)
class RowSampling:
    """How a row chooses its tokens: its request's parameters and random generator (rows of one
    request share both, and draw together)."""

    params: SamplingParams
    generator: torch.Generator | None


class DecodeBatch:
    """One batch decoded a token per step, which rows join and leave between steps.

    Rows join in groups (``join``: their prompts prefilled, then merged into the running batch,
    caches left padded to a common length) and leave when they finish (an end-of-turn token, or
    their own ``max_output_tokens``); each row samples with its own ``RowSampling``. Where the
    model's cache is not a plain key/value cache, rows join only an empty batch (``can_join``).
    ``generate_token_ids`` runs its planned batches on it; the endpoint server its requests.
    """

    def __init__(self, model, stop_token_ids: Sequence[int], pad_token_id: int,
                 prefix_cache: PrefixCache | None = None):
        """``prefix_cache``: where prefills of Llama-architecture models find and leave prompts'
        keys and values (``components.common.prefix_cache``; default: one of this batch's own)."""
        self.device = _model_device(model)
        self.context = _context_length(model)
        self.prefix_cache = prefix_cache if prefix_cache is not None else PrefixCache()
        self._decoder = _Decoder(model, stop_token_ids, pad_token_id, self.device,
                                 self.prefix_cache)
        self._running: _Running | None = None

    @property
    def rows(self) -> int:
        """How many rows are being decoded (safe to read from another thread)."""
        running = self._running
        return len(running.rows) if running is not None else 0

    def sampling(self, params: SamplingParams, seed: int = 0) -> RowSampling:
        """The sampling of a request's rows: greedy, or seeded draws from their own generator."""
        generator = None if params.greedy else torch.Generator(device=self.device).manual_seed(seed)
        return RowSampling(params, generator)

    def fit_to_context(self, prompts: Sequence[Sequence[int]],
                       max_output_tokens: int) -> list[list[int]]:
        """The prompts cut to their last ``context - max_output_tokens`` tokens; ValueError when
        ``max_output_tokens`` does not fit the context or a prompt is empty."""
        keep = None
        if self.context is not None:
            if max_output_tokens >= self.context:
                raise ValueError(f"maxOutputTokens {max_output_tokens} does not fit the model's "
                                 f"context of {self.context} tokens")
            keep = self.context - max_output_tokens
        for index, prompt in enumerate(prompts):
            if not prompt:
                raise ValueError(f"prompt {index} is empty (no tokens)")
        return [list(p)[-keep:] if keep is not None and len(p) > keep else list(p)
                for p in prompts]

    def can_join(self, count: int, longest: int, max_rows: int, max_batch_tokens: int) -> bool:
        """Whether ``count`` prompts, the longest ``longest`` tokens, fit in one ``join`` now: at
        most ``max_rows`` rows and ``rows x cache length <= max_batch_tokens`` after, and a
        running batch they can be merged into. (Whether an empty batch takes a group that does
        not fit is the caller's choice.)"""
        rows = self.rows + count
        if self._running is None:
            return rows <= max_rows and rows * longest <= max_batch_tokens
        width = max(self._running.attention_mask.shape[1], longest)
        return (rows <= max_rows and rows * width <= max_batch_tokens
                and self._decoder.can_merge(self._running))

    @torch.no_grad()
    def join(self, prompts: list[list[int]], rows: list[int],
             samplings: list[RowSampling]) -> None:
        """Prefills ``prompts`` (fitted to the context) together, as rows ``rows`` (ids unique
        among the batch's rows, running or with results not yet taken) sampling as
        ``samplings`` say, and merges them in."""
        fresh = self._decoder.prefill(prompts, rows, samplings)
        running = self._running
        self._running = fresh if running is None else self._decoder.merge(running, fresh)

    @torch.no_grad()
    def step(self) -> None:
        """One decode step: every running row gets its next token."""
        if self._running is not None:
            self._running = self._decoder.step(self._running)

    def finished(self) -> list[int]:
        """The rows that finished since the last call, in the order they did."""
        done, self._decoder.finished = self._decoder.finished, []
        return done

    def tokens(self, row: int) -> list[int]:
        """The tokens row ``row`` chose so far (running, or finished and not yet handed over)."""
        return self._decoder.outputs[row]

    def stop(self, rows: Sequence[int]) -> None:
        """Running rows ``rows`` finish at the next step, as rows that reached their
        ``max_output_tokens`` do (from any thread)."""
        self._decoder.stopping.update(row for row in rows if row in self._decoder.outputs)

    def result(self, row: int) -> tuple[list[int], str]:
        """A finished row's ``(output token ids, finish reason)``, handed over once."""
        return self._decoder.outputs.pop(row), self._decoder.reasons.pop(row)

    def clear(self) -> None:
        """Drops every row, running or finished (after a failed step)."""
        self._running = None
        self._decoder = _Decoder(self._decoder.model, self._decoder.stop_token_ids,
                                 self._decoder.pad_token_id, self.device, self.prefix_cache)


@dataclass
class _Running:
    """The rows being decoded: their cache, the mask over its columns (exactly), the position
    and the pending input token (the last one chosen) of each row, each row's id and sampling."""

    cache: Any
    attention_mask: torch.Tensor  # [rows, cache length]
    next_position: torch.Tensor  # [rows]
    tokens: torch.Tensor  # [rows]
    rows: list[int]
    samplings: list[RowSampling]


class _Decoder:
    """Prefill, decode steps and merges for ``DecodeBatch``."""

    def __init__(self, model, stop_token_ids: Sequence[int], pad_token_id: int,
                 device: torch.device, prefix_cache: PrefixCache):
        self.model = model
        self.stop_token_ids = list(stop_token_ids)
        self.pad_token_id = pad_token_id
        self.device = device
        self.prefix_cache = prefix_cache
        self.cache_argument = _cache_argument_name(model)
        fast = supports_fast_decode(model)
        self.fast_step = FastDecodeStep(model) if fast else None
        self.packed_prefill = PackedPrefill(model) if fast else None
        self.stops = torch.tensor(sorted(set(stop_token_ids)), dtype=torch.long, device=device)
        self.outputs: dict[int, list[int]] = {}
        self.reasons: dict[int, str] = {}
        self.finished: list[int] = []
        self.stopping: set[int] = set()  # rows to finish at the next step (DecodeBatch.stop)
        self.mergeable = True  # until a cache turns out not to be a plain key/value cache

    def _forward(self, input_ids, attention_mask, position_ids, cache, logits_to_keep: int = 0):
        return self.model(input_ids=input_ids, attention_mask=attention_mask,
                          position_ids=position_ids, use_cache=True, logits_to_keep=logits_to_keep,
                          **{self.cache_argument: cache}).logits[:, -1, :]

    def prefill(self, prompts: list[list[int]], rows: list[int],
                samplings: list[RowSampling]) -> _Running | None:
        """Runs a group of prompts and chooses each one's first token."""
        for row in rows:
            self.outputs[row] = []
            self.reasons[row] = FINISH_LENGTH
        prefill = self._prefill_packed if self.packed_prefill else self._prefill_padded
        cache, attention_mask, logits = prefill(prompts)
        state = _Running(cache, attention_mask, attention_mask.sum(-1),
                         torch.zeros(len(prompts), dtype=torch.long, device=self.device),
                         list(rows), list(samplings))
        return self._choose(state, logits)

    def _prefill_packed(self, prompts: list[list[int]]):
        """Prompts packed into one sequence (``components.common.packed_prefill``), each after
        the longest start it shares with a prompt in the prefix cache; a start common to the
        whole group and not cached yet is prefilled first, once, and cached."""
        cache = self.prefix_cache
        matches = [cache.longest(prompt) for prompt in prompts]
        shared = common_prefix_length(prompts) if len(prompts) > 1 else 0
        if shared >= MIN_SHARED_PREFIX and min(match.length for match in matches) < shared:
            start = prompts[0][:shared]
            cache.add(start, self.packed_prefill([start], [cache.longest(start)]).prompt_layers[0])
            matches = [cache.longest(prompt) for prompt in prompts]
        result = self.packed_prefill(prompts, matches)
        for prompt, match, layers in zip(prompts, matches, result.prompt_layers):
            cache.record(len(prompt), match.length)
            cache.add(prompt, layers)
        return result.cache, result.attention_mask, result.logits

    def _prefill_padded(self, prompts: list[list[int]]):
        """Prompts through the model's forward: their common prefix (the chat template's system
        turn, shared instructions) once, its cache copied to every row, then the rest of each
        prompt left padded after it: row = [prefix][padding][rest], positions counting real
        tokens only."""
        from transformers import DynamicCache

        count = len(prompts)
        cache = DynamicCache(config=self.model.config)
        shared = common_prefix_length(prompts) if count > 1 else 0
        if shared < MIN_SHARED_PREFIX:
            shared = 0
        if shared:
            prefix = torch.tensor([prompts[0][:shared]], dtype=torch.long, device=self.device)
            self._forward(prefix, torch.ones_like(prefix),
                          torch.arange(shared, device=self.device)[None], cache, logits_to_keep=1)
            cache.batch_repeat_interleave(count)
        width = max(len(p) for p in prompts) - shared
        input_ids = torch.full((count, width), self.pad_token_id, dtype=torch.long)
        rest_mask = torch.zeros((count, width), dtype=torch.long)
        for row, prompt in enumerate(prompts):
            rest = prompt[shared:]
            input_ids[row, width - len(rest):] = torch.tensor(rest, dtype=torch.long)
            rest_mask[row, width - len(rest):] = 1
        input_ids, rest_mask = input_ids.to(self.device), rest_mask.to(self.device)
        attention_mask = torch.cat([rest_mask.new_ones((count, shared)), rest_mask], dim=-1)
        position_ids = shared + (rest_mask.cumsum(-1) - 1).clamp(min=0)
        logits = self._forward(input_ids, attention_mask, position_ids, cache, logits_to_keep=1)
        return cache, attention_mask, logits

    def step(self, state: _Running) -> _Running | None:
        """Feeds every row its pending token and chooses the next one."""
        state.attention_mask = torch.cat(
            [state.attention_mask, state.attention_mask.new_ones((len(state.rows), 1))], dim=-1)
        step = (self.fast_step if self.fast_step and _key_value_layers(state.cache) is not None
                else self._forward)
        logits = step(state.tokens[:, None], state.attention_mask, state.next_position[:, None],
                      state.cache)
        state.next_position = state.next_position + 1
        return self._choose(state, logits)

    def _choose(self, state: _Running, logits: torch.Tensor) -> _Running | None:
        """Chooses each row's next token, records it, and drops finished rows (None: all done)."""
        tokens = _sampled_tokens(logits.float(), state.samplings)
        is_stop = torch.isin(tokens, self.stops)
        running = []
        for position, (row, token, stop, sampling) in enumerate(
                zip(state.rows, tokens.tolist(), is_stop.tolist(), state.samplings)):
            if stop:
                self.reasons[row] = FINISH_STOP
                self.stopping.discard(row)
                self.finished.append(row)
                continue
            self.outputs[row].append(token)
            if len(self.outputs[row]) < sampling.params.max_output_tokens and \
                    row not in self.stopping:
                running.append(position)
            else:
                self.stopping.discard(row)
                self.finished.append(row)
        if not running:
            return None
        state.tokens = tokens
        if len(running) < len(state.rows):
            order = swap_remove_order(running, len(state.rows))
            kept = torch.tensor(order, dtype=torch.long, device=self.device)
            if not (self.fast_step and self.fast_step.keep_rows(state.cache, order)):
                state.cache.batch_select_indices(kept)
            state.attention_mask = state.attention_mask[kept]
            state.next_position = state.next_position[kept]
            state.tokens = tokens[kept]
            state.rows = [state.rows[i] for i in order]
            state.samplings = [state.samplings[i] for i in order]
        return state

    def can_merge(self, state: _Running) -> bool:
        """Whether rows can be merged into ``state``: its cache is a plain key/value cache."""
        if self.mergeable and _key_value_layers(state.cache) is None:
            self.mergeable = False
        return self.mergeable

    def merge(self, state: _Running, fresh: _Running | None) -> _Running:
        """One batch of both: caches and masks left padded to the longer, stacked (in place, in
        the decode step's buffers, where they have room)."""
        if fresh is None:
            return state
        width = max(state.attention_mask.shape[1], fresh.attention_mask.shape[1])
        if self.fast_step and self.fast_step.append_rows(state.cache, fresh.cache):
            fresh.attention_mask = F.pad(fresh.attention_mask,
                                         (width - fresh.attention_mask.shape[1], 0))
        else:
            for part in (state, fresh):
                missing = width - part.attention_mask.shape[1]
                if missing:
                    for layer in _key_value_layers(part.cache):
                        layer.keys = F.pad(layer.keys, (0, 0, missing, 0))
                        layer.values = F.pad(layer.values, (0, 0, missing, 0))
                    part.attention_mask = F.pad(part.attention_mask, (missing, 0))
            for mine, theirs in zip(_key_value_layers(state.cache),
                                    _key_value_layers(fresh.cache)):
                mine.keys = torch.cat([mine.keys, theirs.keys], dim=0)
                mine.values = torch.cat([mine.values, theirs.values], dim=0)
        return _Running(state.cache, torch.cat([state.attention_mask, fresh.attention_mask]),
                        torch.cat([state.next_position, fresh.next_position]),
                        torch.cat([state.tokens, fresh.tokens]), state.rows + fresh.rows,
                        state.samplings + fresh.samplings)


def _key_value_layers(cache) -> list | None:
    """The layers of a cache made of plain ``[batch, heads, length, dim]`` key/value tensors
    (transformers' DynamicCache), or None for any other kind (then batches are not merged)."""
    layers = getattr(cache, "layers", None)
    if not layers:
        return None
    for layer in layers:
        keys, values = getattr(layer, "keys", None), getattr(layer, "values", None)
        if not (isinstance(keys, torch.Tensor) and isinstance(values, torch.Tensor)
                and keys.dim() == 4 and values.dim() == 4 and keys.shape[:3] == values.shape[:3]):
            return None
    return layers


def common_prefix_length(prompts: Sequence[Sequence[int]]) -> int:
    """Length of the token prefix every prompt starts with, leaving each at least one token."""
    shortest = min(len(p) for p in prompts)
    length = 0
    first = prompts[0]
    while length < shortest - 1 and all(p[length] == first[length] for p in prompts):
        length += 1
    return length


def _sampled_tokens(logits: torch.Tensor, samplings: list[RowSampling]) -> torch.Tensor:
    """One token per row, each row chosen as its own sampling says; rows sharing a sampling
    (one request's) draw together, in batch order."""
    if all(sampling.params.greedy for sampling in samplings):
        return logits.argmax(-1)
    groups: dict[int, list[int]] = {}
    for position, sampling in enumerate(samplings):
        groups.setdefault(id(sampling), []).append(position)
    if len(groups) == 1:
        return _next_tokens(logits, samplings[0].params, samplings[0].generator)
    tokens = torch.empty(len(samplings), dtype=torch.long, device=logits.device)
    for positions in groups.values():
        index = torch.tensor(positions, device=logits.device)
        sampling = samplings[positions[0]]
        tokens[index] = _next_tokens(logits[index], sampling.params, sampling.generator)
    return tokens


def _next_tokens(logits: torch.Tensor, params: SamplingParams,
                 generator: torch.Generator | None) -> torch.Tensor:
    """One token per row: argmax when greedy, else Vertex-style top-k, top-p, temperature."""
    if params.greedy:
        return logits.argmax(-1)
    candidates = torch.ones_like(logits, dtype=torch.bool)
    if params.top_k and params.top_k < logits.size(-1):
        threshold = torch.topk(logits, params.top_k, dim=-1).values[:, -1:]
        candidates &= logits >= threshold
    if params.top_p < 1.0:
        probs = torch.softmax(logits.masked_fill(~candidates, float("-inf")), dim=-1)
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        mass_before = sorted_probs.cumsum(-1) - sorted_probs
        drop_sorted = mass_before >= params.top_p  # the first token is always kept
        candidates &= ~drop_sorted.scatter(-1, order, drop_sorted)
    scaled = (logits / params.temperature).masked_fill(~candidates, float("-inf"))
    return torch.multinomial(torch.softmax(scaled, dim=-1), 1, generator=generator).squeeze(-1)


def _model_device(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:  # pragma: no cover - a model always has parameters
        return torch.device("cpu")


def _context_length(model) -> int | None:
    config = getattr(model, "config", None)
    text_config = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    value = getattr(text_config, "max_position_embeddings", None)
    return int(value) if value else None


def _cache_argument_name(model) -> str:
    """``cache`` (transformers >= 5.x) or ``past_key_values`` (older), for this model's forward."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    parameters = inspect.signature(type(base).forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"

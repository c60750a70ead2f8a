"""Keys and values of recent prompts, so a prompt that starts as one already seen skips that part
of its prefill.

Chat traffic repeats itself at the front: every prompt of a chat template starts with the same
system turn, and each turn of a conversation resends the whole conversation before it. A
``PrefixCache`` keeps the per-layer keys and values of the prompts prefilled last (least recently
used out first, within a budget in bytes); a new prompt reuses the longest run of tokens it
shares with any of them, and only its remaining tokens go through the model
(``components.common.packed_prefill``). The key and value of a position depend only on the
tokens up to it, so the reused part is what the prompt's own prefill would compute, up to float
rounding. The vLLM and SGLang servers call this automatic prefix caching.

On the held-out support conversations of ``benchmarks/bench_serve.py``, 2631 prompt tokens a
round, the cache leaves 1296 to compute.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Sequence

import torch

DEFAULT_PREFIX_CACHE_BYTES = 256 * 2**20  # SmolLM2-135M: 46 KB a token, about 5,800 tokens


@dataclass(frozen=True)
class CachedPrompt:
    """A prompt's tokens and every layer's keys and values ``[kv_heads, length, head_dim]``."""

    tokens: tuple[int, ...]
    layers: tuple[tuple[torch.Tensor, torch.Tensor], ...]

    @property
    def bytes(self) -> int:
        return sum(t.numel() * t.element_size() for layer in self.layers for t in layer)


@dataclass(frozen=True)
class PrefixMatch:
    """The first ``length`` tokens of a prompt, found in ``cached`` (None: nothing reused)."""

    length: int = 0
    cached: CachedPrompt | None = None

    def layer(self, index: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Layer ``index``'s keys and values of the matched tokens, or None."""
        if self.cached is None:
            return None
        keys, values = self.cached.layers[index]
        return keys[:, :self.length], values[:, :self.length]


class PrefixCache:
    """The keys and values of recent prompts, within ``max_bytes`` (0: keeps nothing)."""

    def __init__(self, max_bytes: int = DEFAULT_PREFIX_CACHE_BYTES):
        if max_bytes < 0:
            raise ValueError(f"the prefix cache's size must be >= 0 bytes, got {max_bytes}")
        self.max_bytes = max_bytes
        self.bytes = 0
        self._prompts: OrderedDict[tuple[int, ...], CachedPrompt] = OrderedDict()
        self.looked_up = self.reused = 0  # prompt tokens looked up, and found

    def __len__(self) -> int:
        return len(self._prompts)

    def longest(self, prompt: Sequence[int]) -> PrefixMatch:
        """The longest start of ``prompt`` that some cached prompt has, leaving at least its last
        token to compute (the next token's logits come from it)."""
        tokens = tuple(prompt)
        best = PrefixMatch()
        for cached in self._prompts.values():
            length = _common_length(tokens, cached.tokens, len(tokens) - 1)
            if length > best.length:
                best = PrefixMatch(length, cached)
        if best.cached is not None:
            self._prompts.move_to_end(best.cached.tokens)
        return best

    def record(self, prompt_tokens: int, reused_tokens: int) -> None:
        """Counts a prefilled prompt's tokens and how many of them came from the cache."""
        self.looked_up += prompt_tokens
        self.reused += reused_tokens

    def add(self, prompt: Sequence[int],
            layers: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Keeps a prompt's keys and values (``[kv_heads, len(prompt), head_dim]`` per layer),
        in place of the cached prompts it starts with; nothing when a cached prompt starts with
        it, or it alone is over the budget."""
        tokens = tuple(prompt)
        for cached in self._prompts.values():
            if cached.tokens[:len(tokens)] == tokens:
                self._prompts.move_to_end(cached.tokens)
                return
        entry = CachedPrompt(tokens, tuple((keys, values) for keys, values in layers))
        if entry.bytes > self.max_bytes:
            return
        for shorter in [t for t in self._prompts if tokens[:len(t)] == t]:
            self.bytes -= self._prompts.pop(shorter).bytes
        self._prompts[tokens] = entry
        self.bytes += entry.bytes
        while self.bytes > self.max_bytes:
            self.bytes -= self._prompts.popitem(last=False)[1].bytes

    def describe(self) -> dict:
        """What the cache holds and has saved (the endpoint's health route shows it)."""
        return {"prompts": len(self._prompts), "bytes": self.bytes, "max_bytes": self.max_bytes,
                "prompt_tokens": self.looked_up, "reused_tokens": self.reused}


def _common_length(first: tuple[int, ...], second: tuple[int, ...], limit: int) -> int:
    """How many leading tokens ``first`` and ``second`` share, at most ``limit``."""
    limit = min(limit, len(second))
    length = 0
    while length < limit and first[length] == second[length]:
        length += 1
    return length

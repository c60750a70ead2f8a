"""Examples -> token ids and loss masks: the tokenization validate, transform and evaluate share.

Prompts and targets are formatted by :mod:`components.common.prompts` (the one place prompts are
formatted, so training prompts equal inference prompts) and tokenized in batches with the fast
tokenizer's batch call, ``tokenizer(texts, add_special_tokens=False)``.

Text, code and distillation examples: ``prompt = format_prompt(tok, input_text)`` (no context),
``target = format_target(tok, chat_messages(input_text), output_text)``; ids = prompt ids then
target ids; loss mask 0 on the prompt, the example's ``target_mask`` (1; a distillation task
example's task, :mod:`components.common.distillation_tasks`) on the target (the end-of-turn
token included).

Chat and Gemini examples: the system context is the example's own context, else
``default_context`` (none when both are empty). For assistant turn i the prompt is the conversation
up to the user message of turn i; its new text (what the template adds after the previous target)
is masked 0 and the assistant target is masked 1, so the loss is only on assistant turns.
Each segment is tokenized on its own: the template's turn markers are special tokens, so a
segment boundary never splits what the tokenizer would have merged.

The texts are exactly those of ``prompts``;
:class:`components.common.prompt_templates.TemplateRenderer` produces them without a Jinja render
per example when the template allows it (checked).

The ids are exactly those of ``tokenizer(texts, add_special_tokens=False)``, computed by the Rust
tokenizer's ``encode_batch_fast`` when the tokenizer allows it (:class:`BatchTokenizer`): it skips
the character offsets, which nothing here needs and which cost about a third of the batch call.

Truncation (too long is not an error; it is counted):

- a target longer than the output limit keeps its first tokens and its last ``k`` tokens, the
  template's closing tokens (the end-of-turn marker and what follows it), so the model still
  learns to stop;
- a prompt longer than the input limit keeps its first tokens and its last ``k`` tokens (the
  template's close of the user turn and the assistant header), so it still ends where the model
  starts answering;
- a chat conversation longer than the input limit drops whole turns from its end; if its first
  turn alone is too long, that turn's prompt is truncated as above.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from components.common.dataset_formats import Example, Limits, normalize_format
from components.common.distillation_tasks import Task
from components.common.prompts import chat_messages, format_conversation_prompt, format_target
from components.common.prompt_templates import TemplateRenderer

DEFAULT_BATCH_SIZE = 512
_SENTINEL = "\ue000tunepipe\ue001"


@dataclass
class Encoded:
    """One tokenized example, truncated to the limits, with its untruncated lengths."""

    ids: list[int] | None  # None for an unlabeled (distillation) example: nothing to train on
    mask: np.ndarray | None  # uint8: 0 on prompt tokens, the example's target_mask on targets
    input_tokens: int  # untruncated: text, the prompt; chat, the whole conversation
    output_tokens: int  # untruncated: text, the target; chat, the longest assistant turn
    input_truncated: bool
    output_truncated: bool

    @property
    def truncated(self) -> bool:
        return self.input_truncated or self.output_truncated


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                    "chat_template.jinja", "chat_template.json", "vocab.json", "merges.txt",
                    "tokenizer.model", "added_tokens.json")


def _library_versions() -> bytes:
    import tokenizers
    import transformers

    return f"transformers={transformers.__version__};tokenizers={tokenizers.__version__}".encode()


def folder_fingerprint(folder: str | Path) -> str | None:
    """A digest of the tokenizer files in a checkpoint folder (None when it has none)."""
    digest = hashlib.sha256(_library_versions())
    found = False
    for name in _TOKENIZER_FILES:
        path = Path(folder) / name
        if path.is_file():
            found = True
            digest.update(b"\0" + name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest() if found else None


def tokenizer_fingerprint(tokenizer) -> str:
    """A digest of what decides tokenization: the tokenizer files (or the tokenizer itself)."""
    fingerprint = folder_fingerprint(getattr(tokenizer, "name_or_path", "") or "/nonexistent")
    if fingerprint is not None:
        return fingerprint
    digest = hashlib.sha256(_library_versions())
    digest.update((tokenizer.chat_template or "").encode("utf-8"))
    backend = getattr(tokenizer, "backend_tokenizer", None)
    digest.update(backend.to_str().encode("utf-8") if backend is not None else b"")
    return digest.hexdigest()


def encoding_key(fingerprint: str, dataset_format: str, limits: Limits,
                 default_context: str, tasks: Sequence[Task] = ()) -> str:
    """The digest that decides an encoder's output bytes; a token cache is reusable when equal.

    ``tasks``: the tasks each example is split into (their prefixes and mask values change the
    bytes); none for single-task encodings, whose key does not mention them.
    """
    fmt = normalize_format(dataset_format)
    if fmt not in ("chat", "gemini"):
        default_context = ""  # the text formats ignore contexts
    key = {"dataset_format": fmt, "limits": limits.to_dict(), "tokenizer_sha256": fingerprint,
           "default_context_sha256": hashlib.sha256(default_context.encode("utf-8")).hexdigest(),
           "encoding_version": 1}
    if tasks:
        key["tasks"] = [[task.name, task.prefix, task.mask_value] for task in tasks]
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def _closing_tokens(tokenizer, text: str) -> int:
    """How many tokens the template writes after the sentinel in ``text``."""
    index = text.rfind(_SENTINEL)
    suffix = text[index + len(_SENTINEL):] if index >= 0 else ""
    if not suffix:
        return 0
    return len(tokenizer(suffix, add_special_tokens=False)["input_ids"])


def _truncate(ids: list[int], limit: int, keep_tail: int) -> list[int]:
    if len(ids) <= limit:
        return ids
    keep_tail = min(keep_tail, limit - 1) if limit > 1 else 0
    head = limit - keep_tail
    return ids[:head] + (ids[len(ids) - keep_tail:] if keep_tail else [])


class BatchTokenizer:
    """``tokenizer(texts, add_special_tokens=False)["input_ids"]``, without character offsets.

    A transformers fast tokenizer computes, for every token, its character offsets, which
    tokenization for training never reads. The Rust tokenizer's ``encode_batch_fast`` gives the
    same ids without them. It is used only when it gives exactly the ids of the generic call:
    the tokenizer is backed by a ``tokenizers.Tokenizer`` that has ``encode_batch_fast``, no
    truncation or padding is set on it (transformers switches them off for the generic call) and
    it splits special tokens as the generic call would; and the first text of every batch is
    also encoded by the generic call and compared: a difference switches the fast path off for
    good (and that batch is encoded again by the generic call).
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        backend = getattr(tokenizer, "_tokenizer", None)
        self.fast = bool(getattr(tokenizer, "is_fast", False)) and hasattr(backend, "encode_batch_fast")

    def generic(self, texts: list[str]) -> list[list[int]]:
        """The tokenizer's own batch call."""
        return self.tokenizer(texts, add_special_tokens=False, return_attention_mask=False,
                              return_token_type_ids=False)["input_ids"]

    def _backend_matches_generic(self) -> bool:
        backend = self.tokenizer._tokenizer
        split = getattr(self.tokenizer, "split_special_tokens", False)
        return (backend.truncation is None and backend.padding is None
                and bool(backend.encode_special_tokens) == bool(split))

    def __call__(self, texts: list[str]) -> list[list[int]]:
        if not texts:
            return []
        if self.fast and not self._backend_matches_generic():
            self.fast = False
        if not self.fast:
            return self.generic(texts)
        ids = [encoding.ids for encoding in
               self.tokenizer._tokenizer.encode_batch_fast(texts, add_special_tokens=False)]
        if ids[0] != self.generic(texts[:1])[0]:  # spot check
            self.fast = False
            return self.generic(texts)
        return ids


class ExampleEncoder:
    """Encodes :class:`Example` objects of one format for one tokenizer and one set of limits.

    ``tasks``: the tasks the caller splits each record into
    (:func:`components.common.distillation_tasks.task_examples`: prefixed inputs, task mask
    values); they are part of the cache key. Empty for single-task data.
    """

    def __init__(self, tokenizer, dataset_format: str, limits: Limits, default_context: str = "",
                 fast_templates: bool = True, tasks: Sequence[Task] = ()):
        self.tokenizer = tokenizer
        # Exactly the prompts.py texts; fast when the template allows it (see prompt_templates.py).
        self.renderer = TemplateRenderer(tokenizer, fast=fast_templates)
        # Exactly the ids of tokenizer(texts, add_special_tokens=False), without offsets.
        self.token_ids = BatchTokenizer(tokenizer)
        self._checked_shapes: set[tuple] = set()
        self.format = normalize_format(dataset_format)
        self.limits = limits
        self.tasks = tuple(tasks)
        self.conversational = self.format in ("chat", "gemini")
        # The text formats ignore contexts; chat and Gemini use the default when an example
        # has none.
        self.default_context = default_context if self.conversational else ""
        self.prompt_closing = _closing_tokens(
            tokenizer, format_conversation_prompt(tokenizer, [{"role": "user",
                                                               "content": _SENTINEL}]))
        self.target_closing = _closing_tokens(
            tokenizer, format_target(tokenizer, chat_messages("x"), _SENTINEL))
        self._key: str | None = None

    def cache_key_digest(self) -> str:
        """See :func:`encoding_key`."""
        if self._key is None:
            self._key = encoding_key(tokenizer_fingerprint(self.tokenizer), self.format,
                                     self.limits, self.default_context, self.tasks)
        return self._key

    # --- formatting ---------------------------------------------------------------------------

    def segments(self, example: Example, check: bool = False) -> list[tuple[str, bool]]:
        """The example's text as (segment, is_target) pieces, in order.

        Text formats: ``format_prompt(tok, input_text)`` and ``format_target(tok,
        chat_messages(input_text), output_text)``; chat: see the module docstring. ``check``
        compares the fast renders with prompts.py (spot checks).
        """
        render = self.renderer
        if not self.conversational:
            (input_text, output_text), = example.turns
            messages = chat_messages(input_text)  # format_prompt(tok, x) renders exactly these
            self._spot_check(messages, output_text, check)
            prompt = render.prompt(messages)
            if output_text is None:
                return [(prompt, False)]
            return [(prompt, False), (render.target(messages, output_text), True)]
        context = example.context if example.context is not None else self.default_context
        history: list[dict[str, str]] = [{"role": "system", "content": context}] if context else []
        pieces: list[tuple[str, bool]] = []
        written = ""
        for user, assistant in example.turns:
            history.append({"role": "user", "content": user})
            self._spot_check(history, assistant, check)
            prompt = render.prompt(history)
            if not prompt.startswith(written):
                raise ValueError("the chat template does not extend a conversation's text when a "
                                 "turn is added; this tokenizer's template is not supported")
            target = render.target(history, assistant)
            pieces.append((prompt[len(written):], False))
            pieces.append((target, True))
            written = prompt + target
            history.append({"role": "assistant", "content": assistant})
        return pieces

    def _spot_check(self, messages: list[dict], output_text: str | None, check: bool) -> None:
        if not self.renderer.fast:
            return
        shape = tuple(m["role"] for m in messages)
        if check or shape not in self._checked_shapes:
            self._checked_shapes.add(shape)
            self.renderer.verify(messages, output_text)

    # --- tokenizing ---------------------------------------------------------------------------

    def encode_batch(self, examples: Sequence[Example]) -> list[Encoded]:
        """Encodes examples with one batched tokenizer call."""
        all_segments = [self.segments(example, check=index == 0)
                        for index, example in enumerate(examples)]
        texts = [text for segments in all_segments for text, _ in segments]
        ids = self.token_ids(texts)
        results: list[Encoded] = []
        position = 0
        for example, segments in zip(examples, all_segments):
            pieces = ids[position:position + len(segments)]
            position += len(segments)
            if self.conversational:
                results.append(self._assemble_conversation(pieces, example.target_mask))
            else:
                results.append(self._assemble_text(pieces, example.target_mask))
        return results

    def encode(self, example: Example) -> Encoded:
        return self.encode_batch([example])[0]

    def _assemble_text(self, pieces: list[list[int]], target_mask: int) -> Encoded:
        limits = self.limits
        prompt = pieces[0]
        kept_prompt = _truncate(prompt, limits.input_tokens, self.prompt_closing)
        if len(pieces) == 1:  # unlabeled
            return Encoded(None, None, len(prompt), 0, len(kept_prompt) < len(prompt), False)
        target = pieces[1]
        kept_target = _truncate(target, limits.output_tokens, self.target_closing)
        ids = kept_prompt + kept_target
        mask = np.zeros(len(ids), dtype=np.uint8)
        mask[len(kept_prompt):] = target_mask
        return Encoded(ids, mask, len(prompt), len(target),
                       len(kept_prompt) < len(prompt), len(kept_target) < len(target))

    def _assemble_conversation(self, pieces: list[list[int]], target_mask: int) -> Encoded:
        limits = self.limits
        total = sum(len(piece) for piece in pieces)
        longest_answer = max(len(pieces[i]) for i in range(1, len(pieces), 2))
        turns = []
        output_truncated = False
        for i in range(0, len(pieces), 2):
            target = _truncate(pieces[i + 1], limits.output_tokens, self.target_closing)
            output_truncated |= len(target) < len(pieces[i + 1])
            turns.append((pieces[i], target))
        kept_total = sum(len(p) + len(t) for p, t in turns)
        input_truncated = False
        while kept_total > limits.input_tokens and len(turns) > 1:
            prompt, target = turns.pop()
            kept_total -= len(prompt) + len(target)
            input_truncated = True
        if kept_total > limits.input_tokens:
            prompt, target = turns[0]
            turns[0] = (_truncate(prompt, limits.input_tokens - len(target), self.prompt_closing),
                        target)
            input_truncated = True
        ids: list[int] = []
        mask = np.zeros(sum(len(p) + len(t) for p, t in turns), dtype=np.uint8)
        for prompt, target in turns:
            ids += prompt
            mask[len(ids):len(ids) + len(target)] = target_mask
            ids += target
        return Encoded(ids, mask, total, longest_answer, input_truncated, output_truncated)


def batched(items: Iterable, size: int = DEFAULT_BATCH_SIZE):
    """Lists of up to ``size`` consecutive items."""
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch

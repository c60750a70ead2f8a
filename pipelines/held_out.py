"""The held-out check of a chat run: base and tuned replies to held-out conversations, and how
often each follows a rule (the reply ends with an exact text, e.g. a house sign-off).

Vertex's chat template takes no evaluation data, so this check runs after the pipeline, in
``tunepipe run --held-out FILE --expect-ending TEXT``, and its numbers go into the run summary.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from pipelines.templates import ParameterError
@dataclass
class HeldOutComparison:
    """Base and tuned replies to held-out conversations, and how often each follows the rule.

    The rule (``expected_ending``): the reply, without trailing whitespace, ends with this exact
    text (a house sign-off, say). Empty: no rule, replies only.
    """

    uri: str
    prompts: list[list[dict[str, str]]]  # the chat messages each reply answers
    references: list[str]  # the held-out assistant replies
    base_replies: list[str]
    tuned_replies: list[str]
    expected_ending: str
    seconds: float

    def follows_rule(self, reply: str) -> bool:
        return reply.rstrip().endswith(self.expected_ending)

    def rule_count(self, replies: list[str]) -> int:
        """How many of ``replies`` follow the rule."""
        return sum(self.follows_rule(reply) for reply in replies)


def read_held_out(uri: str, default_context: str) -> tuple[list[list[dict[str, str]]], list[str]]:
    """The prompts and reference replies of a chat JSONL file: each conversation's last
    assistant message is the reference; the messages before it, after the system context (the
    example's own, else ``default_context``), are the prompt."""
    from components.common import storage
    from components.common.dataset_formats import parse_example

    prompts, references = [], []
    for number, line in enumerate(storage.read_text(uri).lstrip("\ufeff").splitlines(), 1):
        if not line.strip():
            continue
        try:
            example, problems = parse_example(json.loads(line), "chat")
        except ValueError as error:
            raise ParameterError(f"{uri}:{number}: (line): not valid JSON: {error}") from None
        if problems:
            field, message = problems[0]
            raise ParameterError(f"{uri}:{number}: {field}: {message}; held-out conversations "
                                 "use the chat format")
        context = example.context if example.context is not None else default_context
        messages = [{"role": "system", "content": context}] if context else []
        for user, assistant in example.turns[:-1]:
            messages += [{"role": "user", "content": user},
                         {"role": "assistant", "content": assistant}]
        prompts.append(messages + [{"role": "user", "content": example.turns[-1][0]}])
        references.append(example.turns[-1][1])
    if not prompts:
        raise ParameterError(f"{uri}: no held-out conversations")
    return prompts, references


def compare_on_held_out(model_dir: str | Path, uri: str, default_context: str,
                        expected_ending: str) -> HeldOutComparison:
    """Greedy replies of the tuned model in ``model_dir`` and of its base model to the held-out
    conversations in ``uri``, prompted as the tuner trained (the model's chat template, the
    default context as the system turn, the model's input prefix on the last user message), at
    most the longest reference + 16 tokens."""
    from components.common.distillation_tasks import input_prefix
    from components.common.generation import generate
    from components.common.model_loading import (base_checkpoint_of, load_base_model,
                                                 load_tuned_model, select_device)
    from components.common.precision import choose_precision
    from components.common.prompts import format_conversation_prompt, with_input_prefix

    started = time.perf_counter()
    prompts, references = read_held_out(uri, default_context)
    device = select_device()
    dtype = choose_precision(device).dtype
    tuned, tokenizer, metadata = load_tuned_model(model_dir, device, dtype)
    prefix = input_prefix(metadata)
    texts = [format_conversation_prompt(tokenizer, with_input_prefix(messages, prefix))
             for messages in prompts]
    longest = max(len(tokenizer(reference, add_special_tokens=False)["input_ids"])
                  for reference in references)
    tuned_replies = generate(tuned, tokenizer, texts, longest + 16)
    del tuned
    base = load_base_model(base_checkpoint_of(metadata), device, dtype)
    base_replies = generate(base, tokenizer, texts, longest + 16)
    return HeldOutComparison(uri, prompts, references, base_replies, tuned_replies,
                             expected_ending, time.perf_counter() - started)

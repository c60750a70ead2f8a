"""How an example becomes the text the model sees: the one place prompts are formatted.

Training (transform), evaluation and the endpoint all format prompts here, so a tuned model is
prompted at inference exactly as it was trained. With a chat template (the embedded model has
one) the input is a user turn, an optional context is the system turn, and the target is the
assistant turn up to and including its end-of-turn token. Without a chat template the prompt is
the input followed by a newline and the target ends with the EOS token.
"""
from __future__ import annotations

from typing import Sequence


def chat_messages(input_text: str, context: str = "") -> list[dict[str, str]]:
    """The chat-template messages for one prompt: an optional system context, then the user."""
    messages = [{"role": "system", "content": context}] if context else []
    messages.append({"role": "user", "content": input_text})
    return messages


def with_input_prefix(messages: Sequence[dict[str, str]], prefix: str) -> list[dict[str, str]]:
    """``messages`` with ``prefix`` prepended to the last user message: a model trained with an
    input prefix (a distillation student's task prefix) is prompted as it was trained."""
    messages = list(messages)
    if prefix:
        last = max(i for i, message in enumerate(messages) if message["role"] == "user")
        messages[last] = {**messages[last], "content": prefix + messages[last]["content"]}
    return messages


def format_prompt(tokenizer, input_text: str, context: str = "") -> str:
    """The prompt text for ``input_text``, ending where the model starts to answer."""
    return format_conversation_prompt(tokenizer, chat_messages(input_text, context))


def format_conversation_prompt(tokenizer, messages: Sequence[dict[str, str]]) -> str:
    """The prompt text for a conversation whose last message is the user's."""
    if tokenizer.chat_template:
        return tokenizer.apply_chat_template(list(messages), tokenize=False,
                                             add_generation_prompt=True)
    return "\n".join(m["content"] for m in messages) + "\n"


def format_target(tokenizer, messages: Sequence[dict[str, str]], output_text: str) -> str:
    """The text the model must produce after ``format_conversation_prompt(messages)``.

    It is what the chat template writes for the assistant turn, end-of-turn token included.
    """
    if tokenizer.chat_template:
        prompt = format_conversation_prompt(tokenizer, messages)
        full = tokenizer.apply_chat_template(
            [*messages, {"role": "assistant", "content": output_text}], tokenize=False)
        if not full.startswith(prompt):
            raise ValueError("the chat template does not extend the prompt with the answer; "
                             "this tokenizer's template is not supported")
        return full[len(prompt):]
    return output_text + (tokenizer.eos_token or "")


def end_of_turn_token_ids(tokenizer) -> list[int]:
    """Token ids that end an answer: EOS and, for chat templates, the end-of-turn marker."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    for token in ("<|im_end|>", "<|eot_id|>", "<end_of_turn>"):
        token_id = tokenizer.convert_tokens_to_ids(token)
        if isinstance(token_id, int) and token_id != tokenizer.unk_token_id:
            ids.add(token_id)
    return sorted(ids)

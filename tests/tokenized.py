"""Builds token datasets for tests straight from JSONL, the way transform formats examples."""
from __future__ import annotations

import json
from pathlib import Path

from components.common.prompts import chat_messages, format_prompt, format_target
from components.common.token_dataset import TokenDatasetWriter


def write_token_dataset(tokenizer, jsonl: Path, directory: Path, limit: int | None = None) -> Path:
    """Tokenizes text-format examples (prompt masked, answer a target) into ``directory``."""
    lines = jsonl.read_text().splitlines()[:limit]
    with TokenDatasetWriter(directory) as writer:
        for line in lines:
            example = json.loads(line)
            prompt = tokenizer(format_prompt(tokenizer, example["input_text"]),
                               add_special_tokens=False).input_ids
            target = tokenizer(format_target(tokenizer, chat_messages(example["input_text"]),
                                             example["output_text"]), add_special_tokens=False).input_ids
            writer.add(prompt + target, [0] * len(prompt) + [1] * len(target))
    return directory

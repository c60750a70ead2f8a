"""Builds token datasets for tests straight from JSONL, the way transform formats examples."""
from __future__ import annotations

import json
from pathlib import Path

from components.common.prompts import chat_messages, format_prompt, format_target
from components.common.artifacts.token_dataset import TokenDatasetWriter


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


def write_distillation_tokens(model_dir: Path, root: Path, examples: int = 16,
                              label_loss_weight: float = 0.5) -> Path:
    """The sample data as a distillation run tokenizes it for the model in ``model_dir``: a
    generate_rationales output folder (every other train example with a rationale, 6 eval
    examples) through transform. Returns the tokenized folder (``train/``, ``eval/``)."""
    from components.common.model_loading import load_tokenizer
    from components.transform.transform import transform_dataset

    samples = Path(__file__).resolve().parent.parent / "samples"
    train = [json.loads(line) for line in
             (samples / "support_intents_train.jsonl").read_text().splitlines()[:examples]]
    for number, record in enumerate(train):
        record["rationale"] = (f"The customer writes about {record['output_text']}, so the "
                               f"answer is {record['output_text']}." if number % 2 == 0 else None)
    rationales = root / "rationales"
    rationales.mkdir(parents=True)
    (rationales / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in train))
    evaluation = (samples / "support_intents_eval.jsonl").read_text().splitlines()[:6]
    (rationales / "eval.jsonl").write_text("\n".join(evaluation) + "\n")
    transform_dataset(rationales, "distillation", str(model_dir), "", "", root / "tokens",
                      tokenizer=load_tokenizer(model_dir), label_loss_weight=label_loss_weight)
    return root / "tokens"

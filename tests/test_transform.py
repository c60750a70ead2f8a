"""Transform: token ids, loss masks, chat templates, truncation, determinism, the cache."""
from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from components.common.dataset_formats import Example, token_limits  # noqa: E402
from components.common.distillation_tasks import (DEFAULT_LABEL_WEIGHT,  # noqa: E402
                                                  LABEL_PREFIX, RATIONALE_PREFIX)
from components.common.prompts import (chat_messages, format_conversation_prompt,  # noqa: E402
                                       format_prompt, format_target)
from components.common.artifacts.token_dataset import TokenDataset  # noqa: E402
from components.common.encoding import ExampleEncoder  # noqa: E402
from components.common.prompt_templates import (TemplateRenderer,  # noqa: E402
                                                template_is_content_opaque)
from components.transform.transform import (TransformError, transform_dataset,  # noqa: E402
                                            transform_for_pipeline)
from components.common.artifacts.validated_dataset import TRAIN_FILE  # noqa: E402
from components.validate_dataset.validator import run_validation  # noqa: E402

MODEL = "text-bison@002"
CHAT_MODEL = "chat-bison@002"


@pytest.fixture(scope="session")
def tokenizer():
    from components.common.model_catalog import resolve_model
    from components.common.model_loading import load_tokenizer

    return load_tokenizer(resolve_model(MODEL).checkpoint)


def ids_of(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def write_jsonl(path: Path, examples: list[dict]) -> Path:
    path.write_text("".join(json.dumps(e, ensure_ascii=False) + "\n" for e in examples),
                    encoding="utf-8")
    return path


def validate_and_transform(tmp_path, examples, fmt="text", model=MODEL, default_context="",
                           tokenizer=None, name="run", **kwargs):
    source = write_jsonl(tmp_path / f"{name}.jsonl", examples)
    validated = tmp_path / f"{name}-validated"
    report = run_validation(str(source), "", fmt, model, "", validated, tokenizer=tokenizer)
    report.raise_if_invalid()
    out = tmp_path / f"{name}-tokens"
    summary = transform_dataset(validated, fmt, model, "", default_context, out,
                                tokenizer=tokenizer, **kwargs)
    return TokenDataset(out / "train"), summary


def text_examples(n=10, **extra):
    return [{"input_text": f"What is {i} + {i}?", "output_text": f"It is {2 * i}.", **extra}
            for i in range(n)]


def chat_example(i, context=None):
    example = {"messages": [{"author": "user", "content": f"Hello {i}"},
                            {"author": "assistant", "content": f"Hi {i}, how can I help?"},
                            {"author": "user", "content": "Tell me a joke."},
                            {"author": "assistant", "content": "Why did the chicken cross?"}]}
    if context is not None:
        example["context"] = context
    return example


def test_text_tokens_are_prompt_then_target_with_mask(tmp_path, tokenizer):
    examples = text_examples()
    dataset, summary = validate_and_transform(tmp_path, examples, tokenizer=tokenizer)
    assert len(dataset) == 10 and summary["train"]["reused_tokens"]
    for example, (ids, mask) in zip(examples, dataset):
        prompt = format_prompt(tokenizer, example["input_text"])
        target = format_target(tokenizer, chat_messages(example["input_text"]),
                               example["output_text"])
        expected = ids_of(tokenizer, prompt) + ids_of(tokenizer, target)
        assert ids.tolist() == expected
        assert mask.tolist() == [0] * len(ids_of(tokenizer, prompt)) + \
            [1] * len(ids_of(tokenizer, target))
        assert tokenizer.decode(ids[mask == 1]) == example["output_text"] + "<|im_end|>\n"
        assert tokenizer.decode(ids[mask == 0]) == prompt
    assert ids[mask == 1][-2] == tokenizer.convert_tokens_to_ids("<|im_end|>")


def test_chat_masks_only_assistant_turns(tmp_path, tokenizer):
    examples = [chat_example(i) for i in range(10)]
    dataset, _ = validate_and_transform(tmp_path, examples, "chat", CHAT_MODEL,
                                        tokenizer=tokenizer)
    ids, mask = dataset[0]
    messages = [{"role": "user", "content": "Hello 0"},
                {"role": "assistant", "content": "Hi 0, how can I help?"},
                {"role": "user", "content": "Tell me a joke."},
                {"role": "assistant", "content": "Why did the chicken cross?"}]
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    assert tokenizer.decode(ids) == full
    # Runs of mask 1 are exactly the two assistant answers, each with its end-of-turn.
    runs, current = [], []
    for token, flag in zip(ids.tolist(), mask.tolist()):
        if flag:
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    assert [tokenizer.decode(run) for run in runs] == [
        "Hi 0, how can I help?<|im_end|>\n", "Why did the chicken cross?<|im_end|>\n"]
    prompt_text = tokenizer.decode(ids[mask == 0])
    assert "Hello 0" in prompt_text and "Tell me a joke." in prompt_text
    assert "chicken" not in prompt_text
    # The first prompt is exactly what the endpoint will send for the first user turn.
    first_prompt = format_conversation_prompt(tokenizer, messages[:1])
    assert ids[:len(ids_of(tokenizer, first_prompt))].tolist() == ids_of(tokenizer, first_prompt)


def test_multi_turn_loss_mask_with_a_context(tmp_path, tokenizer):
    examples = [chat_example(i, context="You are a pirate.") for i in range(10)]
    dataset, _ = validate_and_transform(tmp_path, examples, "chat", CHAT_MODEL,
                                        default_context="You are a poet.", tokenizer=tokenizer)
    ids, mask = dataset[0]
    messages = [{"role": "system", "content": "You are a pirate."},
                {"role": "user", "content": "Hello 0"},
                {"role": "assistant", "content": "Hi 0, how can I help?"},
                {"role": "user", "content": "Tell me a joke."},
                {"role": "assistant", "content": "Why did the chicken cross?"}]
    prompts = [format_conversation_prompt(tokenizer, messages[:2]),
               format_conversation_prompt(tokenizer, messages[:4])]
    answers = [format_target(tokenizer, messages[:2], messages[2]["content"]),
               format_target(tokenizer, messages[:4], messages[4]["content"])]
    # system + user 1 (mask 0), answer 1 (mask 1), user 2 (mask 0), answer 2 (mask 1)
    pieces = [(prompts[0], 0), (answers[0], 1),
              (prompts[1][len(prompts[0] + answers[0]):], 0), (answers[1], 1)]
    assert ids.tolist() == [t for text, _ in pieces for t in ids_of(tokenizer, text)]
    assert mask.tolist() == [flag for text, flag in pieces for _ in ids_of(tokenizer, text)]
    assert tokenizer.decode(ids) == tokenizer.apply_chat_template(messages, tokenize=False)
    assert answers == ["Hi 0, how can I help?<|im_end|>\n", "Why did the chicken cross?<|im_end|>\n"]


def test_default_context_applied_and_overridden(tmp_path, tokenizer):
    examples = [chat_example(0, context="You are a pirate.")] + \
        [chat_example(i) for i in range(1, 10)]
    dataset, summary = validate_and_transform(tmp_path, examples, "chat", CHAT_MODEL,
                                              default_context="You are a poet.",
                                              tokenizer=tokenizer)
    assert not summary["train"]["reused_tokens"]  # validation had no default context
    first = tokenizer.decode(dataset[0][0])
    second = tokenizer.decode(dataset[1][0])
    assert first.startswith("<|im_start|>system\nYou are a pirate.<|im_end|>\n")
    assert "poet" not in first
    assert second.startswith("<|im_start|>system\nYou are a poet.<|im_end|>\n")
    # Without a default context the template's own default system prompt is used.
    plain, summary = validate_and_transform(tmp_path, examples, "chat", CHAT_MODEL,
                                            tokenizer=tokenizer, name="plain")
    assert summary["train"]["reused_tokens"]
    assert "SmolLM" in tokenizer.decode(plain[1][0])


def test_text_format_ignores_context_and_default_context(tmp_path, tokenizer):
    examples = text_examples(context="ignored context")
    dataset, _ = validate_and_transform(tmp_path, examples, default_context="also ignored",
                                        tokenizer=tokenizer)
    text = tokenizer.decode(dataset[0][0])
    assert "ignored" not in text
    assert text == format_prompt(tokenizer, examples[0]["input_text"]) + format_target(
        tokenizer, chat_messages(examples[0]["input_text"]), examples[0]["output_text"])


def test_code_round_trips_exactly(tmp_path, tokenizer):
    code = "def f(x):\r\n\tif x:\r\n\t\treturn `x` + '```'\r\n    # trailing spaces   \r\n"
    question = "Fix this:\n```python\n\tprint('hi')\r\n```\n"
    examples = [{"input_text": question, "output_text": code}] + text_examples(10)
    dataset, _ = validate_and_transform(tmp_path, examples, tokenizer=tokenizer)
    ids, mask = dataset[0]
    assert tokenizer.decode(ids[mask == 1]) == code + "<|im_end|>\n"
    assert tokenizer.decode(ids[mask == 0]) == format_prompt(tokenizer, question)
    validated_line = (tmp_path / "run-validated" / "train.jsonl").read_text().splitlines()[0]
    assert json.loads(validated_line)["output_text"] == code


def test_gemini_system_instruction_and_roles(tmp_path, tokenizer):
    examples = [{"systemInstruction": {"parts": [{"text": "Be brief. "}, {"text": "Be kind."}]},
                 "contents": [{"role": "user", "parts": [{"text": f"Q{i}"}]},
                              {"role": "model", "parts": [{"text": f"A{i}"}]}]}
                for i in range(10)]
    dataset, _ = validate_and_transform(tmp_path, examples, "gemini", tokenizer=tokenizer)
    ids, mask = dataset[3]
    assert tokenizer.decode(ids) == tokenizer.apply_chat_template(
        [{"role": "system", "content": "Be brief. Be kind."}, {"role": "user", "content": "Q3"},
         {"role": "assistant", "content": "A3"}], tokenize=False)
    assert tokenizer.decode(ids[mask == 1]) == "A3<|im_end|>\n"


def test_truncation_keeps_prompt_close_and_end_of_turn(tmp_path, tokenizer):
    long_input = " ".join(["alpha"] * 9000)
    long_output = " ".join(["beta"] * 1500)
    examples = [{"input_text": long_input, "output_text": long_output}] + text_examples(10)
    dataset, summary = validate_and_transform(tmp_path, examples, tokenizer=tokenizer)
    ids, mask = dataset[0]
    assert int((mask == 0).sum()) == 8192 and int((mask == 1).sum()) == 1024
    prompt_ids = ids_of(tokenizer, format_prompt(tokenizer, long_input))
    closing = ids_of(tokenizer, "<|im_end|>\n<|im_start|>assistant\n")  # 6 tokens here
    head = 8192 - len(closing)
    assert ids[:head].tolist() == prompt_ids[:head]  # the input's start is kept
    assert ids[head:8192].tolist() == closing  # and the prompt still ends with the header
    assert tokenizer.decode(ids[-2:]) == "<|im_end|>\n"
    assert tokenizer.decode(ids[8192:8194]).startswith("beta beta")
    meta = summary["train"]
    assert (meta["truncated_inputs"], meta["truncated_outputs"],
            meta["truncated_examples"]) == (1, 1, 1)


def test_distillation_limits_and_chat_conversation_truncation(tokenizer):
    encoder = ExampleEncoder(tokenizer, "distillation", token_limits("distillation", "8k"))
    encoded = encoder.encode(Example(None, ((" ".join(["x"] * 7500), "short"),)))
    assert encoded.input_truncated and int((encoded.mask == 0).sum()) == 7168
    # Chat: a conversation over the limit drops whole turns from its end.
    chat = ExampleEncoder(tokenizer, "chat", token_limits("chat", "8k"))
    turn = (" ".join(["word"] * 3000), "ok")
    encoded = chat.encode(Example(None, (turn, turn, turn)))
    assert encoded.input_truncated and not encoded.output_truncated
    assert len(encoded.ids) <= 8192 and int(encoded.mask.sum()) == 2 * len(
        ids_of(tokenizer, "ok<|im_end|>\n"))
    assert encoded.input_tokens > 9000


def test_deterministic_bytes_batches_and_cache(tmp_path, tokenizer):
    examples = text_examples(30) + [{"input_text": "é\t\r\n`x`", "output_text": "ü"}]
    source = write_jsonl(tmp_path / "data.jsonl", examples)
    validated = tmp_path / "validated"
    run_validation(str(source), "", "text", MODEL, "", validated,
                   tokenizer=tokenizer).raise_if_invalid()
    outputs = []
    for name, kwargs in (("cached", {}), ("fresh", {"use_cache": False}),
                         ("again", {"use_cache": False}),
                         ("small-batches", {"use_cache": False, "batch_size": 4})):
        transform_dataset(validated, "text", MODEL, "", "", tmp_path / name,
                          tokenizer=tokenizer, **kwargs)
        outputs.append({p.name: p.read_bytes() for p in (tmp_path / name / "train").iterdir()})
    assert sorted(outputs[0]) == ["loss_mask.bin", "meta.json", "offsets.bin", "tokens.bin"]
    for other in outputs[1:]:
        assert other == outputs[0]


def test_transform_without_cache_loads_tokenizer_itself(tmp_path):
    source = write_jsonl(tmp_path / "data.jsonl", text_examples(10))
    validated = tmp_path / "validated"
    run_validation(str(source), "", "text", MODEL, "", validated,
                   count_tokens=False).raise_if_invalid()
    assert not (validated / "tokens" / "train").exists()
    metadata = transform_for_pipeline(str(validated), "text", MODEL, "", "",
                                      str(tmp_path / "out"))
    assert metadata["num_examples"] == 10 and metadata["reused_validation_tokens"] is False
    assert TokenDataset(tmp_path / "out" / "train").meta["num_examples"] == 10


def test_eval_split_is_tokenized_too(tmp_path, tokenizer):
    train = write_jsonl(tmp_path / "train.jsonl", text_examples(12))
    evaluation = write_jsonl(tmp_path / "eval.jsonl", text_examples(10))
    validated = tmp_path / "validated"
    run_validation(str(train), str(evaluation), "text", MODEL, "", validated,
                   tokenizer=tokenizer).raise_if_invalid()
    summary = transform_dataset(validated, "text", MODEL, "", "", tmp_path / "out",
                                tokenizer=tokenizer)
    assert sorted(summary) == ["eval", "train"]
    assert len(TokenDataset(tmp_path / "out" / "eval")) == 10


def test_unlabeled_distillation_examples_fail_cleanly_and_atomically(tmp_path, tokenizer):
    examples = text_examples(10) + [{"input_text": "unlabeled"}]
    source = write_jsonl(tmp_path / "data.jsonl", examples)
    validated = tmp_path / "validated"
    run_validation(str(source), "", "distillation", MODEL, "", validated,
                   tokenizer=tokenizer).raise_if_invalid()
    with pytest.raises(TransformError, match=r"train\.jsonl:11: output_text: missing; "
                                             r"unlabeled distillation examples"):
        transform_dataset(validated, "distillation", MODEL, "", "", tmp_path / "out",
                          tokenizer=tokenizer)
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")] == []


# --- distillation: the multi-task student ------------------------------------------------

def _rationale(i: int) -> str | None:
    """Every fourth record has a rationale; the others none (null, blank or absent)."""
    return [f"{i} + {i} doubles {i}.", None, "  ", "drop"][i % 4]


def distillation_records(n: int) -> list[dict]:
    """Records as generate_rationales writes them (its provenance fields included)."""
    records = []
    for i, example in enumerate(text_examples(n)):
        record = {"index": i, **example, "rationale": _rationale(i), "label_source": "gold",
                  "parse_status": "ok", "teacher_answer": None}
        if record["rationale"] == "drop":
            del record["rationale"]
        records.append(record)
    return records


def test_distillation_trains_label_and_rationale_tasks_and_evaluates_labels(tmp_path, tokenizer):
    # A validated distillation folder (its single-task tokens/ included) with rationales added
    # to train.jsonl, as generate_rationales' output would have them.
    validated = tmp_path / "validated"
    run_validation(str(write_jsonl(tmp_path / "train.jsonl", text_examples(10))),
                   str(write_jsonl(tmp_path / "eval.jsonl", text_examples(10))), "distillation",
                   MODEL, "", validated, tokenizer=tokenizer).raise_if_invalid()
    assert (validated / "tokens" / "train" / "meta.json").is_file()
    write_jsonl(validated / TRAIN_FILE, distillation_records(10))
    summary = transform_dataset(validated, "distillation", MODEL, "", "", tmp_path / "out",
                                tokenizer=tokenizer, label_loss_weight=0.3)
    assert not summary["train"]["reused_tokens"] and not summary["eval"]["reused_tokens"]

    train, evaluation = (TokenDataset(tmp_path / "out" / role) for role in ("train", "eval"))
    expected = []
    for record in distillation_records(10):
        expected.append((LABEL_PREFIX + record["input_text"], record["output_text"], 1))
        if (record.get("rationale") or "").strip():
            expected.append((RATIONALE_PREFIX + record["input_text"], record["rationale"], 2))
    assert len(train) == len(expected) == 13 and len(evaluation) == 10
    label_only = [(LABEL_PREFIX + e["input_text"], e["output_text"], 1) for e in text_examples(10)]
    for dataset, examples in ((train, expected), (evaluation, label_only)):
        for (input_text, output_text, task), (ids, mask) in zip(examples, dataset):
            prompt = ids_of(tokenizer, format_prompt(tokenizer, input_text))
            target = ids_of(tokenizer, format_target(tokenizer, chat_messages(input_text),
                                                     output_text))
            assert ids.tolist() == prompt + target
            assert mask.tolist() == [0] * len(prompt) + [task] * len(target)
        meta = dataset.meta
        assert meta["input_prefix"] == "[label] " and meta["dataset_format"] == "distillation"
        assert meta["tasks"] == [{"name": "label", "mask_value": 1, "weight": 0.3},
                                 {"name": "rationale", "mask_value": 2,
                                  "weight": pytest.approx(0.7)}]
        assert meta["num_target_tokens"] == sum(np.count_nonzero(m) for _, m in dataset)
    assert TokenDataset(validated / "tokens" / "train").meta["encoding_key"] != \
        train.meta["encoding_key"]


def test_distillation_data_and_alpha_are_checked(tmp_path, tokenizer):
    folder = tmp_path / "rationales"
    folder.mkdir()
    records = distillation_records(3)
    records[2]["rationale"] = 7
    write_jsonl(folder / TRAIN_FILE, records)
    with pytest.raises(TransformError, match=r"train\.jsonl:3: rationale: expected a string or "
                                             r"null, got a number"):
        transform_dataset(folder, "distillation", MODEL, "", "", tmp_path / "out",
                          tokenizer=tokenizer)
    for alpha in (-0.1, 1.5, float("nan"), "0.5"):
        with pytest.raises(ValueError, match=r"label_loss_weight must be a number in \[0, 1\]"):
            transform_dataset(folder, "distillation", MODEL, "", "", tmp_path / "out",
                              tokenizer=tokenizer, label_loss_weight=alpha)
    assert not (tmp_path / "out").exists()
    # Text data is one task: no tasks, no prefix, whatever label_loss_weight says.
    write_jsonl(folder / TRAIN_FILE, text_examples(2))
    summary = transform_dataset(folder, "text", MODEL, "", "", tmp_path / "text",
                                tokenizer=tokenizer, label_loss_weight=1.0)
    assert "tasks" not in summary["train"] and "input_prefix" not in summary["train"]


# --- the fast template path is exactly prompts.py ----------------------------------------

contents = st.text(st.characters(exclude_categories=("Cs",)), min_size=1, max_size=40)


@settings(max_examples=60, deadline=None, suppress_health_check=[
    HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(turns=st.lists(st.tuples(contents, contents), min_size=1, max_size=3),
       context=st.none() | contents)
def test_fast_renders_equal_prompts_module(tokenizer, turns, context):
    renderer = TemplateRenderer(tokenizer)
    assert renderer.fast
    history = [{"role": "system", "content": context}] if context else []
    for user, assistant in turns:
        history.append({"role": "user", "content": user})
        assert renderer.prompt(history) == format_conversation_prompt(tokenizer, history)
        assert renderer.target(history, assistant) == format_target(tokenizer, history,
                                                                    assistant)
        history.append({"role": "assistant", "content": assistant})
    user = turns[0][0]
    assert renderer.prompt(chat_messages(user)) == format_prompt(tokenizer, user)


@pytest.mark.parametrize("template,opaque", [
    ("{% for m in messages %}{{ '<' + m['role'] + '>' + m['content'] + '\\n' }}{% endfor %}",
     True),
    ("{% for m in messages %}{{ m.content }}{% endfor %}{{ messages | length }}", True),
    ("{% for m in messages %}{{ m['content'] | trim }}{% endfor %}", False),
    ("{% for m in messages %}{% if m['content'] %}x{% endif %}{% endfor %}", False),
    ("{% set c = messages[0]['content'] %}{{ c }}", False),
    ("{{ messages | tojson }}", False),
    ("{% for m in messages %}{{ m['content'].split('</think>')[-1] }}{% endfor %}", False),
])
def test_template_opacity_check(template, opaque):
    assert template_is_content_opaque(template) is opaque


def test_content_dependent_template_takes_the_exact_path(tokenizer):
    trimming = copy.copy(tokenizer)
    trimming.chat_template = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + "
                              "m['content'] | trim + '<|im_end|>\\n' }}{% endfor %}"
                              "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
                              "{% endif %}")
    renderer = TemplateRenderer(trimming)
    assert not renderer.fast
    messages = [{"role": "user", "content": "  padded  "}]
    assert renderer.prompt(messages) == format_conversation_prompt(trimming, messages)
    assert "padded<|im_end|>" in renderer.prompt(messages)
    encoder = ExampleEncoder(trimming, "text", token_limits("text", "8k"))
    encoded = encoder.encode(Example(None, (("  q  ", "  a  "),)))
    assert trimming.decode(np.asarray(encoded.ids)[encoded.mask == 1]) == "a<|im_end|>\n"


def test_component_signature():
    from components.transform.component import transform

    spec = transform.component_spec
    assert list(spec.inputs) == ["validated_dataset", "dataset_format", "large_model_reference",
                                 "max_context_length", "default_context", "label_loss_weight"]
    assert spec.inputs["label_loss_weight"].default == DEFAULT_LABEL_WEIGHT
    assert list(spec.outputs) == ["tokenized_dataset"]
    assert spec.inputs["validated_dataset"].type == "system.Dataset@0.0.1"

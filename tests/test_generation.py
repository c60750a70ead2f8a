"""components.common.generation: batched KV-cache generation on a tiny random Llama."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch

from components.common import generation
from components.common.generation import (Generation, SamplingParams, generate, generate_detailed,
                                          plan_batches, prompt_token_ids)
from components.common.prompts import end_of_turn_token_ids, format_prompt

PROMPTS = [
    "Classify the sentiment: I loved this film.",
    "Hi",
    "Summarize in one sentence: the council met on Tuesday to discuss the new budget, which "
    "raises spending on schools and roads while cutting administrative costs by a tenth.",
    "What is 2 + 2?",
    "Translate to French: good morning, how are you today, my dear friend?",
    "Is the sky blue? Answer yes or no.",
    "Name three colors.",
]


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory):
    """A tiny random Llama with the embedded model's tokenizer (chat template included).

    Not conftest's ``tiny_model_dir``: that one's default initialisation answers every prompt
    with the same repeated token, which would make the comparisons below vacuous."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from components.common.model_catalog import resolve_model
    from components.common.model_loading import load_tokenizer

    tokenizer = load_tokenizer(resolve_model("text-bison@002").checkpoint)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=512, tie_word_embeddings=True,
                         # The default 0.02 makes a tied-embedding model repeat its last prompt
                         # token forever; 0.2 gives varied answers, so comparisons mean something.
                         initializer_range=0.2,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    directory = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def tiny(tiny_llama_dir):
    from components.common.model_loading import load_base_model, load_tokenizer

    return load_base_model(tiny_llama_dir), load_tokenizer(tiny_llama_dir)


def _one_at_a_time_hf(model, tokenizer, prompts, max_new_tokens):
    """The naive reference: Hugging Face ``generate`` on each prompt alone, greedy."""
    stops = end_of_turn_token_ids(tokenizer)
    answers = []
    for prompt in prompts:
        ids = torch.tensor([prompt_token_ids(tokenizer, prompt)])
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                             max_new_tokens=max_new_tokens, eos_token_id=stops,
                             pad_token_id=tokenizer.pad_token_id)
        new = [t for t in out[0, ids.shape[1]:].tolist() if t not in stops]
        answers.append(tokenizer.decode(new, skip_special_tokens=True))
    return answers


def test_batched_greedy_equals_one_at_a_time(tiny):
    model, tokenizer = tiny
    prompts = [format_prompt(tokenizer, p) for p in PROMPTS]
    batched = generate(model, tokenizer, prompts, max_output_tokens=12, batch_size=4)
    single = generate(model, tokenizer, prompts, max_output_tokens=12, batch_size=1)
    reference = _one_at_a_time_hf(model, tokenizer, prompts, 12)
    assert batched == single == reference
    assert all(batched)  # a random model does not stop at once: the check is not vacuous
    assert len(set(batched)) > 1


def test_order_and_details(tiny):
    model, tokenizer = tiny
    prompts = [format_prompt(tokenizer, p) for p in PROMPTS]
    details = generate_detailed(model, tokenizer, prompts, SamplingParams(5), batch_size=3)
    alone = [generate_detailed(model, tokenizer, [p], SamplingParams(5))[0] for p in prompts]
    assert [d.token_ids for d in details] == [a.token_ids for a in alone]
    for detail, prompt in zip(details, prompts):
        assert isinstance(detail, Generation)
        assert detail.prompt_tokens == len(prompt_token_ids(tokenizer, prompt))
        assert len(detail.token_ids) <= 5
        assert detail.finish_reason in ("stop", "length")


def test_stops_at_end_of_turn_ids_and_drops_finished_rows(tiny):
    model, tokenizer = tiny
    prompts = [format_prompt(tokenizer, p) for p in PROMPTS]
    free = generate_detailed(model, tokenizer, prompts, SamplingParams(8), batch_size=8,
                             stop_token_ids=[])
    assert all(g.finish_reason == "length" and len(g.token_ids) == 8 for g in free)
    # Stop on the third token the first prompt generates: that row ends early (the stop token is
    # not part of the answer), and the other rows, which keep running without it, are unchanged.
    stop = free[0].token_ids[2]
    stopped = generate_detailed(model, tokenizer, prompts, SamplingParams(8), batch_size=8,
                                stop_token_ids=[stop])
    for before, after in zip(free, stopped):
        if stop in before.token_ids:
            cut = before.token_ids.index(stop)
            assert after.token_ids == before.token_ids[:cut]
            assert after.finish_reason == "stop"
        else:
            assert after.token_ids == before.token_ids
    assert stopped[0].token_ids == free[0].token_ids[:2]


def test_sampling_is_seeded_and_filters_reduce_to_greedy(tiny):
    model, tokenizer = tiny
    prompts = [format_prompt(tokenizer, p) for p in PROMPTS[:4]]
    greedy = generate(model, tokenizer, prompts, 6)
    first = generate(model, tokenizer, prompts, 6, temperature=1.5, seed=7)
    again = generate(model, tokenizer, prompts, 6, temperature=1.5, seed=7)
    assert first == again
    assert first != greedy  # a flat random model samples other tokens
    assert generate(model, tokenizer, prompts, 6, temperature=1.5, top_k=1) == greedy
    assert generate(model, tokenizer, prompts, 6, temperature=1.5, top_p=1e-9) == greedy


def test_long_prompt_keeps_its_end(tiny):
    model, tokenizer = tiny  # context 512
    long_prompt = format_prompt(tokenizer, "word " * 700)
    assert len(prompt_token_ids(tokenizer, long_prompt)) > 512
    [answer] = generate_detailed(model, tokenizer, [long_prompt], SamplingParams(4))
    assert len(answer.token_ids) <= 4
    with pytest.raises(ValueError, match="context"):
        generate(model, tokenizer, ["x"], max_output_tokens=512)


def test_plan_batches():
    lengths = [5, 50, 7, 48, 6, 100]
    batches = plan_batches(lengths, batch_size=2, max_batch_tokens=10_000)
    assert batches == [[5, 1], [3, 2], [4, 0]]  # longest first, similar lengths together
    assert plan_batches(lengths, batch_size=8, max_batch_tokens=100) == [[5], [1, 3], [2, 4, 0]]
    assert sorted(i for b in plan_batches(lengths, 3) for i in b) == list(range(6))
    with pytest.raises(ValueError):
        plan_batches(lengths, batch_size=0)


@pytest.mark.parametrize("kwargs, message", [
    ({"max_output_tokens": 0}, "maxOutputTokens"),
    ({"max_output_tokens": 5, "temperature": -0.1}, "temperature"),
    ({"max_output_tokens": 5, "top_p": 0.0}, "topP"),
    ({"max_output_tokens": 5, "top_p": 1.5}, "topP"),
    ({"max_output_tokens": 5, "top_k": -1}, "topK"),
])
def test_sampling_params_are_validated(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)


def test_sampling_params_from_vertex_names():
    params = SamplingParams.from_vertex({"temperature": 0.2, "maxOutputTokens": "64", "topP": 0.95,
                                         "topK": 40}, default_max_output_tokens=128)
    assert params == SamplingParams(64, 0.2, 0.95, 40)
    assert SamplingParams.from_vertex({}, 128) == SamplingParams(128)
    assert SamplingParams.from_vertex({}, 128).greedy
    with pytest.raises(ValueError, match="max_tokens"):
        SamplingParams.from_vertex({"max_tokens": 5}, 128)
    with pytest.raises(ValueError, match="maxOutputTokens"):
        SamplingParams.from_vertex({"maxOutputTokens": 2.5}, 128)


def test_cache_argument_matches_the_installed_transformers(tiny):
    import inspect

    model, _ = tiny
    name = generation._cache_argument_name(model)
    assert name in inspect.signature(type(model).forward).parameters


def test_common_prefix_length():
    from components.common.generation import common_prefix_length

    assert common_prefix_length([[1, 2, 3, 4], [1, 2, 5], [1, 2, 3]]) == 2
    assert common_prefix_length([[7, 8, 9], [7, 8, 9]]) == 2  # each row keeps one token
    assert common_prefix_length([[1], [1, 2]]) == 0
    assert common_prefix_length([[5, 6]]) == 1


def test_identical_prompts_share_all_but_their_last_token(tiny):
    model, tokenizer = tiny
    prompt = format_prompt(tokenizer, PROMPTS[0])
    answers = generate(model, tokenizer, [prompt] * 3 + [format_prompt(tokenizer, "Hi")], 6)
    assert answers[0] == answers[1] == answers[2] == generate(model, tokenizer, [prompt], 6)[0]


def test_refilled_batches_give_one_at_a_time_answers(tiny, monkeypatch):
    """Rows that stop early free their places; the next prompts are prefilled and merged into
    the running batch (caches of different lengths, left padded). Answers must not change."""
    model, tokenizer = tiny
    prompts = [format_prompt(tokenizer, p) for p in PROMPTS + [
        "Write a haiku about autumn leaves.", "Spell 'cat' backwards.", "Which is larger, 3 or 7?"]]
    free = generate_detailed(model, tokenizer, prompts, SamplingParams(10), batch_size=1,
                             stop_token_ids=[])
    # Two rows of the first batch (the longest prompts) stop on their 2nd token, so half of that
    # batch frees up after two steps and the next prompts are merged in.
    first = plan_batches([len(prompt_token_ids(tokenizer, p)) for p in prompts], 4)[0]
    stops = sorted({free[i].token_ids[1] for i in first[:2]})
    merges = []
    original = generation._Decoder.merge

    def counting_merge(self, state, fresh):
        if fresh is not None:
            merges.append((state.attention_mask.shape[1], fresh.attention_mask.shape[1]))
        return original(self, state, fresh)

    monkeypatch.setattr(generation._Decoder, "merge", counting_merge)
    batched = generate_detailed(model, tokenizer, prompts, SamplingParams(10), batch_size=4,
                                stop_token_ids=stops)
    monkeypatch.setattr(generation._Decoder, "merge", original)
    assert any(width != fresh_width for width, fresh_width in merges)
    single = generate_detailed(model, tokenizer, prompts, SamplingParams(10), batch_size=1,
                               stop_token_ids=stops)
    assert [g.token_ids for g in batched] == [g.token_ids for g in single]
    assert [g.finish_reason for g in batched] == [g.finish_reason for g in single]
    assert {g.finish_reason for g in batched} == {"stop", "length"}

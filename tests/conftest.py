"""Shared fixtures: an isolated tunepipe home, the embedded tokenizer, a tiny model."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

pytest_plugins = ["tests.gcs_emulator"]

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Tests compute in float32 on every machine, so their numbers do not depend on whether the CI
# machine's CPU has native bf16; tests/test_precision.py covers the automatic rule itself.
os.environ.setdefault("TUNEPIPE_PRECISION", "fp32")
# The converted embedded model is a cache worth sharing between test sessions.
os.environ.setdefault("TUNEPIPE_CACHE", str(Path.home() / ".tunepipe" / "cache"))


@pytest.fixture(scope="session", autouse=True)
def tunepipe_home(tmp_path_factory) -> Path:
    """A fresh registry and endpoint folder for the session; running endpoints are stopped."""
    home = tmp_path_factory.mktemp("tunepipe-home")
    previous = os.environ.get("TUNEPIPE_HOME")
    os.environ["TUNEPIPE_HOME"] = str(home)
    yield home
    from components.deploy_endpoint.endpoints import list_endpoints, stop_endpoint

    for endpoint in list_endpoints():
        stop_endpoint(endpoint.name, missing_ok=True)
    if previous is None:
        os.environ.pop("TUNEPIPE_HOME", None)
    else:
        os.environ["TUNEPIPE_HOME"] = previous


@pytest.fixture
def kernel_switch(monkeypatch):
    """A function that makes ``TUNEPIPE_KERNEL_ISA=<its argument>`` decide the C kernels loaded
    from then on; after the test, they are decided again without it."""
    from components.common import c_kernels

    def switch(isa: str) -> None:
        monkeypatch.setenv(c_kernels.ISA_ENV, isa)
        c_kernels.forget_kernels()

    yield switch
    c_kernels.forget_kernels()


@pytest.fixture(scope="session")
def embedded_checkpoint() -> str:
    """The embedded SmolLM2 checkpoint folder (converted from GGUF once, then cached)."""
    from components.common.model_catalog import resolve_model

    return resolve_model("text-bison@002").checkpoint


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, embedded_checkpoint) -> Path:
    """A tiny randomly initialised Llama with the embedded model's tokenizer and chat template."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from components.common.model_loading import load_tokenizer

    directory = tmp_path_factory.mktemp("tiny-model")
    tokenizer = load_tokenizer(embedded_checkpoint)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=1024, tie_word_embeddings=True,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def sample_dir() -> Path:
    return Path(__file__).resolve().parent.parent / "samples"


@pytest.fixture(scope="session")
def token_data(tmp_path_factory, tiny_model_dir, sample_dir) -> tuple[Path, Path]:
    """Training (40) and evaluation (12) token datasets of the sample data, for the tiny model."""
    from components.common.model_loading import load_tokenizer
    from tests.tokenized import write_token_dataset

    tokenizer = load_tokenizer(tiny_model_dir)
    root = tmp_path_factory.mktemp("tokens")
    train = write_token_dataset(tokenizer, sample_dir / "support_intents_train.jsonl", root / "train", 40)
    evaluation = write_token_dataset(tokenizer, sample_dir / "support_intents_eval.jsonl", root / "eval", 12)
    return train, evaluation


@pytest.fixture(scope="session")
def tuned_checkpoint(tmp_path_factory, tiny_model_dir, sample_dir) -> Path:
    """A checkpoint of the tiny model tuned for 2 steps on 16 sample examples."""
    from components.common.model_catalog import resolve_model
    from components.common.model_loading import load_tokenizer
    from components.tune.trainer import TuneConfig, tune
    from tests.tokenized import write_token_dataset

    root = tmp_path_factory.mktemp("tuned")
    train = write_token_dataset(load_tokenizer(tiny_model_dir),
                                sample_dir / "support_intents_train.jsonl", root / "train", 16)
    result = tune(resolve_model(str(tiny_model_dir)).to_dict(), train, None, root / "out",
                  TuneConfig(train_steps=2, learning_rate=1e-3, batch_size=4))
    return root / "out" / result.checkpoints[-1]["dir"]

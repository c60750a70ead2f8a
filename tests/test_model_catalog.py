"""The model catalog: aliases, folders, GGUF files, unknown references."""
from __future__ import annotations

from pathlib import Path

import pytest

from components.common import model_catalog
from components.common.model_catalog import (UnknownModelError, VERTEX_ALIASES, context_class,
                                             resolve_model)


@pytest.mark.parametrize("alias", sorted(VERTEX_ALIASES))
def test_vertex_names_resolve_to_the_embedded_model(alias, embedded_checkpoint):
    resolved = resolve_model(alias)
    assert resolved.checkpoint == embedded_checkpoint
    assert resolved.source.startswith("catalog:smollm2-135m-instruct")
    assert resolved.context_class == ("32k" if "-32k" in alias else "8k")


def test_embedded_checkpoint_is_a_complete_model_folder(embedded_checkpoint):
    folder = Path(embedded_checkpoint)
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        assert (folder / name).exists(), name
    assert not list(folder.parent.glob(folder.name + ".*"))  # no conversion leftovers


def test_a_checkpoint_folder_resolves_to_itself(tiny_model_dir):
    resolved = resolve_model(str(tiny_model_dir))
    assert resolved.checkpoint == str(tiny_model_dir.resolve())
    assert resolved.source == f"folder:{tiny_model_dir.resolve()}"


def test_unknown_reference_lists_the_known_ones(tmp_path):
    with pytest.raises(UnknownModelError) as error:
        resolve_model("text-bisn@002")
    message = str(error.value)
    assert "'text-bisn@002'" in message and "text-bison@002" in message and "chat-bison@002" in message
    with pytest.raises(UnknownModelError):
        resolve_model(str(tmp_path))  # a folder without config.json is no checkpoint


def test_context_class_comes_from_the_name_unless_given():
    assert context_class("text-bison-32k@002", "") == "32k"
    assert context_class("text-bison@002", "") == "8k"
    assert context_class("text-bison@002", "32K") == "32k"
    with pytest.raises(ValueError, match="max_context_length must be '', '8k' or '32k'"):
        context_class("text-bison@002", "16k")


def test_memoized_shares_one_result_per_arguments_within_the_block_only():
    import types

    calls = []

    def parse(path, mode="r"):
        calls.append((path, mode))
        return object()

    module = types.SimpleNamespace(parse=parse)
    with model_catalog._memoized(module, "parse"):
        first = module.parse(Path("/models/a.gguf"))
        assert module.parse("/models/a.gguf") is first  # a path and its string are one file
        assert module.parse("/models/a.gguf", mode="r+") is not first
        assert module.parse("/models/b.gguf") is not first
    assert calls == [(Path("/models/a.gguf"), "r"), ("/models/a.gguf", "r+"),
                     ("/models/b.gguf", "r")]
    assert module.parse is parse  # restored

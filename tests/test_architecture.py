"""Imports flow one way: command -> service -> pipelines -> components/<name> -> components/common.

Each layer imports only the layers below it, with no exception: the ``tunepipe`` command
(``command/``) may import every layer and nothing imports it; ``service/`` imports
``pipelines/`` and ``components/``; ``pipelines/`` imports ``components/``. A module of
``components/<name>/`` may import its own component and ``components.common``, never another
component; ``components/common/`` imports no component. What two components need belongs in
``components/common/`` (docs/architecture.md). Every import counts, the ones inside functions and
under ``TYPE_CHECKING`` included: a lazy import is still a dependency.
"""
from __future__ import annotations

import ast
from pathlib import Path
from typing import Iterator

import pytest

ROOT = Path(__file__).resolve().parent.parent
COMPONENTS = ROOT / "components"
SHARED = "common"
LAYERS = ("components", "pipelines", "service", "command")  # bottom to top


def module_name(path: str) -> str:
    """``components/transform/transform.py`` -> ``components.transform.transform``."""
    parts = Path(path).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: str, source: str) -> Iterator[tuple[int, str]]:
    """``(line, module)`` for every import in ``source``, relative ones resolved; ``from
    components import tune`` (or ``from .. import tune``) imports ``components.tune``."""
    package = module_name(path).split(".")
    if Path(path).name != "__init__.py":
        package = package[:-1]
    for node in ast.walk(ast.parse(source, filename=path)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            base = package[:len(package) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            if module == "components":
                for alias in node.names:
                    yield node.lineno, f"{module}.{alias.name}"
            else:
                yield node.lineno, module


def component_of(module: str) -> str | None:
    """``components.<name>.x`` -> ``name``; None outside the components package."""
    parts = module.split(".")
    return parts[1] if parts[0] == "components" and len(parts) > 1 else None


def violations(path: str, source: str) -> list[str]:
    """The imports of one file of a layer that break the one-way rule."""
    own = module_name(path)
    layer = own.split(".")[0]
    owner = component_of(own)  # None for components/__init__.py and the layers above
    found = set()
    for line, module in imported_modules(path, source):
        target_layer = module.split(".")[0]
        if target_layer not in LAYERS:
            continue
        if LAYERS.index(target_layer) > LAYERS.index(layer):
            found.add((line, f"{path}:{line}: imports {module}, the layer above {layer}/"))
            continue
        target = component_of(module)
        if layer == "components" and target is not None and target not in {owner, SHARED}:
            what = ("components/common imports no component" if owner == SHARED else
                    f"components/{owner} may import only itself and components/common")
            found.add((line, f"{path}:{line}: imports {module}; {what}"))
    return [message for _, message in sorted(found)]


def test_every_layer_imports_only_itself_and_the_layers_below():
    files = sorted(file for layer in LAYERS for file in (ROOT / layer).rglob("*.py"))
    assert len([f for f in files if f.is_relative_to(COMPONENTS)]) > 20, \
        "the components package was not found"
    assert {f.relative_to(ROOT).parts[0] for f in files} == set(LAYERS)
    found = []
    for file in files:
        path = file.relative_to(ROOT).as_posix()
        found += violations(path, file.read_text(encoding="utf-8"))
    assert not found, ("imports against the one-way rule (move what two components share into "
                       "components/common/; call down, never up):\n  " + "\n  ".join(found))


@pytest.mark.parametrize("path, source, expected", [
    ("components/transform/transform.py",
     "from components.validate_dataset.validator import EVAL_FILE\n",
     ["components/transform/transform.py:1: imports components.validate_dataset.validator"]),
    ("components/validate_dataset/validator.py",
     "def f():\n    from components.transform.encoding import ExampleEncoder\n",
     ["components/validate_dataset/validator.py:2: imports components.transform.encoding"]),
    ("components/evaluate/evaluation.py",
     "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import components.tune.trainer\n",
     ["components/evaluate/evaluation.py:3: imports components.tune.trainer"]),
    ("components/transform/transform.py", "from ..validate_dataset import validator\n",
     ["components/transform/transform.py:1: imports components.validate_dataset"]),
    ("components/common/encoding.py", "from components import transform\n",
     ["components/common/encoding.py:1: imports components.transform"]),
    ("components/common/__init__.py", "from ..tune import settings\n",
     ["components/common/__init__.py:1: imports components.tune"]),
    ("components/common/storage.py", "def f():\n    from .. import common, tune\n",
     ["components/common/storage.py:2: imports components.tune"]),
    ("components/tune/cli.py", "from command.main import main\n",
     ["components/tune/cli.py:1: imports command.main, the layer above components/"]),
    ("pipelines/local_run.py", "def f():\n    import service.jobs\n",
     ["pipelines/local_run.py:2: imports service.jobs, the layer above pipelines/"]),
    ("service/server.py", "from command.main import build_parser\n",
     ["service/server.py:1: imports command.main, the layer above service/"]),
    ("pipelines/submit.py", "from components.tune import settings\nimport command\n",
     ["pipelines/submit.py:2: imports command, the layer above pipelines/"]),
])
def test_the_check_finds_what_breaks_the_rule(path, source, expected):
    found = violations(path, source)
    assert len(found) == len(expected), found
    for violation, start in zip(found, expected):
        assert violation.startswith(start), found


@pytest.mark.parametrize("path, source", [
    ("components/transform/transform.py",
     "import json\nfrom components.common.encoding import ExampleEncoder\n"
     "from components.transform import component\nfrom . import transform\n"
     "from .component import transform as t\nimport components.common.storage\n"),
    ("components/common/encoding.py",
     "from components.common.prompt_templates import TemplateRenderer\nfrom . import prompts\n"),
    ("components/tune/component.py",
     "def body():\n    from components.tune.launch import tune_on_local_devices\n"),
    ("command/main.py", "from service.server import run\nfrom pipelines import submit\n"
                        "from components.tune import settings\nfrom command import run_summary\n"),
    ("service/jobs.py", "from pipelines.local_run import prepare\nimport service.records\n"),
])
def test_the_check_allows_own_and_common_imports(path, source):
    assert violations(path, source) == []

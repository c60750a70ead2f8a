"""Imports flow one way: service -> pipelines -> components/<name> -> components/common.

A module of ``components/<name>/`` may import its own component and ``components.common``, never
another component; ``components/common/`` imports no component; nothing under ``components/``
imports the layers above it (``pipelines``, ``service``). What two components need belongs in
``components/common/`` (shared/ARCHITECTURE.md). ``pipelines/`` does not import ``service/``,
except the ``tunepipe`` command (``pipelines/cli.py``), which sits above every layer and hands
``tunepipe serve`` to it. Every import counts, the ones inside functions and under
``TYPE_CHECKING`` included: a lazy import is still a dependency.
"""
from __future__ import annotations

import ast
from pathlib import Path
from typing import Iterator

import pytest

ROOT = Path(__file__).resolve().parent.parent
COMPONENTS = ROOT / "components"
SHARED = "common"
LAYERS_ABOVE = ("pipelines", "service")
PIPELINES = ROOT / "pipelines"
SERVICE = "service"
COMMAND = "pipelines/cli.py"  # the `tunepipe` command: above every layer


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
    """The imports of one file under ``components/`` that break the one-way rule."""
    owner = component_of(module_name(path))  # None for components/__init__.py
    allowed = {owner, SHARED}
    found = set()
    for line, module in imported_modules(path, source):
        target = component_of(module)
        if module.split(".")[0] in LAYERS_ABOVE:
            found.add((line, f"{path}:{line}: imports {module}, a layer above components/"))
        elif target is not None and target not in allowed:
            what = ("components/common imports no component" if owner == SHARED else
                    f"components/{owner} may import only itself and components/common")
            found.add((line, f"{path}:{line}: imports {module}; {what}"))
    return [message for _, message in sorted(found)]


def test_components_import_only_themselves_and_common():
    files = sorted(COMPONENTS.rglob("*.py"))
    assert len(files) > 20, "the components package was not found"
    found = []
    for file in files:
        path = file.relative_to(ROOT).as_posix()
        found += violations(path, file.read_text(encoding="utf-8"))
    assert not found, ("cross-component imports (move what they share into components/common/):"
                       "\n  " + "\n  ".join(found))


def service_imports(path: str, source: str) -> list[str]:
    """The imports of ``service`` in one file under ``pipelines/`` (the command's excepted)."""
    if path == COMMAND:
        return []
    return [f"{path}:{line}: imports {module}, the layer above pipelines/"
            for line, module in imported_modules(path, source)
            if module.split(".")[0] == SERVICE]


def test_pipelines_import_the_service_only_in_the_command():
    found = []
    for file in sorted(PIPELINES.rglob("*.py")):
        found += service_imports(file.relative_to(ROOT).as_posix(), file.read_text(encoding="utf-8"))
    assert not found, "pipelines/ calls down, never up into service/:\n  " + "\n  ".join(found)
    assert service_imports("pipelines/local_run.py", "def f():\n    import service.jobs\n")
    assert not service_imports(COMMAND, "from service.server import run\n")


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
    ("components/tune/cli.py", "from pipelines.cli import main\n",
     ["components/tune/cli.py:1: imports pipelines"]),
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
])
def test_the_check_allows_own_and_common_imports(path, source):
    assert violations(path, source) == []

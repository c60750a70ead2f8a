"""The pipeline templates: compiling them, and reading their parameters back from the YAML.

Two templates per pipeline, from the same pipeline definitions: ``compiled/<name>.yaml`` (the
portable template: the local runner executes it, open-source KFP runs it, the tuner's pod asks
for ``accelerator_type``'s Kubernetes resources and node selector, the latter in the file's
second YAML document, KFP's platform spec) and ``compiled/vertex/<name>.yaml`` (Vertex AI
Pipelines: the tuner runs as a Vertex CustomJob, the model goes to the Vertex Model Registry and
a Vertex endpoint; what `tunepipe publish` uploads). Their root ``inputDefinitions`` are the
source of truth for parameter names, types and defaults.
"""
from __future__ import annotations

import difflib
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import yaml

REPO_ROOT = Path(__file__).resolve().parent.parent
COMPILED_DIR = REPO_ROOT / "compiled"
VERTEX_SUBDIR = "vertex"  # compiled/vertex/<name>.yaml: the Vertex templates
IMAGE_ENV = "TUNEPIPE_IMAGE"  # the image compile writes into the templates, unless --image


def pipeline_factories() -> dict[str, Callable]:
    """Every pipeline by template name: a function of the target (``portable`` or ``vertex``)
    that builds the pipeline for it."""
    from pipelines.distillation import build_distillation
    from pipelines.tune_large_chat_model import build_tune_large_chat_model
    from pipelines.tune_large_model import build_tune_large_model

    return {"tune-large-model": build_tune_large_model,
            "tune-large-chat-model": build_tune_large_chat_model,
            "distillation": build_distillation}


def default_image() -> str:
    """The image templates name when compile is given none: ``$TUNEPIPE_IMAGE`` or the
    project's release image."""
    from components.common.images import BASE_IMAGE

    return os.environ.get(IMAGE_ENV) or BASE_IMAGE


def compile_all(output_dir: Path = COMPILED_DIR, image: str | None = None) -> list[Path]:
    """Compiles every pipeline to ``output_dir/<name>.yaml`` (portable) and
    ``output_dir/vertex/<name>.yaml`` (Vertex), its components running in ``image`` (default:
    :func:`default_image`)."""
    from kfp import compiler

    from components.common.images import BASE_IMAGE
    from pipelines.vertex import TARGETS, VERTEX

    image = image or default_image()
    written = []
    for target in TARGETS:
        directory = output_dir / VERTEX_SUBDIR if target == VERTEX else output_dir
        directory.mkdir(parents=True, exist_ok=True)
        for name, build in pipeline_factories().items():
            path = directory / f"{name}.yaml"
            compiler.Compiler().compile(build(target), str(path))
            # Components are declared with BASE_IMAGE, a reference found nowhere else in a
            # template: every occurrence (task containers, the CustomJob's worker pool spec,
            # Vertex's serving container, deploy_endpoint's serving_image) is the project's image.
            path.write_text(path.read_text().replace(BASE_IMAGE, image))
            written.append(path)
    return written


@dataclass(frozen=True)
class TemplateParameter:
    """One pipeline parameter as the compiled template declares it."""

    name: str
    type: str  # STRING, NUMBER_INTEGER, NUMBER_DOUBLE, BOOLEAN
    default: Any
    required: bool
    description: str


class ParameterError(ValueError):
    """Parameters that do not fit the template; the message lists every problem."""


def template_path(name_or_path: str) -> Path:
    """The compiled template for a pipeline name, a Vertex template URI or a YAML path."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") and path.exists():
        return path
    # Vertex template URIs end in .../<template name>/<version>, e.g.
    # https://us-kfp.pkg.dev/ml-pipeline/large-language-model-pipelines/tune-large-model/v2.0.0
    for part in reversed(name_or_path.rstrip("/").split("/")):
        if part in pipeline_factories():
            compiled = COMPILED_DIR / f"{part}.yaml"
            if not compiled.exists():
                raise FileNotFoundError(f"{compiled} is missing: run `tunepipe compile` first")
            return compiled
    raise ValueError(f"Unknown pipeline template {name_or_path!r}: use one of "
                     f"{', '.join(pipeline_factories())} or a compiled YAML file")


def registry_template_note(template_uri: str) -> str | None:
    """What the local runner runs for a ``templateUri`` that names a template in a registry
    (Vertex's own included); None for a local name or file."""
    if "://" not in template_uri:
        return None
    name = template_path(template_uri).stem
    return (f"templateUri {template_uri} names a registry template; the local runner runs "
            f"tunepipe's template of the same name, compiled/{name}.yaml")


def pipeline_spec(path: Path) -> dict:
    """A compiled template's pipeline spec: its first YAML document (a portable template's
    second is KFP's platform spec, which holds the tuner's node selector)."""
    return next(yaml.safe_load_all(path.read_text()))


def read_template(path: Path) -> tuple[str, dict[str, TemplateParameter]]:
    """The pipeline name and parameters of a compiled template."""
    spec = pipeline_spec(path)
    declared = spec["root"].get("inputDefinitions", {}).get("parameters", {})
    parameters = {
        name: TemplateParameter(name, entry["parameterType"], entry.get("defaultValue"),
                                not entry.get("isOptional", False), entry.get("description", ""))
        for name, entry in declared.items()
    }
    return spec["pipelineInfo"]["name"], parameters


def _coerce(parameter: TemplateParameter, value: Any) -> Any:
    kind = parameter.type
    if kind == "STRING":
        if isinstance(value, bool):
            return "true" if value else "false"
        if isinstance(value, (str, int, float)):
            return str(value)
        raise ValueError("expected a string")
    if kind == "BOOLEAN":
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in ("true", "false"):
            return value.strip().lower() == "true"
        raise ValueError("expected true or false")
    if kind == "NUMBER_INTEGER":
        if isinstance(value, bool):
            raise ValueError("expected an integer")
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, int):
            return value
        digits = value.strip().lstrip("+-") if isinstance(value, str) else ""
        if digits.isascii() and digits.isdigit():  # int() would take "３００" too
            return int(value)
        raise ValueError("expected an integer")
    if kind == "NUMBER_DOUBLE":
        if isinstance(value, bool) or (isinstance(value, str) and not value.isascii()):
            raise ValueError("expected a number")
        try:
            number = float(value)
        except (TypeError, ValueError, OverflowError):
            raise ValueError("expected a number") from None
        if not math.isfinite(number):
            raise ValueError("expected a finite number")
        return number
    return value


def bind_parameters(template: dict[str, TemplateParameter], given: dict[str, Any],
                    refused: dict[str, str] | None = None) -> dict[str, Any]:
    """Checks ``given`` against the template and converts values to the declared types.

    Raises ParameterError listing unknown names (with the likely intended name), missing
    required parameters and values of the wrong type, all at once. ``refused`` maps names the
    template deliberately lacks to the reason, reported instead of "unknown parameter".
    """
    problems = []
    for name in given:
        if name in (refused or {}):
            problems.append(f"parameter {name!r}: {refused[name]}")
        elif name not in template:
            close = difflib.get_close_matches(name.strip(" :"), template, n=1, cutoff=0.6)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            problems.append(f"unknown parameter {name!r}{hint}")
    values = {}
    for name, parameter in template.items():
        if name not in given:
            if parameter.required:
                problems.append(f"missing required parameter {name!r}: {parameter.description.split('.')[0]}")
            continue
        try:
            values[name] = _coerce(parameter, given[name])
        except ValueError as error:
            problems.append(f"parameter {name!r}={given[name]!r}: {error}")
    if problems:
        known = ", ".join(template)
        raise ParameterError("\n".join(f"  - {p}" for p in problems) + f"\n  parameters of this template: {known}")
    return values

"""The local model registry: tuned models by display name, each upload a new version.

Layout: ``$TUNEPIPE_HOME/registry/<display name>/<version>/``, where a version folder is a tuned
model folder (LoRA adapter, tokenizer, ``tunepipe_model.json``) and versions count up from 1.
upload_model writes it; deploy_endpoint, evaluate and the CLI read it. Registration copies into
a temporary sibling and renames it into place, so a crash never leaves a half-registered model.

In a Kubeflow Pipelines cluster the registry would vanish with the task's pod: upload_model
writes the same folder, without a version, to its output artifact instead (:func:`export_model`).
"""
from __future__ import annotations

import json
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from components.common.paths import registry_dir

# model_loading (which imports torch) is imported where a model folder is read, not here:
# listing and looking up models stays instant (``tunepipe models list``).

MAX_NAME_LENGTH = 128  # as Vertex's display names
# Matched whole (fullmatch: "$" would take a trailing newline); no "/": a name is one folder.
_NAME_PATTERN = re.compile(rf"[A-Za-z0-9][A-Za-z0-9._@ -]{{0,{MAX_NAME_LENGTH - 1}}}")


@dataclass(frozen=True)
class RegisteredModel:
    """One version of a registered model."""

    display_name: str
    version: int
    path: Path

    @property
    def resource_name(self) -> str:
        return f"{self.display_name}@{self.version}"


def check_display_name(display_name: str) -> None:
    """Raises ValueError unless the name is usable as a registry and endpoint name (a folder
    and a file name): the one rule for create requests, ``tunepipe run`` and upload_model."""
    if not (isinstance(display_name, str) and _NAME_PATTERN.fullmatch(display_name)):
        shown = repr(display_name[:60]) + ("..." if len(display_name) > 60 else "") \
            if isinstance(display_name, str) else type(display_name).__name__
        raise ValueError(
            f"model_display_name {shown} is not valid: use 1 to {MAX_NAME_LENGTH} letters, "
            "digits, spaces or . _ @ -, starting with a letter or digit")


def register_model(model_dir: str | Path, display_name: str, extra_metadata: dict) -> RegisteredModel:
    """Copies a tuned model folder into the registry as the next version of ``display_name``."""
    check_display_name(display_name)
    model_root = registry_dir() / display_name
    model_root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".upload-", dir=model_root))
    try:
        shutil.copytree(model_dir, staging, dirs_exist_ok=True)
        while True:
            version = max(_versions(model_root), default=0) + 1
            _record_metadata(staging, extra_metadata, display_name=display_name, version=version)
            try:
                staging.rename(model_root / str(version))
                break
            except OSError:  # a concurrent upload took this version number
                continue
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return RegisteredModel(display_name, version, model_root / str(version))


def export_model(model_dir: str | Path, destination: str | Path, display_name: str,
                 extra_metadata: dict) -> None:
    """Copies a tuned model folder to ``destination`` with what registration records (no
    version: there is no registry to count them)."""
    check_display_name(display_name)
    shutil.copytree(model_dir, destination, dirs_exist_ok=True)
    _record_metadata(Path(destination), extra_metadata, display_name=display_name)


def _record_metadata(model_dir: Path, extra_metadata: dict, **identity) -> None:
    """Adds ``extra_metadata`` and ``identity`` to the folder's ``tunepipe_model.json``."""
    from components.common.model_loading import TUNED_MODEL_METADATA, read_tuned_model_metadata

    metadata = read_tuned_model_metadata(model_dir)
    metadata.update(extra_metadata, **identity)
    (model_dir / TUNED_MODEL_METADATA).write_text(json.dumps(metadata, indent=2, sort_keys=True))


def _versions(model_root: Path) -> list[int]:
    return [int(p.name) for p in model_root.iterdir() if p.name.isdigit()]


def list_models(all_versions: bool = False) -> list[RegisteredModel]:
    """The latest version of every registered model, by name; ``all_versions``: every version,
    by name, then version."""
    root = registry_dir()
    if not root.exists():
        return []
    models = []
    for model_root in sorted(p for p in root.iterdir() if p.is_dir()):
        versions = sorted(_versions(model_root))
        models += [RegisteredModel(model_root.name, version, model_root / str(version))
                   for version in (versions if all_versions else versions[-1:])]
    return models


def get_model(display_name: str, version: int | None = None) -> RegisteredModel:
    """A registered model by name (latest version unless ``version``)."""
    model_root = registry_dir() / display_name
    versions = _versions(model_root) if model_root.is_dir() else []
    if not versions:
        known = ", ".join(m.display_name for m in list_models()) or "none yet"
        raise LookupError(f"No registered model named {display_name!r} (registered: {known}; "
                          f"registry: {registry_dir()})")
    chosen = version if version is not None else max(versions)
    if chosen not in versions:
        raise LookupError(f"Model {display_name!r} has no version {chosen} (versions: {sorted(versions)})")
    return RegisteredModel(display_name, chosen, model_root / str(chosen))


def resolve_model_dir(name_or_path: str) -> Path:
    """A tuned model folder from a path, ``NAME`` or ``NAME@VERSION`` in the registry."""
    from components.common.model_loading import TUNED_MODEL_METADATA

    path = Path(name_or_path).expanduser()
    if (path / TUNED_MODEL_METADATA).exists():
        return path
    name, separator, version = name_or_path.rpartition("@")
    if separator and version.isdigit() and not (registry_dir() / name_or_path).is_dir():
        return get_model(name, int(version)).path
    return get_model(name_or_path).path

"""`tunepipe publish`: uploads the Vertex templates to a KFP template registry (Artifact
Registry's ``https://REGION-kfp.pkg.dev/PROJECT/REPO``) with ``kfp.registry.RegistryClient``."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pipelines.templates import COMPILED_DIR, VERTEX_SUBDIR, pipeline_factories


@dataclass(frozen=True)
class Published:
    """One uploaded template: its file, and the package and version the registry answered."""

    path: Path
    package: str
    version: str


def vertex_templates(compiled_dir: Path = COMPILED_DIR) -> list[Path]:
    """Every pipeline's Vertex template, in ``compiled_dir/vertex/``."""
    paths = [compiled_dir / VERTEX_SUBDIR / f"{name}.yaml" for name in pipeline_factories()]
    missing = [str(path) for path in paths if not path.exists()]
    if missing:
        raise FileNotFoundError(f"{', '.join(missing)} missing: run `tunepipe compile` first")
    return paths


def publish(host: str, tags: list[str], compiled_dir: Path = COMPILED_DIR,
            auth=None) -> list[Published]:
    """Uploads every Vertex template to the registry at ``host`` with ``tags``.

    ``auth`` is a ``requests`` auth or Google credentials; None means the registry client's
    default (Application Default Credentials for ``*-kfp.pkg.dev`` hosts).
    """
    from kfp.registry import RegistryClient

    client = RegistryClient(host=host, auth=auth)
    published = []
    for path in vertex_templates(compiled_dir):
        package, version = client.upload_pipeline(file_name=str(path), tags=tags or None)
        published.append(Published(path, package, version))
    return published

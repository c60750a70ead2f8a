"""``teacher_model_reference``: which teacher answers, as one string.

===========================================================  ===================================
reference                                                    teacher
===========================================================  ===================================
``text-unicorn@001``, ``text-bison@002``, ... (catalog)      local: the catalog's model (on one
                                                             machine the embedded SmolLM2)
``/path/to/checkpoint`` (folder with config.json)            local: that checkpoint
``/path/to/model.gguf``                                      local: that GGUF file (converted once)
``tuned:NAME[@VERSION]``, ``/path/to/tuned-model``           local: a model tunepipe tuned (the
                                                             local registry's, or its folder)
``local:<any of the three above>``                           local, explicitly
``openai:<base URL>#<model>``                                OpenAI-compatible chat completions,
  e.g. ``openai:http://127.0.0.1:8000/v1#Qwen2.5-7B``        e.g. vLLM, llama.cpp, Ollama,
                                                             tunepipe endpoints (model = its name)
``openai:<base URL>``                                        the same, with the server's only model
``projects/P/locations/L/endpoints/E``                       Vertex AI endpoint (predict)
``projects/P/locations/L/publishers/google/models/M``        Vertex AI publisher model (predict)
``publishers/google/models/M``                               the same in the run's project and
                                                             location (us-central1 when unset)
``vertex:<either Vertex form>``                              Vertex, explicitly
===========================================================  ===================================

The base URL is the API root (``.../v1``) or the full ``.../chat/completions`` URL, a plain URL
as :mod:`.outbound` defines it; Vertex project and location IDs are checked there too. API keys
come from the environment (see :mod:`.openai_teacher`), Vertex credentials from Application
Default Credentials (see :mod:`.vertex_teacher`); neither is ever part of the reference.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from components.generate_rationales.http_calls import RetryPolicy
from components.generate_rationales.openai_teacher import OpenAITeacher, openai_base_url
from components.generate_rationales.outbound import TeacherUrl, check_location, check_project
from components.generate_rationales.teachers import Teacher
from components.generate_rationales.vertex_teacher import VertexTeacher, vertex_resource_url

LOCAL, OPENAI, VERTEX = "local", "openai", "vertex"
DEFAULT_VERTEX_LOCATION = "us-central1"
_ID = r"[A-Za-z0-9][A-Za-z0-9@._-]*"  # an endpoint, publisher or model ID
_VERTEX_RESOURCE = re.compile(rf"^projects/(?P<project>[^/]+)/locations/(?P<location>[^/]+)/"
                              rf"(endpoints/{_ID}|publishers/{_ID}/models/{_ID})$")
_PUBLISHER_MODEL = re.compile(rf"^publishers/{_ID}/models/{_ID}$")


class TeacherReferenceError(ValueError):
    """A teacher_model_reference that names no teacher; the message shows the syntax."""


@dataclass(frozen=True)
class TeacherReference:
    """A parsed reference: the backend kind, its target (model reference, base URL or Vertex
    resource) and, for OpenAI, the model name (None: the server's only model)."""

    kind: str
    target: str
    model: str | None = None


SYNTAX = ("a catalog name (text-unicorn@001), a checkpoint folder, .gguf file or tuned model "
          "(tuned:NAME[@VERSION] or its folder; optionally prefixed local:), "
          "openai:<base URL>[#<model>], or a Vertex resource "
          "projects/P/locations/L/endpoints/E, projects/P/locations/L/publishers/google/models/M "
          "or publishers/google/models/M (optionally prefixed vertex:)")


def parse_teacher_reference(reference: str, project: str = "", location: str = "") -> TeacherReference:
    """The backend a reference names; ``project`` and ``location`` complete a short
    ``publishers/...`` reference. Checks the syntax only (nothing is loaded or called)."""
    value = reference.strip()
    if not value:
        raise TeacherReferenceError(f"teacher_model_reference is empty; use {SYNTAX}")
    if value.startswith("openai:"):
        url, _, model = value.removeprefix("openai:").partition("#")
        try:
            TeacherUrl.parse(url)
        except ValueError as error:
            raise TeacherReferenceError(
                f"{reference!r}: openai: needs an http(s) base URL, e.g. "
                f"openai:http://127.0.0.1:8000/v1#my-model; {error}") from None
        return TeacherReference(OPENAI, url, model.strip() or None)
    if value.startswith(("vertex:", "projects/", "publishers/")):
        resource = value.removeprefix("vertex:")
        if _PUBLISHER_MODEL.match(resource):
            if not project:
                raise TeacherReferenceError(f"{reference!r} needs a project: pass the run's "
                                            "project, or write projects/P/locations/L/" + resource)
            resource = (f"projects/{project}/locations/{location or DEFAULT_VERTEX_LOCATION}/"
                        + resource)
        match = _VERTEX_RESOURCE.match(resource)
        if not match:
            raise TeacherReferenceError(f"{reference!r} is not a Vertex resource; use {SYNTAX}")
        try:
            check_project(match["project"])
            check_location(match["location"])
        except ValueError as error:
            raise TeacherReferenceError(f"{reference!r}: {error}") from None
        return TeacherReference(VERTEX, resource)
    if value.startswith(("http://", "https://")):
        raise TeacherReferenceError(f"{reference!r}: say which API the URL speaks, e.g. "
                                    f"openai:{value}#MODEL; or use {SYNTAX}")
    return TeacherReference(LOCAL, value.removeprefix("local:"))


def outbound_url(parsed: TeacherReference) -> str | None:
    """The URL every call of a teacher goes under (None for a local one): the OpenAI-compatible
    base URL, or ``{Vertex API endpoint}/v1/{resource}``."""
    if parsed.kind == OPENAI:
        return openai_base_url(parsed.target)
    return vertex_resource_url(parsed.target) if parsed.kind == VERTEX else None


def teacher_reference_problems(reference: str, project: str = "", location: str = "",
                               remote: bool = False) -> list[str]:
    """Errors for a teacher reference that names no usable teacher ([] when fine): its syntax;
    a local teacher's model must resolve (``remote``: a run on Vertex AI or a KFP cluster, where
    only the catalog's models are in the image and this machine's loopback is out of reach)."""
    from components.common.model_catalog import (UnknownModelError, check_reference,
                                                 known_references)

    try:
        parsed = parse_teacher_reference(reference, project, location)
    except TeacherReferenceError as error:
        return [f"teacher_model_reference: {error}"]
    if parsed.kind == OPENAI and remote and re.match(
            r"^https?://(127\.|localhost\b|\[::1\])", parsed.target):
        return [f"teacher_model_reference {reference!r} is this machine's loopback; a remote run "
                "cannot reach it: serve the teacher where the pipeline runs can reach it"]
    if parsed.kind != LOCAL:
        return []
    from components.generate_rationales.local_teacher import tuned_model_dir

    try:
        if tuned_model_dir(parsed.target) is not None:
            return [] if not remote else [
                f"teacher_model_reference {reference!r} is a model of this machine; a remote run "
                "cannot read it"]
    except LookupError as error:
        return [f"teacher_model_reference: {error}"]
    if remote:
        if parsed.target not in known_references():
            return [f"teacher_model_reference {reference!r}: a remote run needs one of "
                    f"{', '.join(known_references())}, an openai: URL or a Vertex resource"]
        return []
    try:
        check_reference(parsed.target)
    except UnknownModelError as error:
        return [f"teacher_model_reference: {error} Teachers may also be {SYNTAX}."]
    return []


def make_teacher(reference: str, *, project: str = "", location: str = "", concurrency: int = 8,
                 policy: RetryPolicy = RetryPolicy(), batch_size: int | None = None,
                 device: str | None = None) -> Teacher:
    """The teacher a reference names. ``concurrency`` and ``policy`` apply to HTTP teachers,
    ``batch_size`` and ``device`` to local ones."""
    parsed = parse_teacher_reference(reference, project, location)
    if parsed.kind == OPENAI:
        return OpenAITeacher(parsed.target, parsed.model, concurrency, policy)
    if parsed.kind == VERTEX:
        return VertexTeacher(parsed.target, concurrency, policy)
    from components.common.model_catalog import UnknownModelError
    from components.generate_rationales.local_teacher import DEFAULT_BATCH_SIZE, LocalTeacher

    try:
        return LocalTeacher(parsed.target, batch_size or DEFAULT_BATCH_SIZE, device)
    except (UnknownModelError, LookupError) as error:  # LookupError: a tuned: name not registered
        raise TeacherReferenceError(f"{error} Teachers may also be {SYNTAX}.") from None

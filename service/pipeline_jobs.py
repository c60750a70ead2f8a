"""pipelineJobs: create, get, list and cancel, as Vertex AI Pipelines answers them.

A create request is what the seeds send (``templateUri``, ``runtimeConfig.parameterValues``,
``displayName``, ``encryptionSpec``, ...) or what the SDK's ``PipelineJob.submit()`` sends (the
template inline as ``pipelineSpec``); the ``pipelineJobId`` query parameter names the job (else
the server numbers it). It is checked as ``tunepipe run`` checks a request (unknown fields and
parameters named, datasets that exist, a base model that resolves) plus the allowed roots rule
(:mod:`service.local_paths`) and the teacher rule, and refused with 400 before anything is
stored. Accepted, it is queued (PIPELINE_STATE_PENDING) and runs through the KFP local runner
(:mod:`service.jobs`).

The teacher rule: a distillation job's ``teacher_model_reference`` calls out only under a URL
the operator allowed with ``tunepipe serve --allow-teacher-url URL`` (an OpenAI-compatible URL,
or the Vertex endpoint of a Vertex resource; none by default, see
:mod:`components.generate_rationales.outbound`), and a local teacher's path obeys the allowed
roots (catalog names and ``tuned:NAME`` registry models are always fine).

Only tunepipe's own compiled templates run, because a template holds the code its tasks run:
``templateUri`` names one (``tune-large-model``, a registry URI ending in one, or a file in
``compiled/``), and an inline ``pipelineSpec`` must equal ``compiled/<its name>.yaml``.

The outputs go to ``runtimeConfig.gcsOutputDirectory`` when it is a local folder, else (a
``gs://`` one, or none) to ``outputs/`` in the job's folder beside its ``log.txt``.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

from components.generate_rationales.outbound import TeacherAllowList
from service.http_api import ApiError, Call
from service.job_collections import JobCollection
from service.jobs import LOG_FILE, REQUEST_FILE, JobRunner
from service.local_paths import AllowedRoots
from service.records import RecordStore, new_job_id, timestamp

COLLECTION = "pipelineJobs"
STATE_PREFIX = "PIPELINE_STATE_"
OUTPUTS_DIR = "outputs"
SOURCE = "request body"
ECHOED_FIELDS = ("labels", "serviceAccount", "encryptionSpec", "network", "reservedIpRanges",
                 "templateUri")


def _spec(template: Path) -> dict:
    """A template's pipeline spec as it travels in JSON (integers may come back as floats,
    which compare equal)."""
    from pipelines.templates import pipeline_spec

    return json.loads(json.dumps(pipeline_spec(template)))


def trusted_template(body: dict) -> tuple[Path, dict, str | None]:
    """The compiled template a request names (``templateUri``, or an inline ``pipelineSpec``
    equal to ``compiled/<name>.yaml`` or to ``compiled/vertex/<name>.yaml``), its spec as JSON
    and a note when the request's template is not the one that runs; ApiError 400 for anything
    else.

    A Vertex template runs as the portable template of the same pipeline: the two come from one
    pipeline definition and take the same parameters (and the Vertex SDK cannot read a portable
    template, whose second YAML document is KFP's platform spec).
    """
    from pipelines.submit import vertex_template
    from pipelines.templates import COMPILED_DIR, template_path

    if "pipelineSpec" in body:
        spec = body["pipelineSpec"]
        info = spec.get("pipelineInfo") if isinstance(spec, dict) else None
        name = info.get("name") if isinstance(info, dict) else None
        compiled = COMPILED_DIR / f"{name}.yaml"
        if not (isinstance(name, str) and re.fullmatch(r"[\w-]+", name) and compiled.is_file()):
            known = ", ".join(path.stem for path in sorted(COMPILED_DIR.glob("*.yaml")))
            raise ApiError(400, f"pipelineSpec names the pipeline {name!r}, not one of "
                                f"tunepipe's compiled templates ({known})")
        if spec == _spec(compiled):
            return compiled, spec, None
        vertex = vertex_template(compiled)
        if vertex != compiled and spec == _spec(vertex):
            return compiled, spec, (f"pipelineSpec is compiled/vertex/{name}.yaml: it runs here as "
                                    f"compiled/{name}.yaml, the same pipeline's portable template")
        raise ApiError(400, f"pipelineSpec differs from compiled/{name}.yaml and "
                            f"compiled/vertex/{name}.yaml: this server runs only its own compiled "
                            "templates (a template holds the code its tasks run); submit one of "
                            f'them unchanged, or send "templateUri": "{name}"')
    uri = body.get("templateUri")
    if not isinstance(uri, str) or not uri:
        raise ApiError(400, "the request needs templateUri (a template name such as "
                            "tune-large-model, or a template registry URI ending in one) or "
                            "pipelineSpec")
    try:
        path = template_path(uri)
    except (ValueError, FileNotFoundError) as error:
        raise ApiError(400, f"templateUri: {error}") from None
    if path.resolve().parent != COMPILED_DIR.resolve():
        raise ApiError(400, f"templateUri {uri!r} is a file outside {COMPILED_DIR}: this server "
                            "runs only its own compiled templates (a template holds the code its "
                            "tasks run)")
    return path, _spec(path), None


def location_problems(roots: AllowedRoots, values: dict,
                      output_directory: str | None) -> list[str]:
    """The allowed roots rule over a request's datasets, model paths and output folder."""
    from components.common.model_catalog import known_references
    from pipelines.parameters import DATASET_PARAMETERS, MODEL_PARAMETERS

    named = [(name, values.get(name)) for name in DATASET_PARAMETERS]
    named += [(name, values.get(name)) for name in MODEL_PARAMETERS
              if values.get(name) not in known_references()]
    named.append(("runtimeConfig.gcsOutputDirectory", output_directory))
    problems = [roots.problem(name, value) for name, value in named
                if isinstance(value, str) and value.strip()]
    return [problem for problem in problems if problem]


def teacher_problems(roots: AllowedRoots, teacher_urls: TeacherAllowList,
                     values: dict) -> list[str]:
    """The teacher rule over a request's ``teacher_model_reference`` (its syntax too)."""
    from components.common.model_catalog import known_references
    from components.generate_rationales.local_teacher import TUNED_PREFIX
    from components.generate_rationales.teacher_reference import (LOCAL, outbound_url,
                                                                  parse_teacher_reference)

    reference = values.get("teacher_model_reference")
    if not isinstance(reference, str) or not reference.strip():
        return []
    try:
        parsed = parse_teacher_reference(reference, str(values.get("project") or ""),
                                         str(values.get("location") or ""))
        if parsed.kind != LOCAL:
            problem = teacher_urls.problem(reference, outbound_url(parsed))
        elif parsed.target.startswith(TUNED_PREFIX) or parsed.target in known_references():
            problem = None
        else:
            problem = roots.problem("teacher_model_reference", parsed.target)
    except ValueError as error:  # TeacherReferenceError, or a bad $TUNEPIPE_VERTEX_API_ENDPOINT
        problem = f"teacher_model_reference: {error}"
    return [problem] if problem else []


class PipelineJobs(JobCollection):
    """The pipelineJobs collection: its jobs run through the KFP local runner (service.jobs).
    ``teacher_urls``: where teachers may call out (``--allow-teacher-url``; none by default)."""

    collection = COLLECTION
    state_prefix = STATE_PREFIX
    create_query = ("pipelineJobId",)

    def __init__(self, store: RecordStore, runner: JobRunner, roots: AllowedRoots, *,
                 teacher_urls: TeacherAllowList = TeacherAllowList()):
        super().__init__(store, runner, roots)
        self.teacher_urls = teacher_urls

    def create(self, call: Call) -> dict:
        """Checks the request, stores the job PENDING and queues it; the job."""
        from pipelines.local_run import request_body, request_from_body
        from pipelines.templates import ParameterError

        name = self.job_name(call, call.query.get("pipelineJobId") or new_job_id())
        template, spec, note = trusted_template(call.body)
        try:
            request = request_from_body(call.body, SOURCE, str(template),
                                        str(self.store.folder(name) / OUTPUTS_DIR))
        except ParameterError as error:
            raise ApiError(400, str(error)) from None
        if note:
            request.notes = (*request.notes, note)
        problems = (location_problems(self.roots, request.parameters, request.output_directory)
                    + teacher_problems(self.roots, self.teacher_urls, request.parameters))
        if problems:
            raise ApiError(400, "\n".join(problems))
        request.output_directory = request.pipeline_root  # the job's own request: a local folder
        pipeline_name, values = _prepared(request)
        now = timestamp()
        record = {"name": name, "displayName": request.display_name or pipeline_name,
                  "createTime": now, "updateTime": now, "state": STATE_PREFIX + "PENDING",
                  "pipelineSpec": spec,
                  "runtimeConfig": call.body.get("runtimeConfig", {}),
                  **{field: call.body[field] for field in ECHOED_FIELDS if field in call.body}}
        files = {REQUEST_FILE: json.dumps(request_body(request, pipeline_name, values), indent=2),
                 LOG_FILE: "".join(f"note: {note}\n" for note in request.notes)}
        return self.submit(record, files)


def _prepared(request) -> tuple[str, dict]:
    """:func:`pipelines.local_run.prepare`'s checks; their problems as ApiError 400."""
    from pipelines.local_run import prepare
    from pipelines.templates import ParameterError

    try:
        return prepare(request)
    except (ParameterError, ValueError, FileNotFoundError) as error:
        raise ApiError(400, f"invalid request:\n{error}".rstrip()) from None

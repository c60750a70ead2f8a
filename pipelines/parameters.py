"""Checks of pipeline parameter values, before a run starts.

:func:`check_parameters` returns human-readable errors for values that Vertex's templates would
refuse; :func:`unknown_parameters` names parameters a template does not have and suggests the
intended name for near-misses (the seeds' own request bodies contain ``"accelerator_type:"``).
The compiled pipeline YAML is the authority on which parameters exist; the CLI passes its names to
:func:`unknown_parameters`. :data:`DOCUMENTED_PARAMETERS` lists the documented ones for callers
without a compiled template. docs/parameters.md describes the parameters and these rules.

Values arrive as typed JSON values (request bodies) or strings (command line); both are accepted:
``300`` and ``"300"`` are the same train_steps, ``true``, ``"true"`` and ``"True"`` the same
boolean. Numbers are ASCII (``int()`` would take "３００") and finite, in the documented ranges
below; ``model_display_name`` must be a name the model registry takes
(:func:`components.common.model_registry.check_display_name`), since it becomes a folder.

Evaluation settings without evaluation data: the templates' defaults (evaluation_interval 20,
enable_early_stopping true, enable_checkpoint_selection 'default') are harmless without evaluation
data, and request bodies often spell them out, so only a value that asks for evaluation behaviour
and differs from the default is an error: an evaluation_interval other than 20, or
enable_checkpoint_selection 'true'. Turning things off (enable_early_stopping false,
enable_checkpoint_selection 'false') is accepted. The chat pipeline has no evaluation (Vertex's
chat template has no evaluation parameters): any evaluation parameter given to it, whatever its
value, is refused with that reason (:func:`refused_parameters`).
"""
from __future__ import annotations

import difflib
import math
import re
from typing import Any, Iterable

from components.common.accelerators import DEFAULT_ACCELERATOR_TYPE, accelerator_type_problem
from components.common.model_registry import MAX_NAME_LENGTH, check_display_name

REGIONS = (
    "us-central1", "europe-west4", "asia-southeast1", "us-west1", "europe-west3", "europe-west2",
    "asia-northeast1", "us-east4", "us-west4", "northamerica-northeast1", "europe-west9",
    "europe-west1", "asia-northeast3",
)
CMEK_REGION = "us-central1"
CHECKPOINT_SELECTION_VALUES = ("true", "false", "default")
MAX_CONTEXT_LENGTHS = ("", "8k", "32k")

CHAT_PIPELINE = "tune-large-chat-model"

# Numeric ranges. Vertex documents no maximum for these; each bound is far beyond what a tuning
# run needs and keeps one finite (a job runs its steps one after another).
MAX_TRAIN_STEPS = 100_000  # train_steps, 1 to this
MAX_EVALUATION_INTERVAL = MAX_TRAIN_STEPS  # evaluation_interval, 1 to this
MAX_EPOCH_COUNT = 100  # a tuningJob's epochCount, 1 to this
MAX_LEARNING_RATE_MULTIPLIER = 100.0  # learning_rate_multiplier: above 0, at most this
# Sizes of a request's text: a record keeps it and every list answers it.
MAX_DISPLAY_NAME_LENGTH = MAX_NAME_LENGTH  # Vertex's limit for display names, the registry's
MAX_DESCRIPTION_LENGTH = 16_384
MAX_LABELS, MAX_LABEL_LENGTH = 64, 63  # Vertex's labels: 64 at most, keys and values <= 63
MAX_TEXT_LENGTH = 65_536  # any other string: URIs, accounts, parameter values (default_context)
_INTEGER = re.compile(r"[ \t]*[+-]?([0-9]{1,18})(\.0*)?[ \t]*")
_DECIMAL = re.compile(r"[ \t]*[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?[ \t]*")

_COMMON = {"project", "location", "model_display_name", "dataset_uri", "accelerator_type",
           "train_steps", "learning_rate_multiplier", "tensorboard_resource_id",
           "encryption_spec_key_name", "max_context_length"}
_EVALUATION = {"evaluation_data_uri", "evaluation_interval", "enable_early_stopping",
               "enable_checkpoint_selection"}
DOCUMENTED_PARAMETERS: dict[str, frozenset[str]] = {
    "tune-large-model": frozenset(_COMMON | _EVALUATION | {"large_model_reference"}),
    CHAT_PIPELINE: frozenset(_COMMON | {"large_model_reference", "default_context"}),
    "distillation": frozenset(_COMMON | _EVALUATION | {"teacher_model_reference",
                                                        "student_model_reference"}),
}


def _given(values: dict, name: str) -> bool:
    """Whether the user gave a value (None and '' count as not given)."""
    value = values.get(name)
    return value is not None and not (isinstance(value, str) and value.strip() == "")


def _show(value: Any, limit: int = 60) -> str:
    text = repr(value) if isinstance(value, str) else str(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _as_bool(value: Any) -> bool | None:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    return None


def _as_int(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return int(value)
    if isinstance(value, str) and _INTEGER.fullmatch(value):
        return int(value.strip().split(".")[0])
    return None


def _as_float(value: Any) -> float | None:
    """A finite number, from a number or an ASCII decimal string; None otherwise."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        return None
    if isinstance(value, str) and not _DECIMAL.fullmatch(value):
        return None
    try:
        number = float(value)
    except OverflowError:  # an integer beyond any float
        return None
    return number if math.isfinite(number) else None


def integer_problem(name: str, value: Any, maximum: int) -> str | None:
    """Why ``value`` is not an integer from 1 to ``maximum`` (None when it is)."""
    number = _as_int(value)
    if number is None or not 1 <= number <= maximum:
        return f"{name} must be an integer from 1 to {maximum}, not {_show(value)}"
    return None


def multiplier_problem(name: str, value: Any) -> str | None:
    """Why ``value`` is not a learning rate multiplier: a number above 0, at most
    :data:`MAX_LEARNING_RATE_MULTIPLIER` (None when it is)."""
    number = _as_float(value)
    if number is None or not 0 < number <= MAX_LEARNING_RATE_MULTIPLIER:
        return (f"{name} must be a number above 0 and at most {MAX_LEARNING_RATE_MULTIPLIER:g}, "
                f"not {_show(value)}")
    return None


def text_problems(value: Any, where: str, limit: int = MAX_TEXT_LENGTH) -> list[str]:
    """Errors for the strings in ``value`` (nested objects and lists, keys included) longer
    than ``limit`` characters, each named by its path."""
    if isinstance(value, str):
        return [f"{where} has {len(value)} characters; at most {limit} are accepted"] \
            if len(value) > limit else []
    if isinstance(value, dict):
        return [problem for key, item in value.items()
                for problem in text_problems(key, f"a key of {where}", limit)
                + text_problems(item, f"{where}.{key[:40]}", limit)]
    if isinstance(value, list):
        return [problem for index, item in enumerate(value)
                for problem in text_problems(item, f"{where}[{index}]", limit)]
    return []


def labels_problems(labels: Any, where: str = "labels") -> list[str]:
    """Errors for ``labels`` as Vertex takes them: an object of at most :data:`MAX_LABELS`
    string keys and values of 1 to :data:`MAX_LABEL_LENGTH` characters (values may be empty)."""
    if not isinstance(labels, dict):
        return [f"{where} must be an object of string keys and values"]
    if len(labels) > MAX_LABELS:
        return [f"{where} has {len(labels)} labels; at most {MAX_LABELS} are accepted"]
    problems = []
    for key, value in labels.items():
        if not 1 <= len(key) <= MAX_LABEL_LENGTH:
            problems.append(f"{where} key {_show(key)} must have 1 to {MAX_LABEL_LENGTH} "
                            "characters")
        if not isinstance(value, str) or len(value) > MAX_LABEL_LENGTH:
            problems.append(f"{where}.{key[:40]} must be a string of at most "
                            f"{MAX_LABEL_LENGTH} characters, not {_show(value)}")
    return problems


def _text(value: Any) -> str:
    return str(value).strip() if value is not None else ""


def check_parameters(pipeline_name: str, values: dict) -> list[str]:
    """Human-readable errors for parameter values the pipeline would refuse ([] when fine)."""
    errors: list[str] = []
    chat = pipeline_name == CHAT_PIPELINE

    location = _text(values.get("location"))
    if _given(values, "location") and location not in REGIONS:
        errors.append(f"location {_show(values['location'])} is not a supported region; use one "
                      f"of: {', '.join(REGIONS)}")

    accelerator = values.get("accelerator_type") if _given(values, "accelerator_type") \
        else DEFAULT_ACCELERATOR_TYPE
    problem = accelerator_type_problem(accelerator)
    if problem:
        errors.append(problem)

    if _given(values, "encryption_spec_key_name"):
        if accelerator == "TPU":
            errors.append("encryption_spec_key_name (CMEK) is not supported with accelerator_type "
                          "'TPU' (TPU tuning runs in europe-west4); use 'GPU' or drop the key")
        if _given(values, "location") and location != CMEK_REGION:
            errors.append(f"encryption_spec_key_name (CMEK) is only supported in {CMEK_REGION}, "
                          f"not in location {_show(values['location'])}")

    if _given(values, "model_display_name"):
        try:
            check_display_name(str(values["model_display_name"]))
        except ValueError as error:
            errors.append(str(error))
    problems = [integer_problem(name, values[name], maximum) for name, maximum in
                (("train_steps", MAX_TRAIN_STEPS), ("evaluation_interval", MAX_EVALUATION_INTERVAL))
                if name in values]
    if "learning_rate_multiplier" in values:
        problems.append(multiplier_problem("learning_rate_multiplier",
                                           values["learning_rate_multiplier"]))
    errors += [problem for problem in problems if problem]
    errors += [problem for name, value in values.items()
               for problem in text_problems(value, name)]
    if "enable_early_stopping" in values and _as_bool(values["enable_early_stopping"]) is None:
        errors.append(f"enable_early_stopping must be true or false, not "
                      f"{_show(values['enable_early_stopping'])}")
    selection = None
    if "enable_checkpoint_selection" in values:
        raw = values["enable_checkpoint_selection"]
        selection = (str(raw).lower() if isinstance(raw, bool) else _text(raw).lower())
        if selection not in CHECKPOINT_SELECTION_VALUES:
            errors.append(f"enable_checkpoint_selection must be 'true', 'false' or 'default', "
                          f"not {_show(raw)}")
            selection = None
    if "max_context_length" in values:
        length = _text(values["max_context_length"]).lower()
        if length not in MAX_CONTEXT_LENGTHS:
            errors.append(f"max_context_length must be '8k', '32k' or empty (implied by the "
                          f"model name), not {_show(values['max_context_length'])}")

    has_eval_data = _given(values, "evaluation_data_uri")
    interval_changed = ("evaluation_interval" in values and
                        _as_int(values["evaluation_interval"]) not in (None, 20))
    if chat:
        refused = refused_parameters(pipeline_name)
        errors += [f"parameter {name!r}: {refused[name]}" for name in values if name in refused]
    elif not has_eval_data:
        if interval_changed:
            errors.append(f"evaluation_interval={_show(values['evaluation_interval'])} needs "
                          "evaluation_data_uri (there is no evaluation without evaluation data)")
        if selection == "true":
            errors.append("enable_checkpoint_selection='true' needs evaluation_data_uri (the best "
                          "checkpoint is chosen by its evaluation)")
    return errors


def refused_parameters(pipeline_name: str) -> dict[str, str]:
    """Parameters a pipeline deliberately lacks, each with the reason to give when one is passed.

    Chat tuning has no evaluation data: tune-large-chat-model refuses the evaluation parameters
    of tune-large-model (Vertex's chat template has none of them).
    """
    if pipeline_name != CHAT_PIPELINE:
        return {}
    return {name: f"chat tuning has no evaluation data: {CHAT_PIPELINE} takes no {name} "
                  "(Vertex's chat template has no evaluation parameters); remove it"
            for name in sorted(_EVALUATION)}


def _normalized(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


def suggest_parameter(name: str, known: Iterable[str]) -> str | None:
    """The known parameter ``name`` was probably meant to be, or None."""
    known = sorted(known)
    by_normal = {_normalized(k): k for k in known}
    if _normalized(name) in by_normal:  # case, punctuation, stray ':' or spaces
        return by_normal[_normalized(name)]
    match = difflib.get_close_matches(name.strip().lower(), known, n=1, cutoff=0.75)
    if match:
        return match[0]
    normal = _normalized(name)
    extended = [k for k in known if len(normal) >= 6 and _normalized(k).startswith(normal)]
    return extended[0] if len(extended) == 1 else None  # a shortened name: learning_rate


def unknown_parameters(values: dict, known: set[str]) -> list[str]:
    """One error line per parameter in ``values`` that is not in ``known`` ([] when none)."""
    errors = []
    for name in values:
        if name in known:
            continue
        suggestion = suggest_parameter(name, known)
        hint = f"; did you mean {suggestion!r}?" if suggestion else \
            f"; known parameters: {', '.join(sorted(known))}"
        errors.append(f"unknown parameter {name!r}{hint}")
    return errors


DATASET_PARAMETERS = ("dataset_uri", "evaluation_data_uri")
MODEL_PARAMETERS = ("large_model_reference", "student_model_reference")  # the teacher's own
# syntax (catalog names, checkpoints, OpenAI-compatible URLs, Vertex resources) is checked by
# components.generate_rationales.teacher_reference.teacher_reference_problems.


def input_problems(values: dict, remote: bool = False,
                   unchecked_gcs: list[str] | None = None) -> list[str]:
    """Errors for datasets that cannot be read and base models that cannot be resolved ([] when
    fine): a local path must exist, a gs:// object must exist (with these credentials). A
    ``remote`` run (Vertex AI or a KFP cluster) cannot read this machine's files, so there a
    dataset must be gs:// and a model a catalog name. With ``unchecked_gcs`` (a dry run without
    Google credentials) gs:// objects are not looked up but added to it."""
    from components.common import storage
    from components.common.model_catalog import (UnknownModelError, check_reference,
                                                 known_references)

    problems = []
    for name in DATASET_PARAMETERS:
        if not _given(values, name):
            continue
        uri = _text(values[name])
        if remote and not storage.is_gcs(uri):
            problems.append(f"{name} {uri!r} is a local path; a remote run reads gs:// only "
                            "(upload it: gcloud storage cp FILE gs://BUCKET/)")
            continue
        if unchecked_gcs is not None and storage.is_gcs(uri):
            unchecked_gcs.append(uri)
            continue
        try:
            if not storage.exists(uri):
                problems.append(f"{name} {uri!r} does not exist")
        except (ValueError, OSError) as error:  # a malformed URI, no credentials
            problems.append(f"{name} {uri!r}: {error}")
    for name in MODEL_PARAMETERS:
        if not _given(values, name):
            continue
        reference = _text(values[name])
        if remote:  # the image holds the catalog's models; this machine's files are not there
            if reference not in known_references():
                problems.append(f"{name} {reference!r}: a remote run needs one of "
                                f"{', '.join(known_references())}")
            continue
        try:
            check_reference(reference)
        except UnknownModelError as error:
            problems.append(f"{name}: {error}")
    return problems

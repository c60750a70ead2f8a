"""The generate_rationales KFP component: a thin wrapper over
:func:`components.generate_rationales.rationales.generate_rationales_for_pipeline`."""
from kfp import dsl

from components.common.images import BASE_IMAGE


@dsl.component(base_image=BASE_IMAGE)
def generate_rationales(
    validated_dataset: dsl.Input[dsl.Dataset],
    teacher_model_reference: str,
    rationale_dataset: dsl.Output[dsl.Dataset],
    report: dsl.Output[dsl.Markdown],
    metrics: dsl.Output[dsl.Metrics],
    project: str = "",
    location: str = "",
    few_shot_count: int = 3,
    seed: int = 0,
    agreement_examples: int = 100,
    max_output_tokens: int = 256,
    temperature: float = 0.0,
    concurrency: int = 8,
    request_timeout_seconds: float = 120.0,
    max_retries: int = 5,
):
    """Has the teacher write a rationale for every example, and the label of unlabeled ones.

    Few-shot chain-of-thought prompts built from the dataset's labeled examples (distilling
    step-by-step, Hsieh et al. 2023). Labeled examples keep their gold label and get the
    teacher's explanation of it; unlabeled examples get the teacher's answer and reasoning, and
    are excluded (counted in the report) when its reply has no parseable answer. Answers are
    logged as they arrive, so a retried task asks the teacher only what is missing.

    Args:
        validated_dataset: validate_dataset's output folder (``train.jsonl`` is read), or a JSONL
            file: ``input_text`` and optional ``output_text`` per line.
        teacher_model_reference: The teacher: a catalog name (``text-unicorn@001``), checkpoint
            folder or ``.gguf`` file (local, batched); ``openai:<base URL>[#<model>]`` (an
            OpenAI-compatible server; API key from TUNEPIPE_TEACHER_API_KEY or OPENAI_API_KEY);
            or a Vertex AI resource ``projects/P/locations/L/endpoints/E``,
            ``projects/P/locations/L/publishers/google/models/M`` or
            ``publishers/google/models/M``.
        rationale_dataset: Output folder, a validated dataset folder for transform and
            evaluate: ``train.jsonl`` (input_text, output_text, rationale, label_source,
            parse_status, teacher_answer per kept example), ``eval.jsonl`` (the input folder's,
            copied, when it has one), ``report.json`` and ``teacher_calls.jsonl`` (every raw
            teacher reply).
        report: Markdown: counts, calls, tokens, time, parse failures, teacher-vs-gold agreement
            and examples with their rationales.
        metrics: Scalars: examples, kept, excluded, parse failures, agreement rate, calls,
            tokens.
        project: Project of a short ``publishers/...`` teacher reference.
        location: Region of a short ``publishers/...`` teacher reference ('': us-central1).
        few_shot_count: Labeled examples shown to the teacher in each prompt.
        seed: Seeds the choice of demonstrations and agreement checks, and sampling.
        agreement_examples: Labeled examples also asked without their label, to measure how
            often the teacher agrees with the gold labels (-1: all, 0: none).
        max_output_tokens: Longest teacher reply, in tokens.
        temperature: Teacher sampling temperature (0: greedy).
        concurrency: Teacher calls in flight at once (HTTP teachers).
        request_timeout_seconds: Time limit of one HTTP call.
        max_retries: Retries of an HTTP call after 429, 5xx or a timeout, with backoff.
    """
    from components.common.markdown import write_report
    from components.generate_rationales.http_calls import RetryPolicy
    from components.generate_rationales.rationales import (RationaleSettings,
                                                           generate_rationales_for_pipeline,
                                                           scalar_metrics)
    from components.generate_rationales.report import render_markdown
    from components.generate_rationales.teachers import TeacherSettings

    settings = RationaleSettings(few_shot_count=few_shot_count,
                                 agreement_examples=agreement_examples,
                                 teacher=TeacherSettings(max_output_tokens=max_output_tokens,
                                                         temperature=temperature, seed=seed))
    policy = RetryPolicy(max_retries=max_retries, timeout_seconds=request_timeout_seconds)
    run = generate_rationales_for_pipeline(validated_dataset.path, teacher_model_reference,
                                           rationale_dataset.path, settings, project=project,
                                           location=location, concurrency=concurrency,
                                           policy=policy)
    write_report(report.path, render_markdown(run.report))
    scalars = scalar_metrics(run.report)
    for name, value in scalars.items():
        metrics.log_metric(name, value)
    rationale_dataset.metadata.update({"teacher": run.report["teacher"]["description"], **scalars})

"""tune-large-model: Vertex's pipeline template for tuning text and code generation models."""
from kfp import dsl
from kfp.dsl import graph_component

from components.common.images import BASE_IMAGE
from components.deploy_endpoint.component import deploy_endpoint
from components.evaluate.component import evaluate
from components.generate_rationales.component import generate_rationales
from components.select_checkpoint.component import select_checkpoint
from components.transform.component import transform
from components.upload_model.component import upload_model
from components.validate_dataset.component import validate_dataset
from pipelines.vertex import (PORTABLE, VERTEX, tune_as_custom_job, tune_as_task,
                              upload_and_deploy_on_vertex)


def tuning_tasks(*, target: str, dataset_format: str, default_context, project,
                 model_display_name, dataset_uri, location, large_model_reference,
                 accelerator_type, train_steps, learning_rate_multiplier, evaluation_data_uri,
                 evaluation_interval, enable_early_stopping, enable_checkpoint_selection,
                 tensorboard_resource_id, encryption_spec_key_name, max_context_length,
                 teacher_model_reference=None) -> None:
    """The tasks the tuning templates share: validate, transform, tune, evaluate, select a
    checkpoint, upload and deploy; with a ``teacher_model_reference`` (distillation), the
    teacher's rationales between validate and transform.

    Called inside a pipeline function (KFP builds the pipeline when it is decorated, so this is
    defined first); the arguments are its parameters or constants (``dataset_format`` always a
    constant: ``text``, ``chat`` or ``distillation``; ``large_model_reference`` is the student
    in distillation). ``target`` (:mod:`pipelines.vertex`) says where tune, upload and deploy
    run: ``portable`` as tasks of the template (the tuner asks for the accelerators of the
    accelerator_type's machine as task resources), ``vertex`` as a Vertex CustomJob on that
    machine and in the Vertex Model Registry and endpoints.
    """
    if target not in (PORTABLE, VERTEX):
        raise ValueError(f"target must be {PORTABLE!r} or {VERTEX!r}, got {target!r}")
    validated = validate_dataset(
        dataset_uri=dataset_uri,
        evaluation_data_uri=evaluation_data_uri,
        dataset_format=dataset_format,
        large_model_reference=large_model_reference,
        max_context_length=max_context_length,
        default_context=default_context,
    ).set_display_name("Validate Dataset").set_caching_options(False)
    # What transform and evaluate read: the validated examples or, in distillation, the same
    # examples with the teacher's rationales and labels (a folder of the same layout).
    examples = validated.outputs["validated_dataset"]
    if teacher_model_reference is not None:
        examples = generate_rationales(
            validated_dataset=examples,
            teacher_model_reference=teacher_model_reference,
            project=project,
            location=location,
        ).set_display_name("Generate Rationales").set_caching_options(False).outputs[
            "rationale_dataset"]

    tokenized = transform(
        validated_dataset=examples,
        dataset_format=dataset_format,
        large_model_reference=large_model_reference,
        max_context_length=max_context_length,
        default_context=default_context,
    ).set_display_name("Transform").set_caching_options(False)
    tune_inputs = dict(
        tokenized_dataset=tokenized.outputs["tokenized_dataset"],
        large_model_reference=large_model_reference,
        train_steps=train_steps,
        learning_rate_multiplier=learning_rate_multiplier,
        evaluation_interval=evaluation_interval,
        enable_early_stopping=enable_early_stopping,
        accelerator=accelerator_type,
        max_context_length=max_context_length,
        tensorboard_resource_id=tensorboard_resource_id,
    )
    if target == VERTEX:
        tuned_model = tune_as_custom_job(
            tune_inputs, accelerator_type=accelerator_type, project=project,
            encryption_spec_key_name=encryption_spec_key_name,
            tensorboard_resource_id=tensorboard_resource_id)
    else:
        tuned_model = tune_as_task(tune_inputs, accelerator_type=accelerator_type)

    evaluated = evaluate(
        tuned_model=tuned_model,
        validated_dataset=examples,
        tokenized_dataset=tokenized.outputs["tokenized_dataset"],
        large_model_reference=large_model_reference,
        max_context_length=max_context_length,
    ).set_display_name("Evaluate").set_caching_options(False)

    selected = select_checkpoint(
        tuned_model=tuned_model,
        evaluation_results=evaluated.outputs["evaluation_results"],
        enable_checkpoint_selection=enable_checkpoint_selection,
        large_model_reference=large_model_reference,
    ).set_display_name("Select Checkpoint").set_caching_options(False)

    if target == VERTEX:
        upload_and_deploy_on_vertex(
            selected.outputs["selected_model"], model_display_name=model_display_name,
            project=project, location=location, encryption_spec_key_name=encryption_spec_key_name)
        return
    uploaded = upload_model(
        selected_model=selected.outputs["selected_model"],
        validated_dataset=validated.outputs["validated_dataset"],
        evaluation_results=evaluated.outputs["evaluation_results"],
        model_display_name=model_display_name,
        project=project,
        location=location,
        dataset_uri=dataset_uri,
    ).set_display_name("Upload Model").set_caching_options(False)

    deploy_endpoint(
        registered_model=uploaded.outputs["registered_model"],
        model_display_name=model_display_name,
        serving_image=BASE_IMAGE,  # compile writes the template's image in its place
    ).set_display_name("Deploy Endpoint").set_caching_options(False)


def build_tune_large_model(target: str) -> graph_component.GraphComponent:
    """The tune-large-model pipeline for ``target`` (``portable`` or ``vertex``)."""

    @dsl.pipeline(
        name="tune-large-model",
        description="Tunes a large language model for text or code generation with LoRA, "
                    "evaluates it against the base model, registers it and deploys it to an "
                    "endpoint.",
    )
    def tune_large_model(
        project: str,
        model_display_name: str,
        dataset_uri: str,
        location: str = "",
        large_model_reference: str = "text-bison@002",
        accelerator_type: str = "GPU",
        train_steps: int = 300,
        learning_rate_multiplier: float = 1.0,
        evaluation_data_uri: str = "",
        evaluation_interval: int = 20,
        enable_early_stopping: bool = True,
        enable_checkpoint_selection: str = "default",
        tensorboard_resource_id: str = "",
        encryption_spec_key_name: str = "",
        max_context_length: str = "",
    ):
        """Tunes a large language model for text or code generation.

        Args:
            project: Project id; on the local runner any string, recorded with the model.
            model_display_name: Display name of the uploaded model; the endpoint gets the same name.
            dataset_uri: JSONL training data, ``{"input_text", "output_text"}`` per line; a
                ``gs://`` URI or a local path. 10 to 10,000 examples.
            location: Model upload region (one of Vertex's 13 tuning regions); empty means the
                pipeline job's region (us-central1 on the local runner).
            large_model_reference: Base model: a Vertex name (text-bison@002, code-bison@002, their
                -32k variants...) from the model catalog, a checkpoint folder or a GGUF file.
            accelerator_type: ``GPU`` (8x A100 80GB in us-central1, batch size 8) or ``TPU``
                (TPU v3 pod in europe-west4, batch size 24 for 8k models). Locally the tuner uses
                the local device and keeps the batch size.
            train_steps: Optimizer steps; examples seen = train_steps x batch size.
            learning_rate_multiplier: Multiplies the model's recommended learning rate.
            evaluation_data_uri: JSONL evaluation data (10 to 250 examples), optional.
            evaluation_interval: Steps between evaluations; needs evaluation_data_uri.
            enable_early_stopping: Stop when eval token accuracy stops improving enough between two
                evaluations; needs evaluation_data_uri.
            enable_checkpoint_selection: ``true``: the checkpoint with the best evaluation;
                ``false``: the final one; ``default``: the model's default.
            tensorboard_resource_id: TensorBoard to receive the metrics (locally: recorded; the
                events are in the tune step's output).
            encryption_spec_key_name: CMEK key name; only in us-central1 and never with TPU.
            max_context_length: ``8k`` or ``32k``; empty means what the model name implies.
        """
        tuning_tasks(
            target=target, dataset_format="text", default_context="", project=project,
            model_display_name=model_display_name, dataset_uri=dataset_uri, location=location,
            large_model_reference=large_model_reference, accelerator_type=accelerator_type,
            train_steps=train_steps, learning_rate_multiplier=learning_rate_multiplier,
            evaluation_data_uri=evaluation_data_uri, evaluation_interval=evaluation_interval,
            enable_early_stopping=enable_early_stopping,
            enable_checkpoint_selection=enable_checkpoint_selection,
            tensorboard_resource_id=tensorboard_resource_id,
            encryption_spec_key_name=encryption_spec_key_name,
            max_context_length=max_context_length)

    return tune_large_model


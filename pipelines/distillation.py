"""distillation: Vertex's distilling step-by-step template (seed 002; Hsieh et al. 2023).

A large teacher writes a rationale for every training example, and the label of the unlabeled
ones (:mod:`components.generate_rationales`); a small student is then tuned multi-task on the
same inputs with two task prefixes, label prediction and rationale generation, the loss
``alpha * label loss + (1 - alpha) * rationale loss`` (alpha 0.5;
:mod:`components.common.distillation_tasks`). Evaluation, checkpoint selection and the deployed
endpoint use the label task only, so the student answers with the label at no rationale cost.
The other tasks are tune-large-model's (:func:`pipelines.tune_large_model.tuning_tasks`).
"""
from kfp import dsl
from kfp.dsl import graph_component

from pipelines.tune_large_model import tuning_tasks


def build_distillation(target: str) -> graph_component.GraphComponent:
    """The distillation pipeline for ``target`` (``portable`` or ``vertex``)."""

    @dsl.pipeline(
        name="distillation",
        description="Distills a large teacher model into a smaller student (distilling "
                    "step-by-step): the teacher writes rationales and missing labels, the "
                    "student is tuned with LoRA on labels and rationales, evaluated on labels, "
                    "registered and deployed to an endpoint.",
    )
    def distillation(
        project: str,
        model_display_name: str,
        dataset_uri: str,
        location: str = "",
        accelerator_type: str = "GPU",
        teacher_model_reference: str = "text-unicorn@001",
        student_model_reference: str = "text-bison@002",
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
        """Distills a teacher model into a student model, step by step.

        Args:
            project: Project id; on the local runner any string, recorded with the model.
            model_display_name: Display name of the uploaded model; the endpoint gets the same name.
            dataset_uri: JSONL training data, ``{"input_text", "output_text" (optional)}`` per
                line; a ``gs://`` URI or a local path. Labeled and unlabeled examples may mix:
                the teacher labels the unlabeled ones. input_text at most 7168 tokens,
                output_text at most 1024; at most 10,000 examples.
            location: Model upload region (one of Vertex's 13 tuning regions); empty means the
                pipeline job's region (us-central1 on the local runner).
            accelerator_type: ``GPU`` (8x A100 80GB in us-central1, batch size 8) or ``TPU``
                (TPU v3 pod in europe-west4, batch size 24 for 8k models). Locally the tuner uses
                the local device and keeps the batch size.
            teacher_model_reference: The teacher: a catalog name (text-unicorn@001), a
                checkpoint folder or GGUF file (generated locally, batched),
                ``openai:<base URL>[#<model>]`` (an OpenAI-compatible chat completions server)
                or a Vertex endpoint or publisher model
                (``projects/P/locations/L/endpoints/E``, ``publishers/google/models/M``).
            student_model_reference: The student, tuned: a Vertex name (text-bison@002...)
                from the model catalog, a checkpoint folder or a GGUF file.
            train_steps: Optimizer steps; examples seen = train_steps x batch size (each example
                counts twice: its label task and its rationale task).
            learning_rate_multiplier: Multiplies the student's recommended learning rate.
            evaluation_data_uri: JSONL evaluation data (10 to 250 labeled examples), optional;
                the label task is evaluated.
            evaluation_interval: Steps between evaluations; needs evaluation_data_uri.
            enable_early_stopping: Stop when eval token accuracy stops improving enough between two
                evaluations; needs evaluation_data_uri.
            enable_checkpoint_selection: ``true``: the checkpoint with the best evaluation;
                ``false``: the final one; ``default``: the model's default.
            tensorboard_resource_id: TensorBoard to receive the metrics (locally: recorded; the
                events are in the tune step's output).
            encryption_spec_key_name: CMEK key name; only in us-central1 and never with TPU.
            max_context_length: ``8k`` or ``32k``; empty means what the student's name implies.
        """
        tuning_tasks(
            target=target, dataset_format="distillation", default_context="", project=project,
            model_display_name=model_display_name, dataset_uri=dataset_uri, location=location,
            large_model_reference=student_model_reference,
            teacher_model_reference=teacher_model_reference, accelerator_type=accelerator_type,
            train_steps=train_steps, learning_rate_multiplier=learning_rate_multiplier,
            evaluation_data_uri=evaluation_data_uri, evaluation_interval=evaluation_interval,
            enable_early_stopping=enable_early_stopping,
            enable_checkpoint_selection=enable_checkpoint_selection,
            tensorboard_resource_id=tensorboard_resource_id,
            encryption_spec_key_name=encryption_spec_key_name,
            max_context_length=max_context_length)

    return distillation

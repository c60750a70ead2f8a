"""tune-large-chat-model: Vertex's pipeline template (v3.0.0) for tuning chat and code chat models.

The same tasks as tune-large-model (:func:`pipelines.tune_large_model.tuning_tasks`) on chat
data, with a default context and without evaluation: Vertex's chat template has no evaluation
parameters, so the tuner runs without evaluation data, early stopping is off and the final
checkpoint (the last step's) is the tuned model.
"""
from kfp import dsl
from kfp.dsl import graph_component

from pipelines.tune_large_model import tuning_tasks


def build_tune_large_chat_model(target: str) -> graph_component.GraphComponent:
    """The tune-large-chat-model pipeline for ``target`` (``portable`` or ``vertex``)."""

    @dsl.pipeline(
        name="tune-large-chat-model",
        description="Tunes a large language model for chat or code chat with LoRA on multi-turn "
                    "conversations, registers it and deploys it to an endpoint.",
    )
    def tune_large_chat_model(
        project: str,
        model_display_name: str,
        dataset_uri: str,
        location: str = "",
        large_model_reference: str = "chat-bison@002",
        default_context: str = "",
        accelerator_type: str = "GPU",
        train_steps: int = 300,
        learning_rate_multiplier: float = 1.0,
        tensorboard_resource_id: str = "",
        encryption_spec_key_name: str = "",
        max_context_length: str = "",
    ):
        """Tunes a large language model for chat or code chat.

        Args:
            project: Project id; on the local runner any string, recorded with the model.
            model_display_name: Display name of the uploaded model; the endpoint gets the same name.
            dataset_uri: JSONL training data, ``{"context": optional, "messages": [{"author":
                "user"|"assistant", "content": ...}, ...]}`` per line (authors alternate, user
                first, assistant last); a ``gs://`` URI or a local path. At most 10,000 ``author``
                fields over the dataset.
            location: Model upload region (one of Vertex's 13 tuning regions); empty means the
                pipeline job's region (us-central1 on the local runner).
            large_model_reference: Base model: a Vertex name (chat-bison@002, codechat-bison@002,
                their -32k variants...) from the model catalog, a checkpoint folder or a GGUF file.
            default_context: Context (the system turn) of every example without its own
                ``context``; an example's ``context`` overrides it.
            accelerator_type: ``GPU`` (8x A100 80GB in us-central1, batch size 8) or ``TPU``
                (TPU v3 pod in europe-west4, batch size 24 for 8k models). Locally the tuner uses
                the local device and keeps the batch size.
            train_steps: Optimizer steps; examples seen = train_steps x batch size.
            learning_rate_multiplier: Multiplies the model's recommended learning rate.
            tensorboard_resource_id: TensorBoard to receive the training metrics (locally:
                recorded; the events are in the tune step's output).
            encryption_spec_key_name: CMEK key name; only in us-central1 and never with TPU.
            max_context_length: ``8k`` or ``32k``; empty means what the model name implies.
                Context + messages may have 8192 tokens (8k) or 32768 (32k), each assistant turn
                1024 or 8192; longer examples are truncated and the validation report counts them.
        """
        tuning_tasks(
            target=target, dataset_format="chat", default_context=default_context,
            project=project,
            model_display_name=model_display_name, dataset_uri=dataset_uri, location=location,
            large_model_reference=large_model_reference, accelerator_type=accelerator_type,
            train_steps=train_steps, learning_rate_multiplier=learning_rate_multiplier,
            # No evaluation data: the interval is unused, nothing to stop early on, final
            # checkpoint.
            evaluation_data_uri="", evaluation_interval=20,
            enable_early_stopping=False, enable_checkpoint_selection="false",
            tensorboard_resource_id=tensorboard_resource_id,
            encryption_spec_key_name=encryption_spec_key_name,
            max_context_length=max_context_length)

    return tune_large_chat_model

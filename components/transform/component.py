"""The transform KFP component: a thin wrapper over transform.transform_for_pipeline."""
from kfp import dsl

from components.common.images import BASE_IMAGE


@dsl.component(base_image=BASE_IMAGE)
def transform(
    validated_dataset: dsl.Input[dsl.Dataset],
    dataset_format: str,
    large_model_reference: str,
    max_context_length: str,
    default_context: str,
    tokenized_dataset: dsl.Output[dsl.Dataset],
    label_loss_weight: float = 0.5,
):
    """Tokenizes the validated examples for tuning, with loss masks.

    Applies the base model's chat template (the same formatting the endpoint uses), the default
    context (chat), truncation to the model-class limits, and writes token datasets (token ids
    and a loss mask that is nonzero only on the answers). Deterministic: the same input gives the
    same bytes. The distillation format trains the student of distilling step-by-step on two
    tasks: label prediction and rationale generation (components/common/distillation_tasks.py).

    Args:
        validated_dataset: The validate_dataset output directory (train.jsonl, optional
            eval.jsonl, and the tokens the validator already computed), or for distillation
            generate_rationales' output (train.jsonl with rationales, optional eval.jsonl).
        dataset_format: 'text', 'chat', 'distillation' or 'gemini'.
        large_model_reference: The base model whose tokenizer and chat template are used.
        max_context_length: '' (implied by the model name), '8k' or '32k': picks token limits.
        default_context: Chat: the system context of every example without its own `context`.
            Ignored by the text formats.
        tokenized_dataset: Output directory: train/ and, with evaluation data, eval/ token
            datasets (components/common/artifacts/tokenized_dataset.py).
        label_loss_weight: Distillation only: alpha, the label task's weight in the training
            loss alpha * label loss + (1 - alpha) * rationale loss; in [0, 1].
    """
    from components.transform.transform import transform_for_pipeline

    metadata = transform_for_pipeline(validated_dataset.path, dataset_format,
                                      large_model_reference, max_context_length,
                                      default_context, tokenized_dataset.path,
                                      label_loss_weight)
    tokenized_dataset.metadata.update(metadata)

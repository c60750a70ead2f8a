"""The validate_dataset KFP component: a thin wrapper over validator.validate_for_pipeline."""
from kfp import dsl

from components.common.images import BASE_IMAGE


@dsl.component(base_image=BASE_IMAGE)
def validate_dataset(
    dataset_uri: str,
    evaluation_data_uri: str,
    dataset_format: str,
    large_model_reference: str,
    max_context_length: str,
    validated_dataset: dsl.Output[dsl.Dataset],
    report: dsl.Output[dsl.Markdown],
    default_context: str = "",
):
    """Validates the tuning (and evaluation) data; invalid data stops the pipeline here.

    Checks every documented rule of the format (see components/validate_dataset/validator.py
    for which problems are errors and which are warnings), counts tokens with the base model's
    tokenizer and reports token-length statistics, truncations, warnings and the first errors.

    Args:
        dataset_uri: JSONL training data: a local path, file:// URI or gs:// URI.
        evaluation_data_uri: JSONL evaluation data (10 to 250 examples), or '' for none. Not
            supported for the chat format.
        dataset_format: 'text' (text and code generation), 'chat' (chat and code chat),
            'distillation' or 'gemini'.
        large_model_reference: The base model (e.g. 'text-bison@002'): its tokenizer counts
            tokens and its context class picks the token limits.
        max_context_length: '' (implied by the model name: '-32k' models are 32k), '8k' or '32k'.
        default_context: Chat: the context of every example without its own ``context``;
            it counts toward the token limit of the conversation. Ignored by the text formats.
        validated_dataset: Output directory: train.jsonl, eval.jsonl (only with evaluation
            data), report.json, report.md, histogram.png and tokens/ (tokens transform reuses).
        report: Output Markdown report for people, with the token-length histogram embedded.

    Raises:
        DatasetValidationError: The data is invalid; the message lists the first errors.
    """
    from components.validate_dataset.validator import validate_for_pipeline

    metadata = validate_for_pipeline(dataset_uri, evaluation_data_uri, dataset_format,
                                     large_model_reference, max_context_length,
                                     validated_dataset.path, report.path, default_context)
    validated_dataset.metadata.update(metadata)

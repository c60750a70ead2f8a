"""The evaluate component: the base model and every kept checkpoint on the evaluation set.

The logic lives in :mod:`components.evaluate.evaluation` (metrics), :mod:`.metrics` and
:mod:`.report`; this is the KFP wrapper. Without evaluation data it succeeds and says so.
"""
from kfp import dsl

from components.common.images import BASE_IMAGE


@dsl.component(base_image=BASE_IMAGE)
def evaluate(
    tuned_model: dsl.Input[dsl.Model],
    validated_dataset: dsl.Input[dsl.Dataset],
    tokenized_dataset: dsl.Input[dsl.Dataset],
    large_model_reference: str,
    max_context_length: str,
    evaluation_metrics: dsl.Output[dsl.Metrics],
    classification_metrics: dsl.Output[dsl.ClassificationMetrics],
    evaluation_results: dsl.Output[dsl.Artifact],
    report: dsl.Output[dsl.Markdown],
    temperature: float = 0.0,
    maxOutputTokens: int = 0,
    topP: float = 1.0,
    topK: int = 0,
):
    """Evaluates the base model and the tuned checkpoints on the evaluation set.

    Args:
        tuned_model: tune's output: ``checkpoints.json``, ``checkpoints/step-*/``, ``metrics.jsonl``.
        validated_dataset: validate's output; ``eval.jsonl`` holds the evaluation examples.
        tokenized_dataset: transform's output; ``eval/`` is the tokenized evaluation set.
        large_model_reference: The base model (used when the tune output does not name it).
        max_context_length: '8k', '32k' or '' for what the model name implies: the token limits
            of examples tokenized here.
        evaluation_metrics: base_* and tuned_* (final checkpoint) scalars: eval_total_loss,
            eval_fraction_of_correct_next_step_preds, eval_num_predictions, exact_match, bleu,
            rouge_l and, for classification data, accuracy and macro_f1.
        classification_metrics: The final checkpoint's confusion matrix (classification data).
        evaluation_results: Directory: ``results.json`` (every model's metrics) and
            ``predictions.jsonl`` (input, expected, base and tuned answers, per-example scores).
        report: Markdown: base vs tuned, every checkpoint, loss curves, worst examples.
        temperature: 0 is greedy decoding.
        maxOutputTokens: 0 means the longest expected output in tokens + 16 (at most 1024).
        topP: Nucleus sampling threshold (1.0: off).
        topK: Top-k sampling (0: off).
    """
    from components.common.artifacts.evaluation_results import write_results
    from components.common.artifacts.tuned_model import read_training_metrics
    from components.common.markdown import write_report
    from components.evaluate.evaluation import (GenerationSettings, evaluate_tuning_run,
                                                scalar_metrics)
    from components.evaluate.report import render_report

    settings = GenerationSettings(temperature=temperature, max_output_tokens=maxOutputTokens,
                                  top_p=topP, top_k=topK)
    results, predictions = evaluate_tuning_run(tuned_model.path, validated_dataset.path,
                                               tokenized_dataset.path, large_model_reference,
                                               settings, max_context_length=max_context_length)
    write_results(evaluation_results.path, results, predictions)
    write_report(report.path, render_report(results, predictions,
                                            read_training_metrics(tuned_model.path)))
    for name, value in scalar_metrics(results).items():
        evaluation_metrics.log_metric(name, value)
    evaluation_results.metadata["evaluated"] = bool(results.get("evaluated"))
    if results.get("evaluated"):
        evaluation_results.metadata["tuned_step"] = results["tuned"]["step"]
        classification = results["checkpoints"][-1].get("classification")
        if classification:
            classification_metrics.log_confusion_matrix(classification["categories"],
                                                        classification["confusion_matrix"])
    else:
        evaluation_results.metadata["reason"] = results.get("reason", "")

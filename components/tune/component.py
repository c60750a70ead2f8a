"""The tune component: LoRA-tunes (or fully fine-tunes) the base model on the tokenized dataset."""
from kfp import dsl

from components.common.images import BASE_IMAGE


@dsl.component(base_image=BASE_IMAGE)
def tune(
    tokenized_dataset: dsl.Input[dsl.Dataset],
    large_model_reference: str,
    train_steps: int,
    learning_rate_multiplier: float,
    evaluation_interval: int,
    enable_early_stopping: bool,
    accelerator: str,  # not accelerator_type: see pipelines.vertex.tune_as_task
    max_context_length: str,
    tensorboard_resource_id: str,
    tuned_model: dsl.Output[dsl.Model],
    training_metrics: dsl.Output[dsl.Metrics],
    loss_curve: dsl.Output[dsl.Markdown],
    adapter_size: int = 8,
    tuning_method: str = "lora",
    epoch_count: float = 0.0,
):
    """Tunes a LoRA adapter (or every weight) of the base model for ``train_steps`` steps.

    Uses every local GPU (one torchrun process per GPU when there are several), else one GPU or
    the CPU; on a cloud machine, the accelerator or a clear error (never the CPU instead). A
    retried task resumes from the last checkpoint already in ``tuned_model``.

    Args:
        tokenized_dataset: transform's output: ``train/`` and optionally ``eval/`` token datasets.
        large_model_reference: Base model (catalog name, Vertex alias, folder or GGUF file).
        train_steps: Optimizer steps; examples seen = steps x batch size (see epoch_count).
        learning_rate_multiplier: Multiplies the catalog's recommended learning rate.
        evaluation_interval: Steps between evaluations and checkpoints (with evaluation data).
        enable_early_stopping: Stop when eval token accuracy stops improving.
        accelerator: GPU or TPU (the pipeline's accelerator_type); sets the batch size (8, or 24
            for 8k models on TPU); the environment variable TUNEPIPE_BATCH_SIZE overrides it.
        max_context_length: '8k', '32k' or '' for what the model name implies.
        tensorboard_resource_id: Vertex TensorBoard to receive the metrics (recorded locally).
        tuned_model: Checkpoints, metrics.jsonl, TensorBoard events and the loss curve.
        training_metrics: The final train and eval metrics.
        loss_curve: The loss curve as a report.
        adapter_size: LoRA rank (Vertex/Gemini adapter size): 1, 4, 8 or 16.
        tuning_method: 'lora' or 'full' (every weight; checkpoints hold model/ not adapter/).
        epoch_count: When positive (Gemini's epochCount), the steps are
            ceil(epoch_count x training examples / batch size) instead of train_steps.
    """
    from components.common.artifacts.token_dataset import TokenDataset
    from components.common.artifacts.tokenized_dataset import eval_dir, train_dir
    from components.common.artifacts.tuned_model import read_training_metrics
    from components.common.markdown import write_report
    from components.common.model_catalog import context_class, resolve_model
    from components.tune import settings
    from components.tune.launch import check_cloud_accelerator, tune_on_local_devices
    from components.tune.trainer import TuneConfig
    from components.tune.training_log import loss_curve_report

    check_cloud_accelerator(accelerator)
    model = resolve_model(large_model_reference)
    train_data = str(train_dir(tokenized_dataset.path))
    batch_size = settings.batch_size(context_class(large_model_reference, max_context_length),
                                     accelerator)
    steps = train_steps if epoch_count <= 0 else settings.steps_for_epochs(
        epoch_count, len(TokenDataset(train_data)), batch_size)
    config = TuneConfig(
        train_steps=steps,
        learning_rate=settings.learning_rate(model, learning_rate_multiplier, tuning_method),
        batch_size=batch_size,
        adapter_size=settings.adapter_size(adapter_size),
        method=tuning_method,
        evaluation_interval=evaluation_interval,
        enable_early_stopping=enable_early_stopping,
    )
    eval_data = eval_dir(tokenized_dataset.path)
    result = tune_on_local_devices(
        model.to_dict(), train_data, str(eval_data) if eval_data else None,
        tuned_model.path, config, resume=True,
        run_metadata={"tensorboard_resource_id": tensorboard_resource_id,
                      "accelerator_type": accelerator})

    tuned_model.metadata.update({
        "base_model": model.to_dict(), "final_step": result.final_step,
        "stopped_early": result.stopped_early, "device": result.device, "dtype": result.dtype,
        "precision": result.precision, "batch_size": config.batch_size, "learning_rate": config.learning_rate,
        "train_steps": config.train_steps, "examples_seen": result.final_step * config.batch_size,
        "tuning_method": config.method,
        "adapter_size": config.adapter_size if config.method == "lora" else None,
        "processes": result.world_size, "peak_memory_bytes": result.peak_memory_bytes,
        "tensorboard_resource_id": tensorboard_resource_id,
    })
    records = read_training_metrics(tuned_model.path)
    final_train = [r for r in records if "train_total_loss" in r][-1]
    for name in ("train_total_loss", "train_fraction_of_correct_next_step_preds",
                 "train_num_predictions"):
        training_metrics.log_metric(name, final_train[name])
    if result.checkpoints[-1]["eval"]:
        for name, value in result.checkpoints[-1]["eval"].items():
            training_metrics.log_metric(name, value)
    training_metrics.log_metric("train_seconds", result.train_seconds)
    training_metrics.log_metric("peak_memory_bytes", result.peak_memory_bytes)
    write_report(loss_curve.path, loss_curve_report(tuned_model.path, result, config))

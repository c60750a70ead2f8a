"""The select_checkpoint component: the checkpoint a tuning run returns (see ``selection``)."""
from kfp import dsl

from components.common.images import BASE_IMAGE


@dsl.component(base_image=BASE_IMAGE)
def select_checkpoint(
    tuned_model: dsl.Input[dsl.Model],
    evaluation_results: dsl.Input[dsl.Artifact],
    enable_checkpoint_selection: str,
    large_model_reference: str,
    selected_model: dsl.Output[dsl.Model],
):
    """Copies the chosen checkpoint of a tuning run into ``selected_model``.

    Args:
        tuned_model: tune's output: ``checkpoints.json`` and ``checkpoints/step-*/``.
        evaluation_results: evaluate's output directory (``results.json``).
        enable_checkpoint_selection: ``true``: the checkpoint with the lowest eval_total_loss
            (ties: earlier step); ``false``: the final one; ``default``: selection for
            ``*-bison@001`` models only (the Vertex SDK's rule). Without evaluation data: final.
        large_model_reference: The base model, for ``default``.
        selected_model: A tuned model folder (adapter, tokenizer, tunepipe_model.json with
            ``selection``); metadata: selected_step, final_step, selection_reason, selection_mode.
    """
    from components.select_checkpoint.selection import select_and_copy

    selection = select_and_copy(tuned_model.path, evaluation_results.path,
                                enable_checkpoint_selection, large_model_reference,
                                selected_model.path)
    selected_model.metadata["selected_step"] = selection["selected_step"]
    selected_model.metadata["final_step"] = selection["final_step"]
    selected_model.metadata["selection_mode"] = selection["enable_checkpoint_selection"]
    selected_model.metadata["selection_metric"] = selection["metric"]
    selected_model.metadata["selection_reason"] = selection["reason"]
    print(f"select_checkpoint: {selection['reason']}", flush=True)

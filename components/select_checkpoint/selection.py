"""Which checkpoint a tuning run returns: ``enable_checkpoint_selection`` = true / false / default.

Vertex AI (seeds 000-003, "enable checkpoint selection"): when enabled, the checkpoint with the
best model evaluation performance among all checkpoints created during tuning is returned; when
disabled, the final checkpoint. Here:

- ``true``: the checkpoint with the **lowest eval_total_loss**, ties broken by the earlier step.
  Eval loss is the evaluation every checkpoint has (the tuner records it at each evaluation and
  evaluate recomputes it with the base model's numbers, even where it limits generation); it is
  smooth on Vertex's small eval sets (10 to 250 examples), where exact match moves in steps of
  1/N and saturates on classification sets; it is what the tuner optimizes. Ties go to the
  earlier step: fewer updates, less risk of overfitting. Losses from evaluate's
  ``results.json`` are used when present, else those recorded in ``checkpoints.json``;
  checkpoints without a finite loss are not candidates.
- ``false``: the final checkpoint.
- ``default``: the seeds list ``default`` as a value (seed 003, ENABLE_CHECKPOINT_SELECTION: "un
  valor de cadena que puede ser true, false o default") but never say what it does; seeds
  000-003 only describe enabled and disabled. The Vertex AI SDK (google-cloud-aiplatform,
  ``vertexai.language_models.TuningEvaluationSpec.enable_checkpoint_selection``; leaving it
  unset sends ``default`` to the pipeline) documents it as "If unset, the selection is only
  enabled for `*-bison@001` models." (quoted from memory of the SDK source; it could not be
  checked offline, and it is not in the seeds). So ``default`` selects for ``text-bison@001``,
  ``chat-bison@001``, ``code-bison@001`` and ``codechat-bison@001`` and returns the final
  checkpoint for every other model (``text-bison@002``, the pipelines' default, included).
- Without evaluation data (no eval loss anywhere): the final checkpoint, whatever the mode.
"""
from __future__ import annotations

import json
import math
import os
import re
import shutil
from pathlib import Path
from typing import Sequence

from components.common.artifacts.evaluation_results import RESULTS_FILE, read_results
from components.common.artifacts.tuned_model import (CHECKPOINTS_DIR, CHECKPOINTS_INDEX,
                                                     read_checkpoints)
from components.common.model_loading import TRAINING_STATE, TUNED_MODEL_METADATA
from components.common.storage import staged_local_path

SELECTION_METRIC = "eval_total_loss"
MODES = ("true", "false", "default")
TRAINING_ONLY_FILES = (TRAINING_STATE,)  # optimizer state for resuming; not part of a model
_DEFAULT_SELECTION = re.compile(r"^[a-z]+-bison(-32k)?@001$")


def normalize_mode(mode) -> str:
    """``'true'``, ``'false'`` or ``'default'`` (case and surrounding spaces ignored; booleans ok)."""
    if isinstance(mode, bool):
        return "true" if mode else "false"
    key = str(mode).strip().lower()
    if key not in MODES:
        raise ValueError(f"enable_checkpoint_selection must be 'true', 'false' or 'default', got {mode!r}")
    return key


def default_selection_enabled(model_reference: str) -> bool:
    """What ``default`` means for a model: selection on for ``*-bison@001`` models only."""
    return bool(_DEFAULT_SELECTION.match((model_reference or "").strip()))


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def candidate_losses(checkpoints: Sequence[dict], results: dict | None) -> tuple[dict[int, float], str | None]:
    """``({step: eval loss}, where from)``: evaluate's recomputed losses when it evaluated, else
    the tuner's from ``checkpoints.json``; only finite losses of listed checkpoints."""
    known_steps = {entry["step"] for entry in checkpoints}
    if results and results.get("evaluated"):
        losses = {entry["step"]: float(entry["metrics"][SELECTION_METRIC])
                  for entry in results.get("checkpoints", [])
                  if entry.get("step") in known_steps
                  and _finite((entry.get("metrics") or {}).get(SELECTION_METRIC))}
        if losses:
            return losses, f"evaluate ({RESULTS_FILE})"
    losses = {entry["step"]: float(entry["eval"][SELECTION_METRIC]) for entry in checkpoints
              if _finite((entry.get("eval") or {}).get(SELECTION_METRIC))}
    return losses, (f"tuner ({CHECKPOINTS_INDEX})" if losses else None)


def choose_checkpoint(checkpoints: list[dict], results: dict | None, mode: str,
                      model_reference: str) -> tuple[dict, str]:
    """The checkpoint entry to return and a sentence saying why (see the module doc)."""
    if not checkpoints:
        raise ValueError("the tuning run has no checkpoints")
    mode = normalize_mode(mode)
    final = checkpoints[-1]
    if mode == "false":
        return final, f"enable_checkpoint_selection=false: the final checkpoint (step {final['step']})"
    if mode == "default" and not default_selection_enabled(model_reference):
        return final, (f"enable_checkpoint_selection=default: selection is off for {model_reference} "
                       f"(on only for *-bison@001 models), so the final checkpoint (step {final['step']})")
    prefix = ("enable_checkpoint_selection=true" if mode == "true" else
              f"enable_checkpoint_selection=default: selection is on for {model_reference}")
    losses, _ = candidate_losses(checkpoints, results)
    if not losses:
        return final, (f"{prefix}, but there is no evaluation data (no eval loss): the final "
                       f"checkpoint (step {final['step']})")
    best_step = min(losses, key=lambda step: (losses[step], step))
    chosen = next(entry for entry in checkpoints if entry["step"] == best_step)
    reason = (f"{prefix}: lowest {SELECTION_METRIC} {losses[best_step]:.4f} at step {best_step} "
              f"among {len(losses)} evaluated checkpoint(s) (ties go to the earlier step)")
    if best_step == final["step"]:
        reason += "; it is the final checkpoint"
    else:
        final_loss = losses.get(final["step"])
        reason += (f"; the final checkpoint (step {final['step']}) has "
                   + (f"{final_loss:.4f}" if final_loss is not None else "no eval loss"))
    return chosen, reason


def selection_record(checkpoints: Sequence[dict], results: dict | None, mode: str,
                     model_reference: str, chosen: dict, reason: str) -> dict:
    """What goes into the selected model's metadata under ``selection``."""
    losses, source = candidate_losses(checkpoints, results)
    return {
        "enable_checkpoint_selection": normalize_mode(mode),
        "large_model_reference": model_reference,
        "selected_step": chosen["step"],
        "selected_dir": chosen["dir"],
        "final_step": checkpoints[-1]["step"],
        "metric": SELECTION_METRIC,
        "metric_source": source,
        "candidates": [{"step": entry["step"], SELECTION_METRIC: losses.get(entry["step"])}
                       for entry in checkpoints],
        "reason": reason,
    }


def copy_selected(tuned_model_dir: str | os.PathLike, chosen: dict, selection: dict,
                  target: str | os.PathLike) -> Path:
    """Copies the chosen checkpoint folder to ``target`` (atomically: a temporary sibling renamed
    into place), without training-only files, adding ``selection`` to its metadata."""
    source = Path(tuned_model_dir) / chosen["dir"]
    if not (source / TUNED_MODEL_METADATA).exists():
        raise FileNotFoundError(f"checkpoint folder {source} is missing or not a tuned model folder")
    target = Path(target)
    with staged_local_path(target) as staging:
        nested = {CHECKPOINTS_DIR, CHECKPOINTS_INDEX} if chosen["dir"] in (".", "") else set()
        shutil.copytree(source, staging,
                        ignore=lambda folder, names: [n for n in names if n in TRAINING_ONLY_FILES
                                                      or (Path(folder) == source and n in nested)])
        metadata = json.loads((staging / TUNED_MODEL_METADATA).read_text())
        metadata["selection"] = selection
        (staging / TUNED_MODEL_METADATA).write_text(json.dumps(metadata, indent=2, sort_keys=True))
    return target


def select_and_copy(tuned_model_dir: str | os.PathLike, evaluation_results_dir: str | os.PathLike | None,
                    mode: str, model_reference: str, target: str | os.PathLike) -> dict:
    """The whole step: choose, copy to ``target``, return the selection record."""
    checkpoints = read_checkpoints(tuned_model_dir)["checkpoints"]
    results = read_results(evaluation_results_dir) if evaluation_results_dir is not None else None
    chosen, reason = choose_checkpoint(checkpoints, results, mode, model_reference)
    selection = selection_record(checkpoints, results, mode, model_reference, chosen, reason)
    copy_selected(tuned_model_dir, chosen, selection, target)
    return selection

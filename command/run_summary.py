"""The summary ``tunepipe run`` prints when a run ends: scores, the tuned model and endpoint, how
to prompt it, and where the time went."""
from __future__ import annotations

import json
import os
import shlex
import shutil
import sys
from pathlib import Path


def _example_prompt(dataset_uri: str) -> str:
    """The first example's input (chat: its first message), to show how to prompt the
    endpoint."""
    from components.common import storage

    first = json.loads(storage.read_text(dataset_uri).lstrip("\ufeff").splitlines()[0])
    if "messages" in first:
        return first["messages"][0]["content"]
    return first.get("input_text", "Hello")


def _shell_quote(text: str) -> str:
    """Quotes text for a POSIX shell, with $'...' when it spans lines."""
    if "\n" not in text:
        return shlex.quote(text)
    escaped = text.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n")
    return f"$'{escaped}'"


# The phases a run's time is reported in, and the pipeline tasks each one covers.
PHASE_TASKS = {"validate": ("validate-dataset",), "teacher": ("generate-rationales",),
               "transform": ("transform",), "tune": ("tuning-accelerator", "tune"),
               "evaluate": ("evaluate", "select-checkpoint"),
               "deploy": ("upload-model", "deploy-endpoint")}
PIPELINE_PHASES = {"teacher"}  # phases of some pipelines only: shown when their task ran
SETUP_SECONDS_ENV = "TUNEPIPE_SETUP_SECONDS"  # set by `make run`: its install and compile time


def _duration(seconds: float) -> str:
    minutes, rest = divmod(round(seconds), 60)
    return f"{minutes}m{rest:02d}s" if minutes else f"{rest}s"


def phase_times(task_seconds: dict[str, float], compile_seconds: float,
                setup_seconds: float | None) -> list[tuple[str, float]]:
    """``(phase, seconds)`` in run order: setup (when known), the tuner's compile warm-up, then
    the pipeline's tasks by phase (tune without its warm-up); tasks of no phase under their own
    names."""
    phases = [("setup", setup_seconds)] if setup_seconds is not None else []
    phases.append(("compile", compile_seconds))
    covered = set()
    for phase, tasks in PHASE_TASKS.items():
        covered.update(tasks)
        if phase in PIPELINE_PHASES and not any(task in task_seconds for task in tasks):
            continue
        seconds = sum(task_seconds.get(task, 0.0) for task in tasks)
        phases.append((phase, seconds - compile_seconds if phase == "tune" else seconds))
    phases += [(task, seconds) for task, seconds in task_seconds.items() if task not in covered]
    return phases


def _setup_seconds() -> float | None:
    try:
        return float(os.environ[SETUP_SECONDS_ENV])
    except (KeyError, ValueError):
        return None


def tunepipe_command() -> str:
    """How to call this ``tunepipe`` from the current directory: ``tunepipe`` when that is the
    one on PATH (its environment is active), else its path (``.venv/bin/tunepipe``)."""
    here = Path(sys.argv[0]).resolve() if Path(sys.argv[0]).name == "tunepipe" else \
        Path(sys.executable).with_name("tunepipe")
    on_path = shutil.which("tunepipe")
    if on_path and Path(on_path).resolve() == here.resolve():
        return "tunepipe"
    try:
        return shlex.quote(os.path.relpath(here))
    except ValueError:  # another drive
        return shlex.quote(str(here))


def print_run_summary(run, parameters: dict, held_out=None) -> None:
    """What a finished run (a ``LocalRun`` with these ``parameters``) produced: scores (with a
    ``HeldOutComparison``, the base and tuned replies to held-out conversations), where the
    model is, how to prompt the endpoint, and where the time went."""
    from components.common.model_loading import read_tuned_model_metadata
    from components.common.model_registry import get_model
    from pipelines.parameters import CHAT_PIPELINE
    from components.deploy_endpoint.endpoints import get_endpoint

    model_display_name = parameters["model_display_name"]
    tunepipe = tunepipe_command()
    predict = f"{tunepipe} endpoints predict {shlex.quote(model_display_name)}"
    model = get_model(model_display_name)
    metadata = read_tuned_model_metadata(model.path)
    print("\n" + "=" * 78)
    print(f"Outputs of this run:  {run.run_dir}")
    print(f"Base model:           {metadata['base_model']['reference']} -> "
          f"{metadata['base_model']['source']}")
    if "peak_memory_bytes" in metadata:
        print(f"Tuning:               step {metadata['step']}, batch size {metadata['batch_size']}, "
              f"{metadata['tuning_method']}, peak resident memory "
              f"{metadata['peak_memory_bytes'] / 2**30:.2f} GiB")
    if "precision" in metadata:
        print(f"Precision:            {metadata['precision']}")
    teacher_report = Path(run.run_dir) / "generate-rationales" / "rationale_dataset" / "report.json"
    if teacher_report.is_file():
        for line in teacher_lines(json.loads(teacher_report.read_text())):
            print(line)
    evaluation = metadata.get("evaluation", {})
    for line in evaluation_lines(evaluation, metadata.get("step")):
        print(line)
    if held_out is not None:
        for line in held_out_lines(held_out, metadata.get("step")):
            print(line)
    print(f"Tuned model:          {model.resource_name} in {model.path}")
    endpoint = get_endpoint(model_display_name)
    print(f"Endpoint:             {endpoint.predict_url} (pid {endpoint.pid})")
    example = _shell_quote(_example_prompt(parameters.get("evaluation_data_uri")
                                           or parameters["dataset_uri"]))
    if run.pipeline_name == CHAT_PIPELINE:  # the tuned model expects the context it learned with
        context = parameters.get("default_context", "")
        print("Chat with it:")
        print(f"  {predict} --message {example}"
              + (f" --context {_shell_quote(context)}" if context else ""))
    else:
        print("Prompt it with:")
        print(f"  {predict} --prompt {example}")
    print(f"Stop it with:         {tunepipe} endpoints stop {shlex.quote(model_display_name)}")
    phases = phase_times(run.task_seconds, metadata.get("compile_seconds", 0.0), _setup_seconds())
    if held_out is not None:
        phases.append(("held-out check", held_out.seconds))
    total = sum(seconds for _, seconds in phases)
    print(f"Time by phase ({_duration(total)} in all):")
    print("  " + ", ".join(f"{phase} {_duration(seconds)}" for phase, seconds in phases))
    print("=" * 78)


def held_out_lines(held_out, tuned_step: int | None) -> list[str]:
    """The rule-following rates of the base and tuned replies to held-out conversations (a
    ``HeldOutComparison``), and one conversation's replies side by side."""
    total = len(held_out.prompts)
    lines = [f"Held-out conversations: {held_out.uri} ({total})"]
    if held_out.expected_ending:
        lines.append(f"  replies that end with {held_out.expected_ending!r} "
                     f"(base -> tuned, step {tuned_step}):")
        base, tuned = (held_out.rule_count(replies) for replies in (held_out.base_replies,
                                                                     held_out.tuned_replies))
        lines.append(f"  {'rule followed':42s} {base:3d}/{total} = {base / total:.2f} -> "
                     f"{tuned:3d}/{total} = {tuned / total:.2f}")
    shown = next((i for i in range(total) if held_out.follows_rule(held_out.tuned_replies[i])
                  and not held_out.follows_rule(held_out.base_replies[i])), 0)
    lines.append(f"  conversation {shown + 1}, side by side:")
    for label, text in (("user", held_out.prompts[shown][-1]["content"]),
                        ("base", held_out.base_replies[shown]),
                        ("tuned", held_out.tuned_replies[shown])):
        text_lines = text.strip().splitlines() or [""]
        lines.append(f"    {label + ':':7s}{text_lines[0]}")
        lines += [f"           {line}" for line in text_lines[1:]]
    return lines


def _fraction(count: int, total: int) -> str:
    return f"{count:3d}/{total} = {count / total:.2f}"


def teacher_lines(report: dict) -> list[str]:
    """The teacher of a distillation run, from generate_rationales' report: what it is, what it
    labeled and explained, and how often its answers equal the gold labels (training examples
    asked without their label) and the evaluation labels."""
    teacher, examples = report["teacher"], report["examples"]
    lines = [f"Teacher:              {teacher.get('reference', teacher['identity'])}: "
             f"{teacher['description']}",
             f"  {examples['labeled']} labeled + {examples['unlabeled']} unlabeled examples -> "
             f"{examples['kept']} kept ({examples['with_rationale']} with a rationale), "
             f"{examples['excluded']} excluded (no parseable answer)"]
    agreement, held_out = report["agreement"], report.get("held_out") or {}
    if agreement["checked"]:
        lines.append(f"  {'teacher = gold label (training data)':42s} "
                     f"{_fraction(agreement['agreed'], agreement['checked'])}")
    if held_out.get("examples"):
        lines.append(f"  {'teacher = label (evaluation set)':42s} "
                     f"{_fraction(held_out['correct'], held_out['examples'])}")
    return lines


def evaluation_lines(evaluation: dict, selected_step: int | None) -> list[str]:
    """Base-versus-tuned score lines from evaluate's results."""
    if not evaluation or evaluation.get("evaluated") is False:
        return [f"Evaluation:           {evaluation.get('reason', 'none')}"]
    base = evaluation.get("base", {}).get("metrics", evaluation.get("base", {}))
    tuned = {}
    for checkpoint in evaluation.get("checkpoints", []):
        if checkpoint.get("step") == selected_step:
            tuned = checkpoint.get("metrics", {})
    lines = [f"Scores on the evaluation set (base -> tuned, step {selected_step}):"]
    for name in ("exact_match", "accuracy", "macro_f1", "rouge_l", "eval_total_loss",
                 "eval_fraction_of_correct_next_step_preds"):
        if name in base or name in tuned:
            lines.append(f"  {name:42s} {base.get(name, float('nan')):8.4f} -> {tuned.get(name, float('nan')):8.4f}")
    return lines

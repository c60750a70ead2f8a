"""The evaluation report: Markdown for the KFP UI (base vs tuned, every checkpoint, the loss
curves as an embedded PNG, the confusion matrix and the examples the tuned model gets most wrong).
"""
from __future__ import annotations

import base64
import io
import json
import math
import os
from pathlib import Path
from typing import Sequence

from components.common.markdown import table_cell

METRICS_JSONL = "metrics.jsonl"
WORST_EXAMPLES = 10

_COLUMNS = (
    ("eval_total_loss", "eval loss", "{:.4f}"),
    ("eval_fraction_of_correct_next_step_preds", "token accuracy", "{:.4f}"),
    ("eval_num_predictions", "predicted tokens", "{:.0f}"),
    ("exact_match", "exact match", "{:.3f}"),
    ("bleu", "BLEU", "{:.2f}"),
    ("rouge_l", "ROUGE-L", "{:.3f}"),
    ("accuracy", "accuracy", "{:.3f}"),
    ("macro_f1", "macro-F1", "{:.3f}"),
)


def read_training_metrics(tuned_model_dir: str | os.PathLike) -> list[dict]:
    """The records of ``metrics.jsonl`` in a tune output ([] when absent); bad lines skipped."""
    path = Path(tuned_model_dir) / METRICS_JSONL
    if not path.exists():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), (int, float)):
            records.append(record)
    return records


def loss_curve_png(records: Sequence[dict]) -> bytes | None:
    """A PNG of train and eval loss per step (None when there is nothing to plot)."""
    train = [(r["step"], r["train_total_loss"]) for r in records if _finite(r.get("train_total_loss"))]
    evals = [(r["step"], r["eval_total_loss"]) for r in records if _finite(r.get("eval_total_loss"))]
    if not train and not evals:
        return None
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7, 3.8), dpi=100)
    axes = figure.add_subplot()
    if train:
        axes.plot(*zip(*train), label="train_total_loss", linewidth=1.2)
    if evals:
        axes.plot(*zip(*evals), label="eval_total_loss", marker="o", linewidth=1.5)
    axes.set_xlabel("step")
    axes.set_ylabel("loss")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _format(metrics: dict, key: str, pattern: str) -> str:
    value = metrics.get(key)
    return pattern.format(value) if _finite(value) else "–"


def _columns(models: Sequence[dict]) -> list[tuple[str, str, str]]:
    return [c for c in _COLUMNS if any(_finite(m["metrics"].get(c[0])) for m in models)]


def metrics_table(rows: Sequence[tuple[str, dict]], columns) -> list[str]:
    lines = ["| model | " + " | ".join(title for _, title, _ in columns) + " |",
             "|---|" + "---:|" * len(columns)]
    for name, metrics in rows:
        lines.append(f"| {table_cell(name)} | " + " | ".join(_format(metrics, key, pattern)
                                                        for key, _, pattern in columns) + " |")
    return lines


def worst_examples(predictions: Sequence[dict], count: int = WORST_EXAMPLES) -> list[dict]:
    """The examples the tuned model gets most wrong: not exact matches, lowest ROUGE-L first,
    then lowest sentence BLEU, then file order."""
    scored = [row for row in predictions if "tuned_scores" in row
              and not row["tuned_scores"]["exact_match"]]
    scored.sort(key=lambda row: (row["tuned_scores"]["rouge_l"], row["tuned_scores"]["bleu"], row["index"]))
    return scored[:count]


def render_report(results: dict, predictions: Sequence[dict], training_metrics: Sequence[dict] = ()) -> str:
    """The Markdown report of an evaluation (or of why there was none)."""
    if not results.get("evaluated"):
        detail = f" ({results['detail']})" if results.get("detail") else ""
        return ("# Evaluation\n\nNot evaluated: " + results.get("reason", "no evaluation data") + detail +
                ".\n\nProvide `evaluation_data_uri` (10 to 250 examples) to get eval loss, token "
                "accuracy and generation metrics for the base model and every checkpoint.\n")
    generation = results["generation"]
    lines = ["# Evaluation", ""]
    lines.append(
        f"{results['num_examples']} evaluation examples; base model `{results['base_model']['reference']}`"
        f" (`{results['base_model']['checkpoint']}`); tuned model: the **final checkpoint, step "
        f"{results['tuned']['step']}**{' (tuning stopped early)' if results.get('stopped_early') else ''}. "
        f"Ran on {results['device']} in {results['dtype']}.")
    lines.append("")
    lines.append(
        f"Generation: temperature={generation['temperature']}, maxOutputTokens="
        f"{generation['maxOutputTokens_resolved']}"
        f"{' (automatic: longest expected output + 16)' if not generation['maxOutputTokens'] else ''}, "
        f"topP={generation['topP']}, topK={generation['topK'] or 'off'}; generated by: "
        f"{results['generation_models']}. Task: {results['task']}"
        + (f" ({len(results['labels'])} labels)" if results.get("labels") else "") + ".")
    lines.append("")

    base = results["base"]
    tuned = results["checkpoints"][-1]
    models = [base] + list(results["checkpoints"])
    columns = _columns(models)
    lines += ["## Base vs tuned", ""]
    lines += metrics_table([("base", base["metrics"]), (f"tuned (step {tuned['step']})", tuned["metrics"])],
                           columns)
    lines.append("")
    best = results.get("best_by_eval_loss")
    if best:
        lines.append(f"Lowest eval loss: step {best['step']} ({best['eval_total_loss']:.4f}).")
        lines.append("")

    if len(results["checkpoints"]) > 1:
        lines += ["## Every checkpoint", ""]
        lines += metrics_table([(f"step {c['step']}", c["metrics"]) for c in results["checkpoints"]],
                               columns)
        lines.append("")

    lines += ["## Loss curves", ""]
    png = loss_curve_png(training_metrics)
    if png:
        lines.append(f"![train and eval loss per step](data:image/png;base64,{base64.b64encode(png).decode()})")
    else:
        lines.append("No training metrics (metrics.jsonl) to plot.")
    lines.append("")

    classification = tuned.get("classification")
    if classification:
        categories = classification["categories"]
        lines += [f"## Confusion matrix (tuned, step {tuned['step']})", "",
                  "Rows: expected label; columns: predicted (`(other)`: not a label).", "",
                  "| expected \\ predicted | " + " | ".join(table_cell(c, 60) for c in categories) + " |",
                  "|---|" + "---:|" * len(categories)]
        for name, row in zip(categories, classification["confusion_matrix"]):
            if name == "(other)":
                continue
            lines.append(f"| {table_cell(name, 60)} | " + " | ".join(str(v) for v in row) + " |")
        lines.append("")

    worst = worst_examples(predictions)
    lines += [f"## Examples the tuned model gets most wrong ({len(worst)})", ""]
    if worst:
        lines += ["| # | input | expected | tuned | base | ROUGE-L |", "|---:|---|---|---|---|---:|"]
        for row in worst:
            lines.append(f"| {row['index']} | {table_cell(row['input'])} | {table_cell(row['expected'])} | "
                         f"{table_cell(row.get('tuned_output', ''))} | {table_cell(row.get('base_output', '–'))} | "
                         f"{row['tuned_scores']['rouge_l']:.3f} |")
    elif any("tuned_scores" in row for row in predictions):
        lines.append("None: the tuned model answers every example exactly.")
    else:
        lines.append("The final checkpoint did not generate.")
    lines.append("")
    lines.append("Full results: `results.json` and `predictions.jsonl` in the evaluation_results artifact.")
    return "\n".join(lines) + "\n"

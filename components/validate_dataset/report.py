"""The human side of the validation report: Markdown, with a histogram of token lengths."""
from __future__ import annotations

import base64
import io


def histogram_png(report) -> bytes | None:
    """A PNG histogram of input and output token lengths (train, and eval when present)."""
    files = [f for f in report.files if f.input_lengths]
    if not files:
        return None
    import matplotlib
    import numpy as np

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    conversational = report.dataset_format in ("chat", "gemini")
    titles = (("conversation tokens" if conversational else "input (prompt) tokens"),
              ("longest assistant turn tokens" if conversational else "output (target) tokens"))
    limits = (report.limits.input_tokens, report.limits.output_tokens)
    figure = Figure(figsize=(10, 3.6), dpi=80)
    figure.subplots_adjust(left=0.07, right=0.98, bottom=0.14, top=0.9, wspace=0.25)
    for column, (title, limit) in enumerate(zip(titles, limits)):
        axes = figure.add_subplot(1, 2, column + 1)
        for check in files:
            values = check.input_lengths if column == 0 else check.output_lengths
            counts, edges = np.histogram(np.asarray(values or [0]), bins=40)
            # One artist per histogram (stairs), not one patch per bin: much faster to draw.
            axes.stairs(counts, edges, fill=True, alpha=0.6, label=f"{check.role} ({len(values)})")
        top = max(max(c.input_lengths if column == 0 else c.output_lengths) for c in files)
        if top >= limit * 0.8:
            axes.axvline(limit, color="red", linestyle="--", label=f"limit {limit:,}")
        axes.set_title(title)
        axes.set_xlabel("tokens")
        axes.set_ylabel("examples")
        axes.legend(fontsize="small")
    buffer = io.BytesIO()
    # No timestamps or software tags: the same data gives the same bytes.
    figure.savefig(buffer, format="png", metadata={"Software": None})
    return buffer.getvalue()


def _stat_row(name: str, stats: dict | None) -> str:
    if not stats:
        return f"| {name} | - | - | - | - | - |"
    return (f"| {name} | {stats['min']:,} | {stats['mean']:,.1f} | {stats['p50']:,.0f} | "
            f"{stats['p95']:,.0f} | {stats['max']:,} |")


def render_markdown(report: dict, histogram: bytes | None = None) -> str:
    """The report for people; ``histogram`` (PNG bytes) is embedded as a data URI."""
    status = "VALID" if report["valid"] else "INVALID"
    lines = [f"# Dataset validation: {status}", ""]
    model = report["model"]
    lines.append(f"Format: **{report['dataset_format']}**; model `{model.get('reference')}` "
                 f"({model.get('context_class')} class); limits: input "
                 f"{report['limits']['input_tokens']:,} tokens, output "
                 f"{report['limits']['output_tokens']:,} tokens.")
    lines.append("")
    if report["valid"]:
        lines.append(f"No errors; {report['num_warnings']} warning(s).")
    else:
        lines.append(f"**{report['num_errors']} error(s)**: the dataset is refused and the "
                     f"pipeline stops before tuning. Fix them and run again.")
    lines.append("")
    lines += ["| file | lines | examples | invalid lines | blank | duplicates | truncated |",
              "|---|---|---|---|---|---|---|"]
    for role, info in report["files"].items():
        lines.append(f"| {role}: `{info['uri']}` | {info['lines']:,} | {info['examples']:,} | "
                     f"{info['invalid_lines']:,} | {info['blank_lines']:,} | "
                     f"{info['duplicates']:,} | {info['truncated']['examples']:,} |")
    lines.append("")
    conversational = report["dataset_format"] in ("chat", "gemini")
    for role, info in report["files"].items():
        stats = info["token_stats"]
        if not stats["input"]:
            continue
        lines += [f"## Token lengths ({role})", "",
                  "| tokens | min | mean | p50 | p95 | max |", "|---|---|---|---|---|---|",
                  _stat_row("conversation" if conversational else "input (prompt)",
                            stats["input"]),
                  _stat_row("longest assistant turn" if conversational else "output (target)",
                            stats["output"]), ""]
        truncated = info["truncated"]
        lines.append(f"Truncated: {truncated['examples']:,} example(s) ({truncated['inputs']:,} "
                     f"inputs, {truncated['outputs']:,} outputs).")
        lines.append("")
    if histogram:
        encoded = base64.b64encode(histogram).decode("ascii")
        lines += ["## Histogram", "", f"![token lengths](data:image/png;base64,{encoded})", ""]
    if report["errors"]:
        lines += [f"## Errors ({report['num_errors']} in all; the first {len(report['errors'])})",
                  "", "```"]
        lines += report["errors"]
        lines += ["```", ""]
    if report["warnings"]:
        lines += ["## Warnings", ""]
        lines += [f"- {warning}" for warning in report["warnings"]]
        lines.append("")
    return "\n".join(lines)

"""The rationale report for people: Markdown for the KFP UI, from the report dict of
:func:`components.generate_rationales.rationales.generate_rationales`."""
from __future__ import annotations

from components.common.artifacts.validated_dataset import TRAIN_FILE
from components.common.markdown import table_cell


def _number(value, pattern: str = "{:,}") -> str:
    return "–" if value is None else pattern.format(value)


def render_markdown(report: dict) -> str:
    """The report as Markdown: counts, calls, tokens, time, parsing, agreement, examples."""
    examples, calls, tokens = report["examples"], report["calls"], report["tokens"]
    agreement, seconds = report["agreement"], report["seconds"]
    teacher = report["teacher"]
    lines = ["# Teacher rationales", "",
             f"Teacher `{teacher.get('reference', teacher['identity'])}`: {teacher['description']}.", "",
             "| | |", "|---|---:|",
             f"| examples | {examples['total']:,} ({examples['labeled']:,} labeled, "
             f"{examples['unlabeled']:,} unlabeled) |",
             f"| kept | {examples['kept']:,} ({examples['with_rationale']:,} with a rationale, "
             f"{examples['label_only']:,} label only) |",
             f"| excluded (unlabeled, no parseable answer) | {examples['excluded']:,} |",
             f"| teacher calls | {calls['total']:,} ({calls['made']:,} made now, "
             f"{calls['reused']:,} reused from the call log; {calls['retries']:,} retries) |",
             f"| tokens (prompt / completion) | {_number(tokens['prompt'])} / "
             f"{_number(tokens['completion'])} |",
             f"| time | {seconds['total']:.1f} s ({seconds['teacher']:.1f} s asking the teacher, "
             f"{_number(calls['per_second'], '{:.2f}')} calls/s) |"]
    for mode, title in (("explain", "explanations of gold labels"),
                        ("answer", "answers (unlabeled, agreement checks)")):
        parse = report["parse"][mode]
        detail = ", ".join(f"{k} {v}" for k, v in sorted(parse["by_status"].items()) if k != "ok")
        lines.append(f"| parse failures, {title} | {parse['failures']:,} of "
                     f"{parse['requests']:,}{f' ({detail})' if detail else ''} |")
    held_out = report.get("held_out") or {}
    if held_out.get("examples"):
        lines.append(f"| teacher on the evaluation data | {held_out['accuracy']:.1%} "
                     f"({held_out['correct']:,} of {held_out['examples']:,} answers equal the "
                     f"label; {held_out['unparsed']:,} unparseable) |")
    rate = agreement["rate"]
    lines.append(f"| teacher agrees with gold | "
                 f"{'–' if rate is None else f'{rate:.1%}'} ({agreement['agreed']:,} of "
                 f"{agreement['checked']:,} labeled examples asked without their label) |")
    lines.append("")
    if report["excluded"]:
        lines += [f"## Excluded examples ({examples['excluded']:,}; first "
                  f"{len(report['excluded'])})", "", "| # | line | status | teacher's reply |",
                  "|---:|---:|---|---|"]
        lines += [f"| {e['index']} | {e['line']} | {e['status']} | {table_cell(e['reply'])} |"
                  for e in report["excluded"]]
        lines.append("")
    if agreement["disagreements"]:
        lines += ["## Disagreements with the gold label (first "
                  f"{len(agreement['disagreements'])})", "", "| # | gold | teacher | status |",
                  "|---:|---|---|---|"]
        lines += [f"| {d['index']} | {table_cell(d['gold'])} | {table_cell(d['teacher'] or '')} "
                  f"| {d['status']} |" for d in agreement["disagreements"]]
        lines.append("")
    lines += [f"## Examples with their rationales ({len(report['samples'])})", ""]
    if report["samples"]:
        lines += ["| # | input | label (source) | rationale |", "|---:|---|---|---|"]
        lines += [f"| {s['index']} | {table_cell(s['input_text'])} | "
                  f"{table_cell(s['output_text'])} ({s['label_source']}) | "
                  f"{table_cell(s['rationale'])} |" for s in report["samples"]]
    else:
        lines.append("None: no teacher reply had a parseable rationale.")
    lines += ["", f"Full output: `{TRAIN_FILE}`, `report.json` and the raw replies "
              "`teacher_calls.jsonl` in the rationale_dataset artifact."]
    return "\n".join(lines) + "\n"

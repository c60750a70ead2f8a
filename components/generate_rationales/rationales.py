"""Distilling step-by-step, step one: the teacher's rationales (and labels) for every example.

For each example (:mod:`.examples`):

- **labeled**: the teacher explains the gold label (an ``explain`` request, the label in the
  prompt); the gold label stands. Up to ``agreement_examples`` labeled examples (a seeded sample;
  -1: all) are also asked as if unlabeled (an ``answer`` request, no label in the prompt): the
  teacher's own answer, compared with the gold one (:func:`.prompting.normalize_answer`), gives
  the teacher-vs-gold agreement of the report. Without a parseable rationale the example is kept
  label-only (``rationale`` null).
- **unlabeled**: the teacher answers (an ``answer`` request): its answer becomes the label and its
  reasoning the rationale. Without a parseable answer the example is excluded: counted, listed
  in the report with the start of the reply, never dropped silently.
- **evaluation** (the input folder's ``eval.jsonl``, labeled): the teacher answers each one too
  (an ``answer`` request keyed ``eval:<index>:answer``, its demonstrations from the training
  examples); the report's ``held_out`` says how often its answer equals the label, on the same
  data the student is evaluated on. These examples are not part of the output.

Prompts and parsing are :mod:`.prompting`'s; every answer is appended to the call log
(:mod:`.call_log`) as it arrives, so a second run on the same output folder asks the teacher
only what is missing.

The output folder is a validated dataset folder
(:mod:`components.common.artifacts.validated_dataset`) that transform and evaluate read as they
read validate_dataset's: ``train.jsonl``, one line per kept example, in dataset order::

    {"index": 3, "input_text": ..., "output_text": ..., "rationale": ... | null,
     "label_source": "gold" | "teacher", "parse_status": "ok" | "missing_rationale" | ...,
     "teacher_answer": ... | null}

and, when the input folder has evaluation data, its ``eval.jsonl`` copied as it is (no
``tokens/``: the validator's tokens encode single-task examples).
``parse_status`` is that of the request that gave the rationale (explain for labeled examples,
answer for unlabeled ones); ``teacher_answer`` is the teacher's own answer to a labeled example
that was asked for agreement (else null).
"""
from __future__ import annotations

import json
import os
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from components.common.artifacts.validated_dataset import EVAL_FILE, TRAIN_FILE, write_records
from components.common.storage import write_bytes, write_text
from components.generate_rationales.call_log import CallLog, Completion
from components.generate_rationales.examples import (DistillationExample, evaluation_file,
                                                     read_evaluation_examples, read_examples)
from components.generate_rationales.http_calls import RetryPolicy
from components.generate_rationales.prompting import (ANSWER, EXPLAIN, OK, TeacherRequest,
                                                      build_request, normalize_answer,
                                                      parse_teacher_output)
from components.generate_rationales.teacher_reference import make_teacher
from components.generate_rationales.teachers import Teacher, TeacherSettings

CALLS_FILE = "teacher_calls.jsonl"
REPORT_FILE = "report.json"
GOLD, TEACHER = "gold", "teacher"
REPORT_SAMPLES = 5
REPORT_LISTED = 20  # excluded examples and disagreements listed by name in the report
REPLY_SNIPPET = 300


class RationaleError(RuntimeError):
    """The teacher could not produce a usable dataset (the message says why and what to do)."""


@dataclass(frozen=True)
class RationaleSettings:
    """Prompting and decoding settings (see the module doc and :mod:`.prompting`)."""

    few_shot_count: int = 3
    agreement_examples: int = 100
    teacher: TeacherSettings = field(default_factory=TeacherSettings)

    def __post_init__(self) -> None:
        if self.few_shot_count < 0:
            raise ValueError(f"few_shot_count must be >= 0, got {self.few_shot_count}")
        if self.agreement_examples < -1:
            raise ValueError(f"agreement_examples must be >= 0, or -1 for all labeled examples, "
                             f"got {self.agreement_examples}")

    @property
    def seed(self) -> int:
        """One seed for everything: demonstrations, the agreement sample, teacher sampling."""
        return self.teacher.seed

    def to_dict(self) -> dict:
        return {"few_shot_count": self.few_shot_count,
                "agreement_examples": self.agreement_examples, **self.teacher.to_dict()}


@dataclass
class RationaleRun:
    """What a run produced: the output records and the report (a JSON-ready dict)."""

    records: list[dict]
    report: dict


def agreement_indices(examples: Sequence[DistillationExample], count: int, seed: int) -> set[int]:
    """The labeled examples also asked without their label: ``count`` of them drawn with
    ``random.Random(f"{seed}:agreement")``, or all when ``count`` is -1 or covers them all."""
    labeled = [e.index for e in examples if e.labeled]
    if count == -1 or count >= len(labeled):
        return set(labeled)
    return set(random.Random(f"{seed}:agreement").sample(labeled, count))


def plan_requests(examples: Sequence[DistillationExample], settings: RationaleSettings,
                  evaluation: Sequence[DistillationExample] = ()) -> list[TeacherRequest]:
    """Every request the examples need, in dataset order (see the module doc), then an answer
    request for every ``evaluation`` example (demonstrations from ``examples``)."""
    checked = agreement_indices(examples, settings.agreement_examples, settings.seed)
    requests = []
    for example in examples:
        if not example.labeled:
            modes = [ANSWER]
        else:
            modes = [EXPLAIN, ANSWER] if example.index in checked else [EXPLAIN]
        requests += [build_request(examples, example, mode, settings.few_shot_count, settings.seed)
                     for mode in modes]
    requests += [build_request(examples, example, ANSWER, settings.few_shot_count, settings.seed,
                               held_out=True) for example in evaluation]
    return requests


def generate_rationales(examples: Sequence[DistillationExample], teacher: Teacher,
                        settings: RationaleSettings, calls_path: str | os.PathLike,
                        show_progress: bool = True,
                        evaluation: Sequence[DistillationExample] = ()) -> RationaleRun:
    """Asks ``teacher`` what the examples need (reusing the answers logged in ``calls_path``),
    and returns the output records and the report. The teacher also answers the labeled
    ``evaluation`` examples, which scores it on the data the student is evaluated on (the
    report's ``held_out``); they are not part of the output."""
    started = time.perf_counter()
    requests = plan_requests(examples, settings, evaluation)
    teacher_settings = settings.teacher.to_dict()
    fingerprints = {r.key: r.fingerprint(teacher.identity, teacher_settings) for r in requests}
    log = CallLog(calls_path)
    stale = log.stale_count(fingerprints)
    answers: dict[str, Completion] = {}
    for request in requests:
        logged = log.completed(request.key, fingerprints[request.key])
        if logged is not None:
            answers[request.key] = logged
    reused = len(answers)
    pending = [r for r in requests if r.key not in answers]
    from tqdm import tqdm

    bar = tqdm(total=len(requests), initial=reused, desc="teacher", unit="call", file=sys.stderr,
               disable=not show_progress or not pending, mininterval=1.0)

    def on_answer(request: TeacherRequest, completion: Completion) -> None:
        log.append(request.key, fingerprints[request.key], completion)
        answers[request.key] = completion
        bar.update()

    teacher_started = time.perf_counter()
    try:
        teacher.answer(pending, settings.teacher, on_answer)
    except Exception as error:
        raise RationaleError(f"{error}\n{len(answers)} of {len(requests)} teacher answers are "
                             f"saved in {calls_path}; run again on the same output to resume "
                             "without asking for them again.") from error
    finally:
        bar.close()
    timing = {"teacher": time.perf_counter() - teacher_started}
    records, report = _assemble(examples, requests, answers, settings)
    report["held_out"] = _held_out_score(evaluation, requests, answers)
    new = [answers[r.key] for r in pending]
    timing["total"] = time.perf_counter() - started
    report.update(_call_statistics(requests, answers, new, stale, timing))
    report["teacher"] = {"kind": teacher.kind, "identity": teacher.identity,
                         "description": teacher.description}
    report["settings"] = settings.to_dict()
    return RationaleRun(records, report)


def _reply_snippet(text: str) -> str:
    return text[:REPLY_SNIPPET] + ("…" if len(text) > REPLY_SNIPPET else "")


def _assemble(examples: Sequence[DistillationExample], requests: Sequence[TeacherRequest],
              answers: dict[str, Completion], settings: RationaleSettings) -> tuple[list, dict]:
    """The output records and the content part of the report."""
    keys = {r.key for r in requests}
    records, excluded, disagreements = [], [], []
    parse_counts: dict[str, dict[str, int]] = {EXPLAIN: {}, ANSWER: {}}
    checked = agreed = 0
    for example in examples:
        parsed = {}
        for mode in (EXPLAIN, ANSWER):
            key = f"{example.index}:{mode}"
            if key in keys:
                parsed[mode] = parse_teacher_output(answers[key].text, mode)
                counts = parse_counts[mode]
                counts[parsed[mode].status] = counts.get(parsed[mode].status, 0) + 1
        record = {"index": example.index, "input_text": example.input_text}
        if example.labeled:
            own = parsed.get(ANSWER)
            record.update(output_text=example.output_text, rationale=parsed[EXPLAIN].rationale,
                          label_source=GOLD, parse_status=parsed[EXPLAIN].status,
                          teacher_answer=own.answer if own else None)
            if own:
                checked += 1
                if own.answer is not None and (normalize_answer(own.answer)
                                               == normalize_answer(example.output_text)):
                    agreed += 1
                else:
                    disagreements.append({"index": example.index, "gold": example.output_text,
                                          "teacher": own.answer, "status": own.status})
        else:
            answer = parsed[ANSWER]
            if answer.answer is None:
                excluded.append({"index": example.index, "line": example.line,
                                 "status": answer.status,
                                 "reply": _reply_snippet(answers[f"{example.index}:{ANSWER}"].text)})
                continue
            record.update(output_text=answer.answer, rationale=answer.rationale,
                          label_source=TEACHER, parse_status=answer.status, teacher_answer=None)
        records.append(record)
    labeled = sum(e.labeled for e in examples)
    with_rationale = sum(r["rationale"] is not None for r in records)
    report = {
        "examples": {"total": len(examples), "labeled": labeled,
                     "unlabeled": len(examples) - labeled, "kept": len(records),
                     "excluded": len(excluded), "with_rationale": with_rationale,
                     "label_only": len(records) - with_rationale},
        "parse": {mode: {"requests": sum(c.values()), "ok": c.get(OK, 0),
                         "failures": sum(v for k, v in c.items() if k != OK), "by_status": c}
                  for mode, c in parse_counts.items()},
        "excluded": excluded[:REPORT_LISTED],
        "agreement": {"checked": checked, "agreed": agreed,
                      "rate": agreed / checked if checked else None,
                      "disagreements": disagreements[:REPORT_LISTED]},
        "samples": [r for r in records if r["rationale"]][:REPORT_SAMPLES],
    }
    return records, report


def _held_out_score(evaluation: Sequence[DistillationExample], requests: Sequence[TeacherRequest],
                    answers: dict[str, Completion]) -> dict:
    """How often the teacher's answer to an evaluation example equals its label
    (:func:`.prompting.normalize_answer`); an unparseable answer counts as wrong."""
    by_index = {r.index: parse_teacher_output(answers[r.key].text, ANSWER).answer
                for r in requests if r.held_out}
    correct = sum(by_index[e.index] is not None and normalize_answer(by_index[e.index])
                  == normalize_answer(e.output_text) for e in evaluation)
    unparsed = sum(by_index[e.index] is None for e in evaluation)
    return {"examples": len(evaluation), "correct": correct, "unparsed": unparsed,
            "accuracy": correct / len(evaluation) if evaluation else None}


def _sum_or_none(values: list[int | None]) -> int | None:
    known = [v for v in values if v is not None]
    return sum(known) if known else None


def _call_statistics(requests, answers: dict[str, Completion], new: list[Completion],
                     stale: int, timing: dict[str, float]) -> dict:
    used = [answers[r.key] for r in requests]
    teacher_seconds = timing["teacher"]
    return {
        "calls": {"total": len(requests), "made": len(new), "reused": len(requests) - len(new),
                  "stale_log_entries": stale,
                  "retries": sum(c.attempts - 1 for c in new),
                  "per_second": len(new) / teacher_seconds if new and teacher_seconds else None},
        "tokens": {"prompt": _sum_or_none([c.prompt_tokens for c in used]),
                   "completion": _sum_or_none([c.completion_tokens for c in used])},
        "seconds": {name: round(value, 3) for name, value in timing.items()},
    }


def scalar_metrics(report: dict) -> dict[str, float]:
    """The report's numbers for the KFP Metrics artifact (those the backend could report)."""
    scalars = {
        "examples": report["examples"]["total"],
        "kept_examples": report["examples"]["kept"],
        "excluded_examples": report["examples"]["excluded"],
        "examples_with_rationale": report["examples"]["with_rationale"],
        "parse_failures": sum(p["failures"] for p in report["parse"].values()),
        "teacher_calls": report["calls"]["total"],
        "teacher_calls_made": report["calls"]["made"],
        "prompt_tokens": report["tokens"]["prompt"],
        "completion_tokens": report["tokens"]["completion"],
        "agreement_rate": report["agreement"]["rate"],
        "teacher_eval_accuracy": report["held_out"]["accuracy"],
    }
    return {name: float(value) for name, value in scalars.items() if value is not None}


def copy_evaluation_data(dataset: str | os.PathLike, output_dir: Path) -> None:
    """Copies the ``eval.jsonl`` of a validated dataset folder into ``output_dir`` as it is
    (atomically); without one, removes a copy an earlier run on other data left there."""
    source = evaluation_file(dataset)
    if source is not None:
        write_bytes(str(output_dir / EVAL_FILE), source.read_bytes())
    else:
        (output_dir / EVAL_FILE).unlink(missing_ok=True)


def generate_rationales_for_pipeline(dataset: str, teacher_model_reference: str,
                                     output_dir: str | os.PathLike, settings: RationaleSettings,
                                     *, project: str = "", location: str = "",
                                     concurrency: int = 8, policy: RetryPolicy = RetryPolicy(),
                                     batch_size: int | None = None,
                                     show_progress: bool = True) -> RationaleRun:
    """Reads ``dataset``, asks the teacher, and writes ``output_dir``: ``train.jsonl``, the
    dataset folder's ``eval.jsonl`` when it has one, ``report.json`` and the call log
    ``teacher_calls.jsonl`` (kept: a rerun on the same folder resumes from it). Raises
    :class:`RationaleError` when no example could be kept."""
    examples = read_examples(dataset)
    evaluation = read_evaluation_examples(dataset)
    output = Path(output_dir)
    teacher = make_teacher(teacher_model_reference, project=project, location=location,
                           concurrency=concurrency, policy=policy, batch_size=batch_size)
    run = generate_rationales(examples, teacher, settings, output / CALLS_FILE, show_progress,
                              evaluation)
    run.report["teacher"]["reference"] = teacher_model_reference
    run.report["dataset"] = str(dataset)
    write_records(output / TRAIN_FILE, run.records)
    copy_evaluation_data(dataset, output)
    write_text(str(output / REPORT_FILE), json.dumps(run.report, indent=2, ensure_ascii=False) + "\n")
    if not run.records:
        raise RationaleError(f"no example kept: the teacher answered none of the "
                             f"{len(examples)} unlabeled examples in the expected form; see "
                             f"{output / REPORT_FILE} for its replies")
    return run

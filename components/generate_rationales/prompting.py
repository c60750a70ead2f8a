"""Few-shot chain-of-thought prompts for the teacher, and the rule that reads its answers.

Two kinds of request (:data:`ANSWER`, :data:`EXPLAIN`):

- ``answer``: the teacher labels an input: it writes ``Rationale: <reasoning>`` then a line
  ``Answer: <label>``. Unlabeled examples are asked this way; so are (some) labeled examples,
  to measure how often the teacher's own answer agrees with the gold label.
- ``explain``: a labeled example's gold answer is part of the prompt and the teacher is asked
  only for ``Rationale: <reasoning that leads to that answer>``. The gold label stands.

A prompt is a system message and one user message (:func:`build_request`): an instruction, then
``k`` demonstrations, then the input asked about::

    Input: <demonstration input>
    Rationale: <its rationale>        (only when the example has a hand-written ``rationale``)
    Answer: <its output_text>

    Input: <the input asked about>
    Answer: <gold output_text>        (explain requests only)

Demonstrations are labeled examples of the dataset itself, never the one asked about, drawn with
``random.Random(f"{seed}:{index}")`` (``f"{seed}:eval:{index}"`` for an evaluation example, asked
only to score the teacher; the same seed gives the same prompts, in any process):
first from the examples with a hand-written ``rationale``, then from the other labeled ones.
Without labeled examples the prompt is zero-shot (instruction and input only).

Parsing (:func:`parse_teacher_output`): labels are matched case-insensitively at the start of a
line, with surrounding whitespace and Markdown emphasis ignored: ``Rationale:`` (also
``Reasoning:``, ``Explanation:``) and ``Answer:`` (also ``Final answer:``). The answer is the text
after the *last* answer label, up to the next label or the end (multi-line answers kept);
without one, the paper's ``... so the answer is X.`` is read. The rationale is the text after the first rationale label
up to the next label, or, without a rationale label, the text before the answer label (in an
explain request: the whole reply). The status says what was missing (:data:`OK`,
:data:`EMPTY`, :data:`MISSING_ANSWER`, :data:`MISSING_RATIONALE`).
"""
from __future__ import annotations

import hashlib
import json
import random
import re
from dataclasses import dataclass
from typing import Sequence

from components.generate_rationales.examples import DistillationExample

ANSWER = "answer"
EXPLAIN = "explain"

OK = "ok"
EMPTY = "empty"
MISSING_ANSWER = "missing_answer"
MISSING_RATIONALE = "missing_rationale"

SYSTEM_MESSAGE = "You are an expert who reasons step by step and answers precisely."
INSTRUCTIONS = {
    ANSWER: ('Answer the last input the way the examples are answered. First write "Rationale:" '
             "followed by your step-by-step reasoning, then a new line \"Answer:\" followed by "
             "the answer alone, in the same form as the examples' answers."),
    EXPLAIN: ("The answer to the last input is given. Explain it: write \"Rationale:\" followed "
              "by the step-by-step reasoning that leads from the input to that answer. Do not "
              "change the answer."),
}


@dataclass(frozen=True)
class TeacherRequest:
    """One call to the teacher: which example, which kind, the chat messages it sends."""

    index: int
    mode: str  # ANSWER or EXPLAIN
    messages: tuple[dict, ...]
    held_out: bool = False  # an evaluation example (scored, not part of the output)

    @property
    def key(self) -> str:
        """``<index>:<mode>`` (``eval:<index>:<mode>`` for an evaluation example): at most one
        request of each kind per example."""
        return f"{'eval:' if self.held_out else ''}{self.index}:{self.mode}"

    @property
    def prompt_text(self) -> str:
        """The messages as one text, for backends that take a single prompt (Vertex predict)."""
        return "\n\n".join(m["content"] for m in self.messages)

    def fingerprint(self, teacher: str, settings: dict) -> str:
        """A digest of everything that decides the answer: teacher, settings and prompt."""
        payload = json.dumps([teacher, settings, list(self.messages)], sort_keys=True)
        return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:16]


@dataclass(frozen=True)
class ParsedOutput:
    """The teacher's reply read by the documented rule."""

    rationale: str | None
    answer: str | None
    status: str


def choose_demonstrations(examples: Sequence[DistillationExample], index: int, count: int,
                          seed: int, held_out: bool = False) -> list[DistillationExample]:
    """``count`` labeled examples other than ``index`` (any, for a ``held_out`` evaluation
    example, which is not one of ``examples``), by the seeded rule (module doc)."""
    rng = random.Random(f"{seed}:eval:{index}" if held_out else f"{seed}:{index}")
    pool = [e for e in examples if e.labeled and (held_out or e.index != index)]
    explained = [e for e in pool if e.rationale]
    plain = [e for e in pool if not e.rationale]
    chosen = rng.sample(explained, min(count, len(explained)))
    return chosen + rng.sample(plain, min(count - len(chosen), len(plain)))


def _block(example: DistillationExample, with_rationale: bool) -> str:
    lines = [f"Input: {example.input_text}"]
    if with_rationale and example.rationale:
        lines.append(f"Rationale: {example.rationale}")
    lines.append(f"Answer: {example.output_text}")
    return "\n".join(lines)


def build_request(examples: Sequence[DistillationExample], example: DistillationExample,
                  mode: str, few_shot_count: int, seed: int,
                  held_out: bool = False) -> TeacherRequest:
    """The request asking the teacher about ``example`` (``mode``: ANSWER or EXPLAIN), its
    demonstrations drawn from ``examples``; ``held_out``: ``example`` is an evaluation example."""
    if mode not in INSTRUCTIONS:
        raise ValueError(f"mode must be {ANSWER!r} or {EXPLAIN!r}, got {mode!r}")
    if mode == EXPLAIN and not example.labeled:
        raise ValueError(f"example {example.index} has no output_text to explain")
    demonstrations = choose_demonstrations(examples, example.index, few_shot_count, seed,
                                           held_out)
    query = f"Input: {example.input_text}"
    if mode == EXPLAIN:
        query += f"\nAnswer: {example.output_text}"
    parts = [INSTRUCTIONS[mode], *(_block(d, True) for d in demonstrations), query]
    messages = ({"role": "system", "content": SYSTEM_MESSAGE},
                {"role": "user", "content": "\n\n".join(parts)})
    return TeacherRequest(example.index, mode, messages, held_out)


_LABEL = re.compile(r"^[ \t>#*_]*(?P<label>rationale|reasoning|explanation|final answer|answer)"
                    r"[ \t*_]*[:：][ \t*_]*", re.IGNORECASE | re.MULTILINE)
_SO_THE_ANSWER_IS = re.compile(r"the answer is[:\s]+(?P<answer>.+?)\s*$",
                               re.IGNORECASE | re.DOTALL)
_EMPHASIS = " \t\r\n*_"


def _clean(text: str) -> str | None:
    text = text.strip(_EMPHASIS)
    return text or None


def _up_to_next_label(text: str, start: int, labels: list[re.Match]) -> str:
    following = [m.start() for m in labels if m.start() >= start]
    return text[start:following[0] if following else len(text)]


def parse_teacher_output(text: str | None, mode: str) -> ParsedOutput:
    """Rationale, answer and status of a reply (the rule is in the module doc)."""
    if not text or not text.strip():
        return ParsedOutput(None, None, EMPTY)
    labels = list(_LABEL.finditer(text))
    answers = [m for m in labels if m["label"].lower().endswith("answer")]
    rationales = [m for m in labels if not m["label"].lower().endswith("answer")]
    answer = _clean(_up_to_next_label(text, answers[-1].end(), labels)) if answers else None
    if rationales:
        rationale = _clean(_up_to_next_label(text, rationales[0].end(), labels))
    elif answers:
        rationale = _clean(text[:answers[-1].start()])
    else:
        rationale = _clean(text)
    if answer is None and not answers and mode == ANSWER and rationale:
        found = _SO_THE_ANSWER_IS.search(rationale)
        if found:
            answer = _clean(found["answer"].rstrip(". "))
    if mode == EXPLAIN:
        return ParsedOutput(rationale, answer, OK if rationale else MISSING_RATIONALE)
    if answer is None:
        return ParsedOutput(rationale, None, MISSING_ANSWER)
    return ParsedOutput(rationale, answer, OK if rationale else MISSING_RATIONALE)


def normalize_answer(text: str) -> str:
    """An answer as compared for agreement: case-folded, whitespace collapsed, surrounding quotes
    and trailing punctuation removed (``"Business."`` equals ``business``)."""
    text = " ".join(text.split()).casefold()
    return text.strip("\"'`“”‘’ ").rstrip(".!;,").strip()

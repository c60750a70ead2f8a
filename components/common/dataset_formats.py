"""Dataset formats: what one JSONL example looks like in each format, and the documented limits.

Formats (``dataset_format`` in the pipelines, ``--format`` on the command line):

- ``text`` (text and code generation; alias ``code``): ``{"input_text": str, "output_text": str}``.
  Other fields, ``context`` included, are ignored.
- ``chat`` (chat and code chat; aliases ``code_chat``, ``codechat``):
  ``{"context": str (optional),
  "messages": [{"author": "user"|"assistant", "content": str}, ...]}``;
  authors alternate, starting with ``user`` and ending with ``assistant``. ``context`` overrides the
  pipeline's ``default_context``.
- ``distillation``: ``{"input_text": str, "output_text": str (optional)}``: without
  ``output_text`` (absent or null) the example is unlabeled and the teacher labels it.
- ``gemini``: ``{"systemInstruction": {"parts": [{"text": str}]} (optional),
  "contents": [{"role": "user"|"model", "parts": [{"text": str}, ...]}, ...]}``; roles alternate
  like chat authors (user first, model last); a turn's text parts are concatenated.

Every example becomes an :class:`Example`: an optional system context and a list of
(user, assistant) turns; that is what transform tokenizes, whatever the format.

Token limits (:func:`token_limits`) are counted on what the model sees: the *input* limit on the
formatted prompt (chat template included), the *output* limit on the target (end-of-turn token
included). This is a few tokens stricter than counting the raw field, and guarantees that a
truncated example fits the limits exactly.

- 8k class (seeds 000/001/003): input 8192, output 1024. Chat: context + messages at most 8192
  tokens per example, each assistant turn at most 1024.
- 32k class (``*-32k`` models, or ``max_context_length='32k'``): the seeds give no tuning limits.
  We take input 32768 (the class's context size, as the 8k class's input limit is its context
  size) and output 8192 (the published maximum output of the ``*-32k`` models). Chat: 32768 per
  example, 8192 per assistant turn.
- Distillation (seed 002): input 7168, output 1024 (8k class; in the 32k class the 32k limits).
- Gemini: the chat limits of the class (the seeds give none for tuning data).

Too long is not an error: transform truncates (input from its end, keeping the chat template's
closing tokens; output from its end, keeping the end-of-turn token) and the validator reports how
many examples are truncated.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

FORMATS = ("text", "chat", "distillation", "gemini")
FORMAT_ALIASES = {
    "text": "text", "code": "text", "text_generation": "text", "code_generation": "text",
    "chat": "chat", "code_chat": "chat", "codechat": "chat", "code-chat": "chat",
    "distillation": "distillation", "gemini": "gemini",
}

MIN_EXAMPLES = 10
MAX_EXAMPLES = 10_000
RECOMMENDED_MIN_EXAMPLES = 100
MIN_EVAL_EXAMPLES = 10
MAX_EVAL_EXAMPLES = 250
MAX_AUTHOR_FIELDS = 10_000  # chat: `author` fields summed over the whole dataset
RECOMMENDED_MIN_UNLABELED = 1_000  # distillation

CONTEXT_CLASSES = ("8k", "32k")


def normalize_format(name: str) -> str:
    """The canonical format name for ``name`` (aliases accepted); ValueError when unknown."""
    key = (name or "").strip().lower()
    if key not in FORMAT_ALIASES:
        raise ValueError(f"unknown dataset format {name!r}; expected one of: {', '.join(FORMATS)}"
                         f" (aliases: {', '.join(sorted(set(FORMAT_ALIASES) - set(FORMATS)))})")
    return FORMAT_ALIASES[key]


@dataclass(frozen=True)
class Limits:
    """Token limits of one format in one context class."""

    input_tokens: int   # text: the prompt; chat: the whole conversation (context + messages)
    output_tokens: int  # text: the target; chat: each assistant turn

    def to_dict(self) -> dict[str, int]:
        return {"input_tokens": self.input_tokens, "output_tokens": self.output_tokens}


_LIMITS = {
    ("text", "8k"): Limits(8192, 1024),
    ("text", "32k"): Limits(32768, 8192),
    ("chat", "8k"): Limits(8192, 1024),
    ("chat", "32k"): Limits(32768, 8192),
    ("gemini", "8k"): Limits(8192, 1024),
    ("gemini", "32k"): Limits(32768, 8192),
    ("distillation", "8k"): Limits(7168, 1024),
    ("distillation", "32k"): Limits(32768, 8192),
}


def token_limits(dataset_format: str, context_class: str) -> Limits:
    """The token limits of ``dataset_format`` for a model of ``context_class`` ('8k' or '32k')."""
    fmt = normalize_format(dataset_format)
    if context_class not in CONTEXT_CLASSES:
        raise ValueError(f"unknown context class {context_class!r}; expected '8k' or '32k'")
    return _LIMITS[(fmt, context_class)]


@dataclass(frozen=True)
class Example:
    """One example in a format-independent shape: what transform tokenizes."""

    context: str | None  # the example's own system context; None when it has none
    turns: tuple[tuple[str, str | None], ...]  # (user, assistant); assistant None: unlabeled
    # The loss-mask value of its targets: its task (components.common.distillation_tasks); 1
    # for single-task data.
    target_mask: int = 1

    @property
    def labeled(self) -> bool:
        return all(answer is not None for _, answer in self.turns)


# (field, message) pairs: the problems of one example.
Problems = list[tuple[str, str]]


def json_type_name(value: Any) -> str:
    """'a string', 'an object', ...: a JSON value's type, for messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def _text_problem(value: Any) -> str | None:
    """Why ``value`` is not acceptable text, or None."""
    if not isinstance(value, str):
        return f"expected a string, got {json_type_name(value)}"
    if not value:
        return "empty"
    if value.isspace():
        return "only whitespace"
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return "contains an unpaired surrogate escape (such as \\ud800); not valid Unicode text"
    return None


def detect_format(obj: Any) -> str | None:
    """The format an example looks like (by its keys), or None."""
    if not isinstance(obj, dict):
        return None
    if "messages" in obj:
        return "chat"
    if "contents" in obj:
        return "gemini"
    if "input_text" in obj:
        return "distillation" if "output_text" not in obj else "text"
    return None


_REQUIRED = {"text": "input_text", "distillation": "input_text", "chat": "messages",
             "gemini": "contents"}


def compatible_formats(a: str, b: str) -> bool:
    """Whether an example of format ``a`` can be one of format ``b`` (text ~ distillation)."""
    return a == b or {a, b} <= {"text", "distillation"}


def _missing(field: str, fmt: str, obj: dict) -> tuple[str, str]:
    message = f"missing (required for the {fmt} format)"
    if fmt == "text" and field == "output_text" and detect_format(obj) == "distillation":
        message += "; unlabeled examples are only for the distillation format"
    return field, message


def parse_example(obj: Any, dataset_format: str, *, require_output: bool = False
                  ) -> tuple[Example | None, Problems]:
    """Checks one decoded JSON line against ``dataset_format``.

    Returns the example (None when there are problems) and its problems as (field, message).
    ``require_output`` makes ``output_text`` required in the distillation format (evaluation data).
    """
    fmt = normalize_format(dataset_format)
    if not isinstance(obj, dict):
        return None, [("(line)", f"expected a JSON object, got {json_type_name(obj)}")]
    looks = detect_format(obj)
    if _REQUIRED[fmt] not in obj and looks is not None and not compatible_formats(looks, fmt):
        return None, [("(line)", f"this example looks like the {looks} format, not the {fmt} "
                                 f"format ({_REQUIRED[fmt]} is missing)")]
    if fmt in ("text", "distillation"):
        return _parse_text(obj, fmt, require_output)
    if fmt == "chat":
        return _parse_chat(obj)
    return _parse_gemini(obj)


def _parse_text(obj: dict, fmt: str, require_output: bool) -> tuple[Example | None, Problems]:
    problems: Problems = []
    if "input_text" not in obj:
        problems.append(_missing("input_text", fmt, obj))
    else:
        problem = _text_problem(obj["input_text"])
        if problem:
            problems.append(("input_text", problem))
    output = obj.get("output_text")
    if fmt == "text" or require_output:
        if "output_text" not in obj:
            problems.append(_missing("output_text", fmt, obj) if fmt == "text" else
                            ("output_text", "missing (evaluation examples need the expected "
                                            "output)"))
        else:
            problem = _text_problem(output)
            if problem:
                problems.append(("output_text", problem))
    elif output is not None:  # distillation: optional
        problem = _text_problem(output)
        if problem == "empty":
            problem = "empty; omit the field (or make it null) for an unlabeled example"
        if problem:
            problems.append(("output_text", problem))
    if problems:
        return None, problems
    return Example(None, ((obj["input_text"], output),)), []


def _parse_context(obj: dict, problems: Problems) -> str | None:
    if "context" not in obj or obj["context"] is None:
        return None
    problem = _text_problem(obj["context"])
    if problem == "empty":
        problem = "empty; omit the field to use the default context"
    if problem:
        problems.append(("context", problem))
        return None
    return obj["context"]


def _check_alternation(roles: list[str], prefix: str, key: str, user: str, assistant: str,
                       problems: Problems) -> None:
    """Authors/roles alternate, starting with ``user`` and ending with ``assistant``."""
    if roles[0] != user:
        problems.append((f"{prefix}[0].{key}",
                         f"the conversation must start with \"{user}\", not \"{roles[0]}\""))
    for index in range(1, len(roles)):
        if roles[index] == roles[index - 1]:
            problems.append((f"{prefix}[{index}].{key}",
                             f"\"{roles[index]}\" follows \"{roles[index - 1]}\"; "
                             f"\"{user}\" and \"{assistant}\" must alternate"))
    if roles[-1] != assistant:
        problems.append((f"{prefix}[{len(roles) - 1}].{key}",
                         f"the conversation must end with \"{assistant}\", not \"{roles[-1]}\""))


def _parse_chat(obj: dict) -> tuple[Example | None, Problems]:
    problems: Problems = []
    context = _parse_context(obj, problems)
    if "messages" not in obj:
        problems.append(_missing("messages", "chat", obj))
        return None, problems
    messages = obj["messages"]
    if not isinstance(messages, list):
        problems.append(("messages", f"expected an array, got {json_type_name(messages)}"))
        return None, problems
    if not messages:
        problems.append(("messages", "empty; at least one user and one assistant message are "
                                     "required"))
        return None, problems
    authors: list[str] = []
    contents: list[str] = []
    for index, message in enumerate(messages):
        where = f"messages[{index}]"
        if not isinstance(message, dict):
            problems.append((where, f"expected an object, got {json_type_name(message)}"))
            continue
        author = message.get("author")
        if "author" not in message:
            problems.append((f"{where}.author", "missing (required)"))
        elif not isinstance(author, str):
            problems.append((f"{where}.author", f"expected a string, got {json_type_name(author)}"))
        elif author not in ("user", "assistant"):
            problems.append((f"{where}.author",
                             f"unknown author {_quote(author)}; "
                             "expected \"user\" or \"assistant\""))
        else:
            authors.append(author)
        if "content" not in message:
            problems.append((f"{where}.content", "missing (required)"))
        else:
            problem = _text_problem(message["content"])
            if problem:
                problems.append((f"{where}.content", problem))
            else:
                contents.append(message["content"])
    if problems:
        return None, problems
    _check_alternation(authors, "messages", "author", "user", "assistant", problems)
    if problems:
        return None, problems
    turns = tuple((contents[i], contents[i + 1]) for i in range(0, len(contents), 2))
    return Example(context, turns), []


def _parse_parts(value: Any, where: str, problems: Problems) -> str | None:
    """The concatenated text of a Gemini ``parts`` array."""
    if not isinstance(value, list):
        problems.append((where, f"expected an array, got {json_type_name(value)}"))
        return None
    if not value:
        problems.append((where, "empty; at least one {\"text\": ...} part is required"))
        return None
    texts: list[str] = []
    ok = True
    for index, part in enumerate(value):
        part_where = f"{where}[{index}]"
        if not isinstance(part, dict):
            problems.append((part_where, f"expected an object, got {json_type_name(part)}"))
            ok = False
            continue
        if "text" not in part:
            other = ", ".join(sorted(part)) or "no fields"
            problems.append((f"{part_where}.text",
                             f"missing (only text parts are supported; this part has {other})"))
            ok = False
            continue
        problem = _text_problem(part["text"])
        if problem:
            problems.append((f"{part_where}.text", problem))
            ok = False
        else:
            texts.append(part["text"])
    return "".join(texts) if ok else None


def _parse_gemini(obj: dict) -> tuple[Example | None, Problems]:
    problems: Problems = []
    context = None
    if obj.get("systemInstruction") is not None:
        instruction = obj["systemInstruction"]
        if not isinstance(instruction, dict):
            problems.append(("systemInstruction", "expected an object {\"parts\": [{\"text\": "
                             f"...}}]}}, got {json_type_name(instruction)}"))
        elif "parts" not in instruction:
            problems.append(("systemInstruction.parts", "missing (required)"))
        else:
            context = _parse_parts(instruction["parts"], "systemInstruction.parts", problems)
    if "contents" not in obj:
        problems.append(_missing("contents", "gemini", obj))
        return None, problems
    contents = obj["contents"]
    if not isinstance(contents, list):
        problems.append(("contents", f"expected an array, got {json_type_name(contents)}"))
        return None, problems
    if not contents:
        problems.append(("contents", "empty; at least one user and one model turn are required"))
        return None, problems
    roles: list[str] = []
    texts: list[str] = []
    for index, turn in enumerate(contents):
        where = f"contents[{index}]"
        if not isinstance(turn, dict):
            problems.append((where, f"expected an object, got {json_type_name(turn)}"))
            continue
        role = turn.get("role")
        if "role" not in turn:
            problems.append((f"{where}.role", "missing (required)"))
        elif not isinstance(role, str):
            problems.append((f"{where}.role", f"expected a string, got {json_type_name(role)}"))
        elif role not in ("user", "model"):
            problems.append((f"{where}.role",
                             f"unknown role {_quote(role)}; expected \"user\" or \"model\""))
        else:
            roles.append(role)
        if "parts" not in turn:
            problems.append((f"{where}.parts", "missing (required)"))
        else:
            text = _parse_parts(turn["parts"], f"{where}.parts", problems)
            if text is not None:
                texts.append(text)
    if problems:
        return None, problems
    _check_alternation(roles, "contents", "role", "user", "model", problems)
    if problems:
        return None, problems
    turns = tuple((texts[i], texts[i + 1]) for i in range(0, len(texts), 2))
    return Example(context, turns), []


def _quote(text: str) -> str:
    """A short, printable, double-quoted rendering of a user-supplied string."""
    shown = text if len(text) <= 40 else text[:37] + "..."
    return '"' + shown.encode("unicode_escape", "backslashreplace").decode("ascii")\
        .replace('"', '\\"') + '"'


def author_fields(obj: Any) -> int:
    """How many ``author`` fields a chat example has (they count against MAX_AUTHOR_FIELDS)."""
    if not isinstance(obj, dict) or not isinstance(obj.get("messages"), list):
        return 0
    return sum(1 for m in obj["messages"] if isinstance(m, dict) and "author" in m)

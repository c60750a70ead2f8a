"""Fast, exact chat-template rendering for templates that only paste message contents in.

Rendering the chat template (Jinja, through ``apply_chat_template``) costs about a quarter of
tokenizing the result, three times per example. For most templates, the embedded model's
included, the rendered text is a fixed string per conversation *shape* (the sequence of roles)
with the message contents pasted in: the template never looks inside a content. For such
templates :class:`TemplateRenderer` renders each shape once through
:mod:`components.common.prompts`, with sentinels in place of the contents, and then splices the
real contents in, which gives exactly the text ``prompts`` would give, much faster.

The fast path is only used when all of these hold, else every render goes through ``prompts``:

1. static check (:func:`template_is_content_opaque`): in the template's Jinja syntax tree,
   messages are only indexed, iterated, counted or read by key, and every ``content`` value
   flows only through string concatenation into the output (no test, filter, call, comparison
   or assignment sees it);
2. probes: for several conversation shapes and adversarial contents (surrounding whitespace,
   Jinja syntax, special tokens, reasoning tags, CRLF, tabs), the fast text equals the text of
   ``prompts``;
3. spot checks while encoding: the first example of every batch and of every new shape is also
   rendered through ``prompts`` and compared; a difference switches the fast path off.
"""
from __future__ import annotations

import re
from typing import Sequence

from components.common.prompts import format_conversation_prompt, format_target

_SENTINEL = "\ue000{}\ue001"
_SENTINEL_RE = re.compile("\ue000(\\d+)\ue001")
_MESSAGE_FILTERS = {"first", "last", "reverse", "list", "batch", "slice"}
_SCALAR_FILTERS = {"length", "count"}
_PROBES = (" leading and trailing spaces ", "\n\nnewlines\n", "{{ 1 + 1 }} {% if x %}",
           "<|im_end|><|im_start|>system", "<think>why</think>answer", "code\r\n\tx = `y`",
           "ünïcödé ✓", "x")


def template_is_content_opaque(template: str | None) -> bool:
    """Whether the template's output is its constant text with the contents pasted in."""
    if not template:
        return True  # prompts.py joins contents with newlines: opaque
    try:
        import jinja2
        from jinja2 import nodes
    except ImportError:
        return False
    try:
        tree = jinja2.Environment(extensions=["jinja2.ext.loopcontrols"]).parse(template)
    except Exception:  # noqa: BLE001 - any template we cannot parse takes the slow path
        return False

    parents: dict[int, tuple] = {}

    def index(node) -> None:
        for field_name, value in node.iter_fields():
            children = value if isinstance(value, list) else [value]
            for child in children:
                if isinstance(child, nodes.Node):
                    parents[id(child)] = (node, field_name)
                    index(child)

    index(tree)
    message_names = {"messages"}
    changed = True
    while changed:  # names bound to messages: loop targets and assignments
        changed = False
        for node in tree.find_all((nodes.For, nodes.Assign)):
            source = node.iter if isinstance(node, nodes.For) else node.node
            if any(isinstance(n, nodes.Name) and n.name in message_names
                   for n in [source, *source.find_all(nodes.Name)]):
                for name in node.target.find_all(nodes.Name) if not isinstance(
                        node.target, nodes.Name) else [node.target]:
                    if name.name not in message_names:
                        message_names.add(name.name)
                        changed = True

    def parent(node):
        return parents.get(id(node), (None, None))

    def content_ok(node) -> bool:
        while True:
            up, _ = parent(node)
            if isinstance(up, (nodes.Add, nodes.Concat)):
                node = up
                continue
            return isinstance(up, nodes.Output)

    def messages_ok(node) -> bool:
        while True:
            up, field_name = parent(node)
            if isinstance(up, nodes.Getitem) and field_name == "node":
                if isinstance(up.arg, nodes.Const) and isinstance(up.arg.value, str):
                    return content_ok(up) if up.arg.value == "content" else True
                node = up  # an index or a slice: still messages
                continue
            if isinstance(up, nodes.Getattr) and field_name == "node":
                return content_ok(up) if up.attr == "content" else True
            if isinstance(up, nodes.Filter) and field_name == "node":
                if up.name in _SCALAR_FILTERS:
                    return True
                if up.name in _MESSAGE_FILTERS:
                    node = up
                    continue
                return False
            if isinstance(up, nodes.For) and field_name == "iter":
                return True
            if isinstance(up, nodes.Assign) and field_name == "node":
                return True
            if isinstance(up, nodes.Test) and field_name == "node":
                return True
            return False

    for name in tree.find_all(nodes.Name):
        if name.ctx == "load" and name.name in message_names and not messages_ok(name):
            return False
    return True


class TemplateRenderer:
    """Renders prompts and targets exactly as :mod:`components.common.prompts` does, fast."""

    def __init__(self, tokenizer, fast: bool = True):
        self.tokenizer = tokenizer
        self._prompts: dict[tuple, list] = {}
        self._targets: dict[tuple, list] = {}
        self.fast = fast and template_is_content_opaque(tokenizer.chat_template)
        if self.fast:
            self.fast = self._probe()

    # --- exact (slow) renders -----------------------------------------------------------------

    def slow_prompt(self, messages: Sequence[dict]) -> str:
        return format_conversation_prompt(self.tokenizer, messages)

    def slow_target(self, messages: Sequence[dict], output_text: str) -> str:
        return format_target(self.tokenizer, messages, output_text)

    # --- fast renders -------------------------------------------------------------------------

    @staticmethod
    def _shape(messages: Sequence[dict]) -> tuple:
        return tuple(m["role"] for m in messages)

    @staticmethod
    def _pieces(text: str, count: int) -> list | None:
        """The text split at sentinels: literal strings and content indexes, alternating."""
        parts = _SENTINEL_RE.split(text)
        pieces: list = []
        for position, part in enumerate(parts):
            if position % 2:
                value = int(part)
                if value >= count:
                    return None
                pieces.append(value)
            elif part:
                pieces.append(part)
        return pieces

    @staticmethod
    def _splice(pieces: list, contents: Sequence[str]) -> str:
        return "".join(contents[p] if isinstance(p, int) else p for p in pieces)

    def _sentinel_messages(self, shape: tuple) -> list[dict]:
        return [{"role": role, "content": _SENTINEL.format(i)} for i, role in enumerate(shape)]

    def prompt(self, messages: Sequence[dict]) -> str:
        if not self.fast:
            return self.slow_prompt(messages)
        shape = self._shape(messages)
        pieces = self._prompts.get(shape)
        if pieces is None:
            pieces = self._pieces(self.slow_prompt(self._sentinel_messages(shape)), len(shape))
            if pieces is None:
                self.fast = False
                return self.slow_prompt(messages)
            self._prompts[shape] = pieces
        return self._splice(pieces, [m["content"] for m in messages])

    def target(self, messages: Sequence[dict], output_text: str) -> str:
        if not self.fast:
            return self.slow_target(messages, output_text)
        shape = self._shape(messages)
        pieces = self._targets.get(shape)
        if pieces is None:
            sentinels = self._sentinel_messages(shape)
            pieces = self._pieces(self.slow_target(sentinels, _SENTINEL.format(len(shape))),
                                  len(shape) + 1)
            if pieces is None:
                self.fast = False
                return self.slow_target(messages, output_text)
            self._targets[shape] = pieces
        return self._splice(pieces, [m["content"] for m in messages] + [output_text])

    # --- checks -------------------------------------------------------------------------------

    def matches_slow(self, messages: Sequence[dict], output_text: str | None = None) -> bool:
        """Whether the fast renders of ``messages`` equal the exact ones."""
        if self.prompt(messages) != self.slow_prompt(messages):
            return False
        return output_text is None or \
            self.target(messages, output_text) == self.slow_target(messages, output_text)

    def verify(self, messages: Sequence[dict], output_text: str | None = None) -> None:
        """Spot check; switches the fast path off (for good) on any difference."""
        if self.fast and not self.matches_slow(messages, output_text):
            self.fast = False

    def _probe(self) -> bool:
        try:
            for probe in _PROBES:
                for messages in ([{"role": "user", "content": probe}],
                                 [{"role": "system", "content": probe},
                                  {"role": "user", "content": probe + "?"}],
                                 [{"role": "user", "content": "q"},
                                  {"role": "assistant", "content": probe},
                                  {"role": "user", "content": probe}]):
                    if not self.matches_slow(messages, probe + "!"):
                        return False
        except Exception:  # noqa: BLE001 - a template that fails on probes takes the slow path
            return False
        return True

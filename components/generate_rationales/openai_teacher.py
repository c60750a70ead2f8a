"""A teacher behind an OpenAI-compatible chat completions API.

Works with OpenAI, vLLM, llama.cpp's server, Ollama (``/v1``) and tunepipe's own endpoints.
Each request is ``POST <base>/chat/completions`` with ``model``, ``messages``, ``temperature``,
``max_tokens``, ``top_p`` and ``seed``; the answer is ``choices[0].message.content`` and the token
counts are ``usage.prompt_tokens`` / ``usage.completion_tokens`` when the server sends them.
Without a model name the server's model list (``GET <base>/models``) must hold exactly one.

The API key, when needed, comes from the environment: ``TUNEPIPE_TEACHER_API_KEY``, else
``OPENAI_API_KEY``; it is sent as ``Authorization: Bearer ...`` to the reference's URL only (no
redirect is followed, see :mod:`.http_calls`) and never logged or written.
"""
from __future__ import annotations

import json
import os

from components.generate_rationales.call_log import Completion
from components.generate_rationales.http_calls import (RetryPolicy, TeacherCallError,
                                                       log_reply, printable, reason,
                                                       request_json)
from components.generate_rationales.prompting import TeacherRequest
from components.generate_rationales.teachers import HttpTeacher, TeacherSettings

API_KEY_VARIABLES = ("TUNEPIPE_TEACHER_API_KEY", "OPENAI_API_KEY")
CHAT_COMPLETIONS = "/chat/completions"


def openai_base_url(url: str) -> str:
    """The API root of an OpenAI-compatible URL (the root, or its chat completions URL)."""
    return url.rstrip("/").removesuffix(CHAT_COMPLETIONS)


def api_key_headers() -> dict[str, str]:
    """The Authorization header from the first API key variable that is set (or none)."""
    for name in API_KEY_VARIABLES:
        key = os.environ.get(name, "").strip()
        if key:
            return {"Authorization": f"Bearer {key}"}
    return {}


class OpenAITeacher(HttpTeacher):
    """``base_url`` is the API root (``http://127.0.0.1:8000/v1``) or the full chat completions
    URL; ``model`` None asks the server for its one model."""

    kind = "openai"

    def __init__(self, base_url: str, model: str | None, concurrency: int = 8,
                 policy: RetryPolicy = RetryPolicy()):
        super().__init__(concurrency, policy)
        self.base_url = openai_base_url(base_url)
        self.url = self.base_url + CHAT_COMPLETIONS
        self.headers = api_key_headers()
        self.model = model or self._only_model()
        self.identity = f"{self.url}#{self.model}"
        self.description = f"OpenAI-compatible {self.url}, model {self.model!r}"

    def _only_model(self) -> str:
        url = self.base_url + "/models"
        reply, _ = request_json(url, None, self.headers, self.policy, "listing the models")
        names = [m.get("id") for m in reply.get("data") or [] if isinstance(m, dict)]
        if len(names) != 1 or not isinstance(names[0], str):
            raise TeacherCallError(f"{url} lists {len(names)} models ({printable(repr(names))}); "
                                   f"name the one to use: openai:{self.base_url}#MODEL")
        return names[0]

    def call(self, request: TeacherRequest, settings: TeacherSettings) -> Completion:
        payload = {"model": self.model, "messages": list(request.messages),
                   "temperature": settings.temperature, "max_tokens": settings.max_output_tokens,
                   "top_p": settings.top_p, "seed": settings.seed}
        what = f"example {request.index} ({request.mode})"
        reply, attempts = request_json(self.url, payload, self.headers, self.policy, what)
        try:
            content = reply["choices"][0]["message"].get("content") or ""
            if not isinstance(content, str):
                raise TypeError(type(content).__name__)
        except (KeyError, IndexError, TypeError, AttributeError):
            log_reply(what, self.url, json.dumps(reply))
            raise TeacherCallError(f"{what}: {self.url} answered without choices[0].message."
                                   f"content{reason(reply)}") from None
        usage = reply.get("usage") or {}
        return Completion(content, usage.get("prompt_tokens"), usage.get("completion_tokens"),
                          attempts=attempts)

"""A teacher on loopback for the tests: a real HTTP server in the OpenAI chat-completions or the
Vertex predict shape, answering generate_rationales' prompts by a rule (``reply(prompt)``)."""
from __future__ import annotations

import json
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable

from components.generate_rationales.prompting import ANSWER, EXPLAIN

EXPLAIN_MARK = "The answer to the last input is given"  # in the prompt of an explain request


def last_input(prompt: str) -> str:
    """The input a teacher prompt asks about (after its last ``Input: ``)."""
    return prompt.rsplit("Input: ", 1)[1].split("\n")[0]


class FakeTeacher:
    """A real HTTP server on loopback in the OpenAI or Vertex shape; ``script(n, prompt)`` may
    answer the n-th request (1-based) itself with ``(status, headers, body)``, else
    ``reply(prompt)`` is the teacher's text."""

    def __init__(self, shape: str, reply: Callable[[str], str], script=None):
        self.shape, self.reply, self.script = shape, reply, script
        self.requests: list[dict] = []
        self.lock = threading.Lock()
        teacher = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                prompt = (body["messages"][-1]["content"] if teacher.shape == "openai"
                          else body["instances"][0]["prompt"])
                with teacher.lock:
                    teacher.requests.append({"path": self.path, "body": body, "prompt": prompt,
                                             "authorization": self.headers.get("Authorization")})
                    number = len(teacher.requests)
                reply = teacher.script(number, prompt) if teacher.script else None
                status, headers, payload = reply or (200, {}, teacher.ok(teacher.reply(prompt)))
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                try:
                    self.wfile.write(data)
                except OSError:  # the client gave up (a timeout test, or a killed process)
                    pass

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def ok(self, text: str) -> dict:
        if self.shape == "openai":
            return {"choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                 "finish_reason": "stop"}],
                    "usage": {"prompt_tokens": 100, "completion_tokens": 10, "total_tokens": 110}}
        return {"predictions": [{"content": text}],
                "metadata": {"tokenMetadata": {"inputTokenCount": {"totalTokens": 100},
                                               "outputTokenCount": {"totalTokens": 10}}}}

    def keys(self) -> Counter:
        """Requests per (kind, input)."""
        return Counter((EXPLAIN if EXPLAIN_MARK in r["prompt"] else ANSWER,
                        last_input(r["prompt"])) for r in self.requests)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

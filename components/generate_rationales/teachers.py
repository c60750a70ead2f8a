"""What every teacher backend is: it answers :class:`TeacherRequest` s, reporting each answer.

A backend's ``answer(requests, settings, on_answer)`` calls ``on_answer(request, completion)``
once per request as answers arrive (so the caller can log each one at once; HTTP backends call
it from their worker threads, so it must be thread-safe), and raises on the first call that
fails for good. The local backend generates in batches
(:mod:`.local_teacher`); the HTTP backends (:mod:`.openai_teacher`, :mod:`.vertex_teacher`)
send one request per call, ``concurrency`` calls at a time, each with the retry policy of
:mod:`.http_calls`. The backends are made from a reference by :mod:`.teacher_reference`.
"""
from __future__ import annotations

import math
import threading
import time
from abc import ABC, abstractmethod
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from typing import Callable, Sequence

from components.generate_rationales.call_log import Completion
from components.generate_rationales.http_calls import RetryPolicy
from components.generate_rationales.prompting import TeacherRequest

OnAnswer = Callable[[TeacherRequest, Completion], None]


@dataclass(frozen=True)
class TeacherSettings:
    """Decoding settings sent to the teacher (Vertex's meanings; 0 temperature is greedy).

    ``top_k`` 0 is off; OpenAI-compatible servers get no top-k. ``seed`` seeds sampling where
    the backend takes a seed.
    """

    max_output_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0

    def __post_init__(self) -> None:
        problems = []
        if not isinstance(self.max_output_tokens, int) or not 1 <= self.max_output_tokens <= 8192:
            problems.append(f"max_output_tokens must be an integer in [1, 8192], "
                            f"got {self.max_output_tokens!r}")
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            problems.append(f"temperature must be >= 0, got {self.temperature!r}")
        if not 0 < self.top_p <= 1:
            problems.append(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            problems.append(f"top_k must be an integer >= 0 (0: off), got {self.top_k!r}")
        if problems:
            raise ValueError("; ".join(problems))

    def to_dict(self) -> dict:
        return asdict(self)


class Teacher(ABC):
    """A teacher backend. ``identity`` names the model that answers (part of every answer's
    fingerprint); ``description`` says what it is, for reports. Neither holds a secret."""

    kind: str  # "local", "openai" or "vertex"
    identity: str
    description: str

    @abstractmethod
    def answer(self, requests: Sequence[TeacherRequest], settings: TeacherSettings,
               on_answer: OnAnswer) -> None:
        """Answers every request (see the module doc)."""


class HttpTeacher(Teacher):
    """A teacher behind HTTP: one call per request, ``concurrency`` at a time."""

    def __init__(self, concurrency: int, policy: RetryPolicy):
        if concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {concurrency}")
        self.concurrency = concurrency
        self.policy = policy

    @abstractmethod
    def call(self, request: TeacherRequest, settings: TeacherSettings) -> Completion:
        """One call; raises :class:`~.http_calls.TeacherCallError` when it fails for good."""

    def _timed_call(self, request: TeacherRequest, settings: TeacherSettings) -> Completion:
        started = time.perf_counter()
        completion = self.call(request, settings)
        return Completion(completion.text, completion.prompt_tokens, completion.completion_tokens,
                          round(time.perf_counter() - started, 3), completion.attempts)

    def answer(self, requests: Sequence[TeacherRequest], settings: TeacherSettings,
               on_answer: OnAnswer) -> None:
        """After the first failure no new call starts; calls under way finish and are still
        reported, then the failure is raised."""
        stop = threading.Event()

        def run(request: TeacherRequest) -> None:
            if stop.is_set():
                return
            try:
                completion = self._timed_call(request, settings)
            except BaseException:
                stop.set()
                raise
            on_answer(request, completion)  # before this thread starts another call

        failure: BaseException | None = None
        with ThreadPoolExecutor(self.concurrency, thread_name_prefix="teacher") as pool:
            futures = [pool.submit(run, r) for r in requests]
            try:
                for future in as_completed(futures):
                    if not future.cancelled() and future.exception() is not None:
                        failure = failure or future.exception()
            except BaseException:  # e.g. KeyboardInterrupt: start nothing new
                stop.set()
                raise
        if failure is not None:
            raise failure

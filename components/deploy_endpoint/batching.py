"""The endpoint's generation worker: requests from every HTTP thread, generated together.

Each request (a predict request's instances, or a chat completion) is queued, and one worker
thread generates for all of them on a ``DecodeBatch`` (continuous batching): between two decode
steps it admits the waiting requests that fit the batch (``max_rows`` rows,
``max_batch_tokens`` rows x cache length), prefilling them together, and it hands a request its
answers as soon as its last row finishes, while the other rows decode on. A request's rows join
together and keep its own sampling (parameters, generator seeded with its seed), so requests
with different parameters share a batch, and a greedy answer is the one the request would get
alone (up to float rounding in near ties, as ``components.common.generation`` says).

A request submitted with a ``listener`` hears its new tokens after every step that decoded
some (streaming), and ``cancel`` frees its rows: they leave the batch at the next step, as rows
that reached their ``max_output_tokens`` (a client that went away).

At most ``max_queued`` requests wait for a place in the batch; one more is refused at once
(``QueueFull``: the server answers 503) rather than left hanging. A request with more instances
than the batch has rows runs alone once the batch is empty, planned into batches as evaluate
plans a dataset (``generate_token_ids``; its listener hears its tokens when it ends). With
``batching=False`` every request runs alone in the batch, one at a time: the endpoint as it
served before, which ``benchmarks/bench_serve.py`` compares against.
"""
from __future__ import annotations

import itertools
import sys
import threading
import traceback
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Callable, Sequence

from components.common.generation import (DEFAULT_MAX_BATCH_TOKENS, DecodeBatch, RowSampling,
                                          SamplingParams, generate_token_ids)
from components.common.prefix_cache import DEFAULT_PREFIX_CACHE_BYTES, PrefixCache

DEFAULT_MAX_ROWS = 32  # rows decoded together
DEFAULT_MAX_QUEUED = 64  # requests waiting for a place in the batch

Answer = tuple[list[int], str]  # output token ids, finish reason
Listener = Callable[[int, list[int]], None]  # a prompt's index and its new token ids


class QueueFull(RuntimeError):
    """The worker already has ``max_queued`` requests waiting; the message says so."""


@dataclass(eq=False)  # a request is itself only
class _Request:
    prompts: list[list[int]]
    sampling: RowSampling
    seed: int
    listener: Listener | None
    future: Future = field(default_factory=Future)
    rows: list[int] = field(default_factory=list)
    unfinished: int = 0
    heard: list[int] = field(default_factory=list)  # tokens the listener heard, per prompt


class GenerationWorker:
    """Generates for requests submitted from any thread, on one worker thread (module doc)."""

    def __init__(self, model, stop_token_ids: Sequence[int], pad_token_id: int, *,
                 batching: bool = True, max_rows: int = DEFAULT_MAX_ROWS,
                 max_queued: int = DEFAULT_MAX_QUEUED,
                 max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS,
                 prefix_cache_bytes: int = DEFAULT_PREFIX_CACHE_BYTES):
        if max_rows < 1 or max_queued < 0:
            raise ValueError(f"max_rows must be >= 1 and max_queued >= 0, got {max_rows} and "
                             f"{max_queued}")
        self.model, self.stop_token_ids, self.pad_token_id = model, stop_token_ids, pad_token_id
        self.batching, self.max_rows, self.max_queued = batching, max_rows, max_queued
        self.max_batch_tokens = max_batch_tokens
        self.prefix_cache = PrefixCache(prefix_cache_bytes)  # for every request, alone or not
        self._batch = DecodeBatch(model, stop_token_ids, pad_token_id, self.prefix_cache)
        self._waiting: deque[_Request] = deque()
        self._active: dict[int, _Request] = {}  # row -> its request
        self._alone: _Request | None = None  # a request running alone (generate_token_ids)
        self._row_ids = itertools.count()
        self._condition = threading.Condition()
        self._closed = False
        self._steps = self._stepped_rows = 0  # decode steps of the shared batch, rows they ran
        self._thread = threading.Thread(target=self._run, name="generation-worker", daemon=True)
        self._thread.start()

    def submit(self, prompts: Sequence[Sequence[int]], params: SamplingParams,
               seed: int = 0, listener: Listener | None = None) -> Future:
        """Queues tokenized prompts; a future of their ``(token ids, finish reason)``, in order.
        ``listener`` is called on the worker's thread with each prompt's new tokens as they
        are decoded.

        Raises ``ValueError`` when ``params.max_output_tokens`` does not fit the model's context
        (a prompt too long keeps its end), ``QueueFull`` when ``max_queued`` requests wait.
        """
        fitted = self._batch.fit_to_context(prompts, params.max_output_tokens)
        request = _Request(fitted, self._batch.sampling(params, seed), seed, listener,
                           heard=[0] * len(fitted))
        with self._condition:
            if self._closed:
                raise RuntimeError("the generation worker is closed")
            if len(self._waiting) >= self.max_queued:
                raise QueueFull(f"the endpoint is busy: its queue of requests waiting for a "
                                f"place in the batch is full ({self.max_queued}); retry later")
            self._waiting.append(request)
            self._condition.notify()
        return request.future

    def cancel(self, future: Future) -> None:
        """Frees the rows of the request ``future`` answers (from any thread): a waiting request
        is dropped (its future cancelled); a running one's rows leave at the next step, which
        answers it with the tokens so far. Nothing for a request already answered, or one
        running alone (more prompts than ``max_rows``: it runs to its end)."""
        with self._condition:
            for request in self._waiting:
                if request.future is future:
                    self._waiting.remove(request)
                    future.cancel()
                    return
            rows = [row for row, request in self._active.items() if request.future is future]
        self._batch.stop(rows)

    def describe(self) -> dict:
        """The batching settings and what the shared batch did so far (the health route's)."""
        with self._condition:
            queued = len(self._waiting)
        return {"enabled": self.batching, "max_rows": self.max_rows,
                "max_queued": self.max_queued, "queued": queued,
                "running_rows": self._batch.rows, "decode_steps": self._steps,
                "mean_rows_per_step": round(self._stepped_rows / max(self._steps, 1), 2),
                "prefix_cache": self.prefix_cache.describe()}

    def close(self) -> None:
        """Stops the worker once the requests already submitted are answered."""
        with self._condition:
            self._closed = True
            self._condition.notify()
        self._thread.join()

    def _run(self) -> None:
        while True:
            with self._condition:
                while not (self._waiting or self._active):
                    if self._closed:
                        return
                    self._condition.wait()
                admitted = self._admit()
            try:
                if admitted:
                    self._start(admitted)
                else:
                    self._steps += 1
                    self._stepped_rows += self._batch.rows
                    self._batch.step()
                self._report()
                self._hand_over()
            except Exception as error:  # noqa: BLE001 - the requests hear of it; the worker goes on
                traceback.print_exc(file=sys.stderr)
                self._fail(admitted + list({id(r): r for r in self._active.values()}.values()),
                           error)

    def _admit(self) -> list[_Request]:
        """The waiting requests that join now, in arrival order (the lock held): as many as fit
        the batch, or the first alone where it runs alone (see the module doc)."""
        if not self._waiting:
            return []
        first = self._waiting[0]
        if self._runs_alone(first) or not self.batching:
            return [self._waiting.popleft()] if not self._active else []
        admitted: list[_Request] = []
        rows = longest = 0
        for request in self._waiting:
            if self._runs_alone(request):
                break
            count, length = rows + len(request.prompts), max(longest, *map(len, request.prompts))
            if (admitted or self._active) and not self._batch.can_join(
                    count, length, self.max_rows, self.max_batch_tokens):
                break  # an empty batch takes its first request whatever its length
            admitted.append(request)
            rows, longest = count, length
        for _ in admitted:
            self._waiting.popleft()
        return admitted

    def _runs_alone(self, request: _Request) -> bool:
        return len(request.prompts) > self.max_rows

    def _start(self, admitted: list[_Request]) -> None:
        """Runs a request alone, or prefills the admitted requests into the batch."""
        if self._runs_alone(admitted[0]):
            request, = admitted
            self._alone = request
            try:
                answers = generate_token_ids(
                    self.model, request.prompts, request.sampling.params,
                    stop_token_ids=self.stop_token_ids, pad_token_id=self.pad_token_id,
                    batch_size=self.max_rows, seed=request.seed,
                    max_batch_tokens=self.max_batch_tokens, prefix_cache=self.prefix_cache)
            finally:
                self._alone = None
            if request.listener:
                for index, (tokens, _) in enumerate(answers):
                    request.listener(index, tokens)
            request.future.set_result(answers)
            return
        prompts, rows, samplings = [], [], []
        for request in admitted:
            request.rows = [next(self._row_ids) for _ in request.prompts]
            request.unfinished = len(request.rows)
            self._active.update(dict.fromkeys(request.rows, request))
            prompts += request.prompts
            rows += request.rows
            samplings += [request.sampling] * len(request.prompts)
        self._batch.join(prompts, rows, samplings)

    def _report(self) -> None:
        """Tells listeners the tokens their rows chose since the last report."""
        for row, request in self._active.items():
            if request.listener is None:
                continue
            index = request.rows.index(row)
            tokens = self._batch.tokens(row)
            if len(tokens) > request.heard[index]:
                request.listener(index, tokens[request.heard[index]:])
                request.heard[index] = len(tokens)

    def _hand_over(self) -> None:
        """Answers every request whose last row finished."""
        for row in self._batch.finished():
            request = self._active.pop(row)
            request.unfinished -= 1
            if not request.unfinished:
                request.future.set_result([self._batch.result(r) for r in request.rows])

    def _fail(self, requests: list[_Request], error: Exception) -> None:
        """Fails ``requests`` with ``error`` and starts over with an empty batch."""
        for request in requests:
            if not request.future.done():
                request.future.set_exception(error)
        self._active.clear()
        self._batch.clear()

"""Benchmark: the endpoint under load, batched against one request at a time; and single-stream
decoding against llama.cpp.

Two endpoint servers (``components/deploy_endpoint/server.py``) serve the embedded model
(``resolve_model('text-bison@002')``, SmolLM2-135M-Instruct, in the precision and weights the
server chooses: float32 with int8 weights on an AVX2 CPU with a C compiler), side by side in
one run:

- ours: the server as it runs: requests generated together (continuous batching);
- baseline: the same server with ``--no-batching``: one request at a time.

Load: ``--clients`` concurrent clients (16), each sending its next chat predict request as soon
as the last one is answered (a closed loop, as a load generator such as ``wrk`` runs it), for
``--seconds`` (60) per server and round; client n goes through the turns of the held-out support
conversations (``samples/support_chat_heldout.jsonl``) from its own starting point. Greedy,
maxOutputTokens ``--max-output-tokens`` (128: the server's default, what the documentation's
requests send), over loopback. The servers take turns round by round (``--rounds``, 2),
alternating which goes first, so load from other work on a shared machine hits both alike.
Requests/s is the requests answered within the load's seconds, over those seconds: the rate the
server sustains with 16 requests always in flight (a fixed number of requests per client
instead would end each round with a tail where fewer and fewer clients are left, which measures
the clients' answer lengths more than the server). Requests in flight at the end are still
answered and checked. p50/p99: the latency of single requests. Every request must be answered
200 (the run fails otherwise); the two servers' answers are compared (greedy: equal but where
float rounding decides a near tie).

Single stream: one request alone to ours, a story of up to 128 tokens, tokens per second of wall
time (prompt included), the median of 3; then the same conversation with llama.cpp
(llama-cpp-python on the GGUF file the embedded model comes from, 2 threads, greedy, through the
GGUF's chat template) when it is installed (``make bench-deps``).

The last line is ``BENCH serve ratio=<ours/baseline> ours=<req/s> baseline=<req/s> unit=req/s
p50_ms=.. p99_ms=.. baseline_p50_ms=.. baseline_p99_ms=.. single_stream=<tokens/s>
llama_cpp=<tokens/s or n/a> capability=<CPU> dtype=<dtype>`` (``benchmarks/machine.py``).
Target: ratio >= 3; single-stream within 2x of llama.cpp.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_serve.py [--clients N] [--seconds S]
        [--rounds N] [--max-output-tokens N]
"""
from __future__ import annotations

import argparse
import http.client
import importlib.util
import json
import math
import os
import statistics
import sys
import tempfile
import time
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.machine import machine_fields  # noqa: E402
from components.common.model_catalog import EMBEDDED_MODEL, resolve_model  # noqa: E402
from components.common.model_loading import (FULL_MODEL_DIR, TUNED_MODEL_METADATA,  # noqa: E402
                                             load_tokenizer)
from components.common.paths import cache_dir  # noqa: E402

CONVERSATIONS = ROOT / "samples" / "support_chat_heldout.jsonl"
MAX_OUTPUT_TOKENS = 128  # the server's default, as the documentation's requests send
SECONDS = 60
STORY = "Write a short story about a dragon who learns to bake bread."
STORY_TOKENS = 128
SINGLE_STREAM_RUNS = 3
LLAMA_CPP_THREADS = 2
TARGET_RATIO = 3.0


def chat_instances() -> list[dict]:
    """Every held-out conversation cut after each of its user turns: Vertex chat instances."""
    instances = []
    for line in CONVERSATIONS.read_text().splitlines():
        messages = json.loads(line)["messages"]
        instances += [{"messages": messages[:end + 1]} for end, message in enumerate(messages)
                      if message["author"] == "user"]
    return instances


def serving_folder(checkpoint: str, directory: Path) -> Path:
    """The embedded model as a model folder the server loads (a full model, not tuned)."""
    (directory / FULL_MODEL_DIR).symlink_to(Path(checkpoint).resolve(), target_is_directory=True)
    load_tokenizer(checkpoint).save_pretrained(directory)
    (directory / TUNED_MODEL_METADATA).write_text(json.dumps({
        "display_name": "bench-serve",
        "base_model": {"reference": "text-bison@002", "checkpoint": checkpoint}}))
    return directory


def post(url: str, payload: dict) -> tuple[int, dict, float]:
    """POSTs JSON over a fresh connection: status, JSON reply, seconds."""
    parts = urllib.parse.urlsplit(url)
    started = time.perf_counter()
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=600)
    try:
        connection.request("POST", parts.path, json.dumps(payload),
                           {"Content-Type": "application/json"})
        response = connection.getresponse()
        reply = json.loads(response.read())
        return response.status, reply, time.perf_counter() - started
    finally:
        connection.close()


def percentile(values: list[float], fraction: float) -> float:
    """The nearest-rank percentile."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(fraction * len(ordered)) - 1)]


def run_load(url: str, instances: list[dict], clients: int, seconds: float, first: int,
             max_output_tokens: int) -> tuple[int, list[float], dict[int, str], list[str]]:
    """``clients`` threads, each sending its next request as soon as the last is answered, for
    ``seconds`` (a closed loop: the load stays at ``clients`` requests in flight). Client n
    goes through consecutive instances (the turns of a conversation) from ``first + 3n``.
    Returns the requests answered within ``seconds``, the latencies and answers (by instance
    number) of every request, those in flight at the end included, and the errors."""
    stride = max(1, len(instances) // clients)
    deadline = time.perf_counter() + seconds

    def client(number: int) -> list[tuple[int, int, dict, float, bool]]:
        sent = []
        index = 0
        while time.perf_counter() < deadline:
            instance = (first + number * stride + index) % len(instances)
            status, reply, latency = post(url, {
                "instances": [instances[instance]],
                "parameters": {"temperature": 0.0, "maxOutputTokens": max_output_tokens}})
            sent.append((instance, status, reply, latency, time.perf_counter() <= deadline))
            index += 1
        return sent

    with ThreadPoolExecutor(clients) as pool:
        results = [r for sent in pool.map(client, range(clients)) for r in sent]
    answered = sum(status == 200 and in_time for _, status, _, _, in_time in results)
    answers = {instance: reply["predictions"][0]["candidates"][0]["content"]
               for instance, status, reply, *_ in results if status == 200}
    errors = [f"{status}: {reply}" for _, status, reply, *_ in results if status != 200]
    return answered, [latency for _, _, _, latency, _ in results], answers, errors


def single_stream(url: str) -> float:
    """Tokens/s of one request alone: a story of up to STORY_TOKENS tokens (median of runs)."""
    rates = []
    for _ in range(SINGLE_STREAM_RUNS):
        status, reply, seconds = post(url, {
            "instances": [{"prompt": STORY}],
            "parameters": {"temperature": 0.0, "maxOutputTokens": STORY_TOKENS}})
        if status != 200:
            raise SystemExit(f"single-stream request failed: {status} {reply}")
        tokens = reply["metadata"]["tokenMetadata"]["outputTokenCount"]["totalTokens"]
        rates.append(tokens / seconds)
    return statistics.median(rates)


def llama_cpp_single_stream() -> float | None:
    """llama.cpp's tokens/s on the same story from the embedded GGUF file; None when
    llama-cpp-python is not installed."""
    if importlib.util.find_spec("llama_cpp") is None:
        return None
    from llama_cpp import Llama

    spec = importlib.util.find_spec(EMBEDDED_MODEL.package)  # the file only: no import
    gguf = Path(spec.origin).parent / EMBEDDED_MODEL.gguf_file
    model = Llama(model_path=str(gguf), n_threads=LLAMA_CPP_THREADS, n_ctx=2048, verbose=False)
    messages = [{"role": "user", "content": STORY}]
    model.create_chat_completion(messages, max_tokens=4, temperature=0.0)  # warm-up
    rates = []
    for _ in range(SINGLE_STREAM_RUNS):
        started = time.perf_counter()
        reply = model.create_chat_completion(messages, max_tokens=STORY_TOKENS, temperature=0.0)
        rates.append(reply["usage"]["completion_tokens"] / (time.perf_counter() - started))
    return statistics.median(rates)


def get_json(url: str) -> dict:
    parts = urllib.parse.urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
    try:
        connection.request("GET", "/")
        return json.loads(connection.getresponse().read())
    finally:
        connection.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=SECONDS,
                        help="of load per server and round (default %(default)s)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--max-output-tokens", type=int, default=MAX_OUTPUT_TOKENS,
                        help="maxOutputTokens of the load's requests (default %(default)s)")
    args = parser.parse_args(argv)

    checkpoint = resolve_model("text-bison@002").checkpoint
    # Endpoint records in a home of their own; the converted model stays where it is.
    os.environ["TUNEPIPE_CACHE"] = str(cache_dir())
    os.environ["TUNEPIPE_HOME"] = tempfile.mkdtemp(prefix="bench-serve-")
    from components.deploy_endpoint import endpoints

    folder = serving_folder(checkpoint, Path(os.environ["TUNEPIPE_HOME"]))
    servers = {"ours": endpoints.start_endpoint("bench-ours", folder),
               "baseline": endpoints.start_endpoint("bench-baseline", folder, ["--no-batching"])}
    try:
        health = get_json(servers["ours"].url)
        dtype = health["precision"].split()[1].rstrip(":")
        instances = chat_instances()
        print(f"{len(instances)} chat instances; {args.clients} clients for {args.seconds:.0f} s "
              f"x {args.rounds} rounds per server; maxOutputTokens={args.max_output_tokens}, "
              f"greedy; {health['precision']}, {health['weights']}; load average "
              f"{os.getloadavg()}", flush=True)
        for endpoint in servers.values():  # warm-up
            post(endpoint.predict_url, {"instances": instances[:2],
                                        "parameters": {"maxOutputTokens": 2}})
        answered = dict.fromkeys(servers, 0)
        latencies: dict[str, list[float]] = {name: [] for name in servers}
        answers: dict[str, dict[int, str]] = {name: {} for name in servers}
        errors: list[str] = []
        for number in range(args.rounds):
            first = number * args.clients  # each round starts elsewhere in the conversations
            for name in (("ours", "baseline") if number % 2 == 0 else ("baseline", "ours")):
                count, times, replies, failed = run_load(
                    servers[name].predict_url, instances, args.clients, args.seconds, first,
                    args.max_output_tokens)
                answered[name] += count
                latencies[name] += times
                answers[name].update(replies)
                errors += [f"{name}: {error}" for error in failed]
                print(f"round {number + 1}/{args.rounds} {name}: {count} requests answered in "
                      f"{args.seconds:.0f} s ({len(times)} sent)", flush=True)
        batching = get_json(servers["ours"].url)["batching"]
        ours_stream = single_stream(servers["ours"].predict_url)
    finally:
        for endpoint in servers.values():
            endpoints.stop_endpoint(endpoint.name, missing_ok=True)
    llama_cpp = llama_cpp_single_stream()

    rate = {name: answered[name] / (args.seconds * args.rounds) for name in servers}
    p50 = {name: percentile(latencies[name], 0.5) * 1000 for name in servers}
    p99 = {name: percentile(latencies[name], 0.99) * 1000 for name in servers}
    for name in servers:
        print(f"{name:8}: {rate[name]:.2f} requests/s, latency p50 {p50[name]:.0f} ms, "
              f"p99 {p99[name]:.0f} ms")
    print(f"ours: {batching['decode_steps']} decode steps, {batching['mean_rows_per_step']} "
          f"rows per step on average (at most {batching['max_rows']}); prompt tokens reused "
          f"from the prefix cache: {batching['prefix_cache']['reused_tokens']} of "
          f"{batching['prefix_cache']['prompt_tokens']}")
    same = sum(answers["ours"].get(i) == answer for i, answer in answers["baseline"].items())
    print(f"same answers: {same}/{len(answers['baseline'])} instances")
    ratio = rate["ours"] / rate["baseline"]
    print(f"speed-up {ratio:.2f}x (target >= {TARGET_RATIO:.0f}x: "
          f"{'met' if ratio >= TARGET_RATIO else 'NOT met'})")
    if llama_cpp is None:
        print(f"single stream: ours {ours_stream:.1f} tokens/s; llama.cpp not installed: "
              "make bench-deps")
    else:
        print(f"single stream: ours {ours_stream:.1f} tokens/s, llama.cpp {llama_cpp:.1f} "
              f"tokens/s ({LLAMA_CPP_THREADS} threads): ours at {ours_stream / llama_cpp:.2f}x "
              f"(target >= 0.5x: {'met' if ours_stream >= llama_cpp / 2 else 'NOT met'})")
    print(f"load average (1, 5, 15 min) at the end: {os.getloadavg()}")
    for error in errors:
        print(f"ERROR {error}")
    print(f"BENCH serve ratio={ratio:.2f} ours={rate['ours']:.2f} baseline={rate['baseline']:.2f} "
          f"unit=req/s p50_ms={p50['ours']:.0f} p99_ms={p99['ours']:.0f} "
          f"baseline_p50_ms={p50['baseline']:.0f} baseline_p99_ms={p99['baseline']:.0f} "
          f"single_stream={ours_stream:.1f} "
          f"llama_cpp={'n/a' if llama_cpp is None else f'{llama_cpp:.1f}'} "
          f"weights={health['weights'].split()[0]} kernel="
          f"{health['weights'].partition('kernel (')[2].partition(')')[0] or 'n/a'} "
          f"{machine_fields(dtype)}")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())

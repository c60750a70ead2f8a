"""A local prediction endpoint: one tuned model behind a Vertex-style HTTP API on loopback.

    POST /predict   (also any path ending in ``:predict``, as Vertex's REST paths do)
    {"instances": [{"prompt": "..."}], "parameters": {"temperature": 0.0, "maxOutputTokens": 128,
                                                     "topP": 0.95, "topK": 40}}
    -> {"predictions": [{"content": "..."}], "deployedModelId": ..., "metadata": {...}}
    GET /           -> health and model information

Run it with ``python -m components.deploy_endpoint.server --name N --model-dir D --ready-file F``;
it binds a free port on 127.0.0.1 and writes ``{"port": ...}`` to the ready file once it serves.
"""
from __future__ import annotations

import argparse
import json
import os
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

DEFAULT_PARAMETERS = {"temperature": 0.0, "maxOutputTokens": 128, "topP": 0.95, "topK": 40}
MAX_OUTPUT_TOKENS_LIMIT = 1024


class RequestError(ValueError):
    """A predict request that cannot be served; the message goes back to the client."""


def parse_predict_request(body: bytes) -> tuple[list[str], dict]:
    """The prompts and generation parameters of a Vertex-style predict request body."""
    try:
        request = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise RequestError(f"request body is not valid JSON: {error}") from None
    if not isinstance(request, dict) or not isinstance(request.get("instances"), list) \
            or not request["instances"]:
        raise RequestError('request must be {"instances": [{"prompt": "..."}, ...], "parameters": {...}}')
    prompts = []
    for number, instance in enumerate(request["instances"]):
        prompt = instance.get("prompt", instance.get("content")) if isinstance(instance, dict) else None
        if not isinstance(prompt, str) or not prompt.strip():
            raise RequestError(f"instances[{number}].prompt must be a non-empty string")
        prompts.append(prompt)
    parameters = dict(DEFAULT_PARAMETERS)
    given = request.get("parameters") or {}
    if not isinstance(given, dict):
        raise RequestError("parameters must be an object")
    unknown = sorted(set(given) - set(DEFAULT_PARAMETERS))
    if unknown:
        raise RequestError(f"unknown parameters {unknown}; supported: {sorted(DEFAULT_PARAMETERS)}")
    parameters.update(given)
    checks = {
        "temperature": lambda v: isinstance(v, (int, float)) and 0 <= v <= 2,
        "maxOutputTokens": lambda v: isinstance(v, int) and 1 <= v <= MAX_OUTPUT_TOKENS_LIMIT,
        "topP": lambda v: isinstance(v, (int, float)) and 0 < v <= 1,
        "topK": lambda v: isinstance(v, int) and 0 <= v <= 1000,
    }
    for name, check in checks.items():
        if isinstance(parameters[name], bool) or not check(parameters[name]):
            raise RequestError(f"parameters.{name}={parameters[name]!r} is out of range")
    return prompts, parameters


class Predictor:
    """The loaded model; generates for a list of prompts, one request at a time."""

    def __init__(self, name: str, model_dir: str):
        from components.common.model_loading import load_tuned_model, select_device
        from components.common.precision import choose_precision

        self.name, self.model_dir = name, model_dir
        device = select_device()
        self.precision = choose_precision(device)
        self.model, self.tokenizer, self.metadata = load_tuned_model(model_dir, device,
                                                                     self.precision.dtype)
        self._lock = threading.Lock()

    def predict(self, prompts: list[str], parameters: dict) -> dict:
        from components.common.generation import generate
        from components.common.prompts import format_prompt

        formatted = [format_prompt(self.tokenizer, prompt) for prompt in prompts]
        with self._lock:
            outputs = generate(self.model, self.tokenizer, formatted,
                               max_output_tokens=parameters["maxOutputTokens"],
                               temperature=float(parameters["temperature"]),
                               top_p=float(parameters["topP"]), top_k=parameters["topK"])
        input_tokens = sum(len(self.tokenizer(p, add_special_tokens=False).input_ids) for p in formatted)
        output_tokens = sum(len(self.tokenizer(o, add_special_tokens=False).input_ids) for o in outputs)
        return {
            "predictions": [{"content": output} for output in outputs],
            "deployedModelId": self.name,
            "metadata": {"tokenMetadata": {"inputTokenCount": {"totalTokens": input_tokens},
                                           "outputTokenCount": {"totalTokens": output_tokens}}},
        }


def make_handler(predictor: Predictor):
    """The request handler class bound to ``predictor``."""

    class Handler(BaseHTTPRequestHandler):
        def _reply(self, status: HTTPStatus, payload: dict) -> None:
            body = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
            self._reply(HTTPStatus.OK, {"name": predictor.name, "model_dir": predictor.model_dir,
                                        "base_model": predictor.metadata.get("base_model", {}),
                                        "precision": predictor.precision.describe(),
                                        "status": "ready"})

        def do_POST(self) -> None:  # noqa: N802
            if not (self.path.rstrip("/").endswith("/predict") or self.path.endswith(":predict")):
                self._reply(HTTPStatus.NOT_FOUND, {"error": f"no route {self.path}; POST /predict"})
                return
            length = int(self.headers.get("Content-Length") or 0)
            try:
                prompts, parameters = parse_predict_request(self.rfile.read(length))
            except RequestError as error:
                self._reply(HTTPStatus.BAD_REQUEST, {"error": str(error)})
                return
            self._reply(HTTPStatus.OK, predictor.predict(prompts, parameters))

        def log_message(self, format: str, *args) -> None:  # noqa: A002
            print(f"{self.address_string()} {format % args}", flush=True)

    return Handler


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--name", required=True)
    parser.add_argument("--model-dir", required=True)
    parser.add_argument("--ready-file", required=True)
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args(argv)
    predictor = Predictor(args.name, args.model_dir)
    server = ThreadingHTTPServer(("127.0.0.1", args.port), make_handler(predictor))
    staging = args.ready_file + ".partial"
    with open(staging, "w") as ready:
        json.dump({"port": server.server_address[1], "pid": os.getpid()}, ready)
    os.replace(staging, args.ready_file)
    print(f"endpoint {args.name} serving on http://127.0.0.1:{server.server_address[1]}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()

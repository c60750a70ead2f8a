"""The ``tunepipe`` command: compile, run, validate, evaluate, models, endpoints, runs, serve (its
argument parsing and one function per command; the run summary is :mod:`command.run_summary`,
the run folders :mod:`command.runs`)."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

USAGE_ERROR = 2


def _parse_param(text: str) -> tuple[str, str]:
    name, separator, value = text.partition("=")
    if not separator or not name:
        raise argparse.ArgumentTypeError(f"--param takes NAME=VALUE, got {text!r}")
    return name, value


def cmd_compile(args: argparse.Namespace) -> int:
    from pipelines.templates import compile_all, default_image

    image = args.image or default_image()
    for path in compile_all(Path(args.output_dir), image):
        print(f"wrote {path}")
    print(f"components run in {image}")
    return 0


def cmd_publish(args: argparse.Namespace) -> int:
    import requests

    from pipelines.vertex_publish import publish

    try:
        published = publish(args.host, args.tag, Path(args.compiled_dir))
    except FileNotFoundError as error:
        print(f"tunepipe publish: {error}", file=sys.stderr)
        return USAGE_ERROR
    except requests.RequestException as error:
        print(f"tunepipe publish: the registry at {args.host} refused the upload: {error}",
              file=sys.stderr)
        return 1
    for entry in published:
        print(f"published {entry.path} as {args.host.rstrip('/')}/{entry.package}/{entry.version}"
              + (f" (tags: {', '.join(args.tag)})" if args.tag else ""))
    return 0


def _request(args: argparse.Namespace):
    """The RunRequest of ``run`` and ``submit``: a pipeline name or request file, --param and
    --pipeline-root; raises ParameterError or ValueError."""
    from pipelines.local_run import RunRequest, request_from_file
    from pipelines.templates import ParameterError, template_path

    if args.request_file:
        request = request_from_file(args.request_file, args.pipeline)
        request.parameters.update(dict(args.param))
    elif args.pipeline:
        request = RunRequest(template_path(args.pipeline), dict(args.param))
    else:
        raise ParameterError("name a pipeline or give --request-file")
    if args.pipeline_root:
        request.pipeline_root = request.output_directory = args.pipeline_root
    return request


def _invalid_request(command: str, error: Exception) -> int:
    """Reports a refused request (one problem: on one line); the usage-error status."""
    lines = str(error).strip().splitlines()
    if len(lines) == 1:
        print(f"tunepipe {command}: invalid request: {lines[0].strip().removeprefix('- ')}",
              file=sys.stderr)
    else:
        print(f"tunepipe {command}: invalid request:\n{error}", file=sys.stderr)
    return USAGE_ERROR


def _print_request_body(request, pipeline_name: str, values: dict) -> None:
    from pipelines.local_run import request_body

    print(json.dumps(request_body(request, pipeline_name, values), indent=2))


def cmd_run(args: argparse.Namespace) -> int:
    from pipelines.held_out import compare_on_held_out, read_held_out
    from pipelines.local_run import TaskFailedError, prepare, run_locally
    from pipelines.templates import ParameterError

    if args.expect_ending and not args.held_out:
        print("tunepipe run: --expect-ending checks the replies to --held-out conversations; "
              "give --held-out FILE too", file=sys.stderr)
        return USAGE_ERROR
    try:
        request = _request(args)
        for note in request.notes:  # a dry run's stdout is the request body alone
            print(f"note: {note}", file=sys.stderr if args.dry_run else sys.stdout)
        default_context = str(request.parameters.get("default_context", ""))
        if args.held_out:
            read_held_out(args.held_out, default_context)  # a bad file is refused before the run
        pipeline_name, values = prepare(request)  # refuses a bad request before anything starts
        if args.dry_run:
            _print_request_body(request, pipeline_name, values)
            return 0
        run = run_locally(request, pipeline_name, values, verbose=args.verbose)
    except TaskFailedError as failure:
        print(f"tunepipe run: {failure.task} failed:\n{failure.message}", file=sys.stderr)
        return 1
    except (ParameterError, ValueError, FileNotFoundError) as error:
        return _invalid_request("run", error)
    from command.run_summary import print_run_summary
    from components.common.model_registry import get_model

    parameters = request.parameters
    held_out = None
    if args.held_out:
        print(f"Held-out check: base and tuned model answer {args.held_out} ...", flush=True)
        held_out = compare_on_held_out(get_model(parameters["model_display_name"]).path,
                                       args.held_out, default_context, args.expect_ending)
    print_run_summary(run, parameters, held_out)
    return 0


def cmd_submit(args: argparse.Namespace) -> int:
    from pipelines.local_run import prepare
    from pipelines.submit import (KFP_DONE, VERTEX_DONE, SubmissionError, check_pipeline_root,
                                  follow, google_credentials_found, submit_to_kfp,
                                  submit_to_vertex, vertex_template)
    from pipelines.parameters import REGIONS
    from pipelines.templates import ParameterError

    # a dry run without credentials checks everything but that gs:// locations exist
    unchecked = [] if args.dry_run and not google_credentials_found() else None
    try:
        if args.vertex and not (args.project and args.region):
            raise ParameterError("--vertex needs --project and --region")
        if args.vertex and args.region not in REGIONS:
            raise ParameterError(f"--region {args.region} is not a Vertex AI Pipelines region "
                                 f"for tuning; use one of: {', '.join(REGIONS)}")
        request = _request(args)
        pipeline_name, values = prepare(request, remote=True, unchecked_gcs=unchecked)
        request.pipeline_root = request.output_directory  # not the local runner's runs/
        if args.vertex:
            check_pipeline_root(request.pipeline_root, unchecked)
        if args.service_account:
            request.service_account = args.service_account
        if args.vertex:
            request.template = vertex_template(request.template)
    except (ParameterError, ValueError, FileNotFoundError) as error:
        return _invalid_request("submit", error)
    if unchecked:
        print(f"note: no Google credentials: skipped checking that {', '.join(unchecked)} "
              "exist (`gcloud auth application-default login` lets the dry run check them; "
              "submitting needs it)", file=sys.stderr)
    if args.dry_run:
        _print_request_body(request, pipeline_name, values)
        return 0
    try:
        if args.vertex:
            submitted = submit_to_vertex(request, values, args.project, args.region,
                                         args.api_endpoint)
        else:
            submitted = submit_to_kfp(request, values, args.kfp_host)
        print(f"submitted {pipeline_name}: {submitted.name}")
        print(f"watch it: {submitted.link}", flush=True)
        if args.wait:
            follow(submitted, VERTEX_DONE if args.vertex else KFP_DONE)
    except SubmissionError as error:
        print(f"tunepipe submit: {error}", file=sys.stderr)
        return 1
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from components.common.model_registry import list_models

    models = list_models(all_versions=True)
    if not models:
        print("no registered models", file=sys.stderr)
    versions: dict[str, list[int]] = {}
    for model in models:
        versions.setdefault(model.display_name, []).append(model.version)
    for model in models:
        if args.all:
            print(f"{model.resource_name}\t{model.path}")
        elif model.version == versions[model.display_name][-1]:
            count = len(versions[model.display_name])
            print(f"{model.resource_name}\t{model.path}\t"
                  + ("1 version" if count == 1 else f"{count} versions (--all lists them)"))
    return 0


def cmd_endpoints(args: argparse.Namespace) -> int:
    from components.deploy_endpoint import endpoints

    try:
        if args.action == "list":
            running = endpoints.list_endpoints()
            if not running:
                print("no running endpoints", file=sys.stderr)
            for endpoint in running:
                print(f"{endpoint.name}\t{endpoint.predict_url}\tpid {endpoint.pid}\t"
                      f"{endpoint.model_dir}\tlog {endpoint.log}")
        elif args.action == "deploy":
            endpoint = _deploy(args.model, args.name)
            print(f"{endpoint.name}\t{endpoint.predict_url}\tpid {endpoint.pid}\t"
                  f"{endpoint.model_dir}\tlog {endpoint.log}")
        elif args.action == "predict":
            parameters = {key: value for key, value in (
                ("temperature", args.temperature), ("maxOutputTokens", args.max_output_tokens),
                ("topP", args.top_p), ("topK", args.top_k)) if value is not None}
            if args.message:
                reply = endpoints.predict_chat(args.name, args.message, args.context, parameters)
            elif args.context:
                print("tunepipe endpoints predict: --context goes with a chat request (--message)",
                      file=sys.stderr)
                return USAGE_ERROR
            else:
                reply = endpoints.predict(args.name, args.prompt, parameters)
            if args.json:
                print(json.dumps(reply, indent=2))
            else:
                for prediction in reply["predictions"]:
                    print(prediction["candidates"][0]["content"] if args.message
                          else prediction["content"])
        elif args.action == "stop":
            if args.all == bool(args.name):
                print("tunepipe endpoints stop: name an endpoint or give --all", file=sys.stderr)
                return USAGE_ERROR
            if args.all:
                stopped = endpoints.stop_all_endpoints()
                print(f"stopped {', '.join(stopped)}" if stopped else "no running endpoints")
            else:
                stopped = endpoints.stop_endpoint(args.name)
                print(f"stopped {args.name}" if stopped
                      else f"{args.name} was not running; record removed")
    except (LookupError, RuntimeError, ValueError) as error:
        print(f"tunepipe endpoints: {error}", file=sys.stderr)
        return 1
    return 0


def _deploy(model: str, name: str | None):
    """Starts an endpoint for a registered model (``NAME``, ``NAME@VERSION``) or a tuned model
    folder, named ``name`` or else after the model."""
    from components.common.model_registry import check_display_name, resolve_model_dir
    from components.common.paths import registry_dir
    from components.deploy_endpoint.endpoints import start_endpoint

    model_dir = resolve_model_dir(model).resolve()
    registered = model_dir.parent.parent == registry_dir().resolve()
    name = name or (model_dir.parent.name if registered else model_dir.name)
    check_display_name(name)
    print(f"starting {name} for {model_dir} ...", file=sys.stderr, flush=True)
    return start_endpoint(name, model_dir)


def cmd_runs(args: argparse.Namespace) -> int:
    from command import runs

    root = Path(args.pipeline_root).expanduser()
    if args.action == "rm" and args.all == bool(args.run):
        print("tunepipe runs rm: name a RUN or give --all", file=sys.stderr)
        return USAGE_ERROR
    try:
        if args.action == "list":
            lines = runs.list_lines(root)
            print("\n".join(lines) if lines else f"no runs in {root}",
                  file=sys.stdout if lines else sys.stderr)
            return 0
        if args.action == "show":
            print("\n".join(runs.show_lines(runs.find_run(root, args.run))))
            return 0
        chosen = runs.list_runs(root) if args.all else [runs.find_run(root, args.run)]
    except LookupError as error:
        print(f"tunepipe runs: {error}", file=sys.stderr)
        return 1
    removed, kept = runs.remove(chosen)
    for run in removed:
        print(f"removed {run.path}")
    for reason in kept:
        print(f"tunepipe runs rm: kept {reason}", file=sys.stderr)
    return 1 if kept else 0


def cmd_serve(args: argparse.Namespace) -> int:
    from service.server import ServeConfig, run

    given = {"host": args.host, "port": args.port, "token": args.token,
             "max_body_bytes": args.max_body_bytes}
    return run(ServeConfig(allow_roots=args.allow_root, allow_origins=args.allow_origin,
                           allow_teacher_urls=args.allow_teacher_url,
                           **{name: value for name, value in given.items() if value is not None}))


def build_parser() -> argparse.ArgumentParser:
    from pipelines.local_run import DEFAULT_PIPELINE_ROOT

    parser = argparse.ArgumentParser(
        prog="tunepipe",
        description="Vertex AI's LLM tuning pipelines as open Kubeflow Pipelines.")
    commands = parser.add_subparsers(dest="command", required=True)

    compiled_dir = str(Path(__file__).resolve().parent.parent / "compiled")
    compile_parser = commands.add_parser(
        "compile", help="write the pipeline templates: compiled/<pipeline>.yaml (portable) and "
                        "compiled/vertex/<pipeline>.yaml (Vertex AI)")
    compile_parser.add_argument("--output-dir", default=compiled_dir)
    compile_parser.add_argument("--image", help="the image components run in (default: "
                                                "$TUNEPIPE_IMAGE or ghcr.io/tunepipe/tunepipe:0.1.0)")
    compile_parser.set_defaults(handler=cmd_compile)

    publish_parser = commands.add_parser(
        "publish", help="upload the Vertex templates to a KFP template registry")
    publish_parser.add_argument("--host", required=True,
                                help="the registry, e.g. https://us-central1-kfp.pkg.dev/PROJECT/REPO")
    publish_parser.add_argument("--tag", action="append", default=[],
                                help="a tag for the uploaded version (repeatable)")
    publish_parser.add_argument("--compiled-dir", default=compiled_dir)
    publish_parser.set_defaults(handler=cmd_publish)

    run = commands.add_parser("run", help="run a compiled template with the KFP local runner")
    run.add_argument("pipeline", nargs="?", help="template name (tune-large-model) or YAML path")
    run.add_argument("--param", action="append", type=_parse_param, default=[],
                     metavar="NAME=VALUE", help="a pipeline parameter (repeatable)")
    run.add_argument("--request-file", help="a Vertex pipelineJobs request body (JSON)")
    run.add_argument("--pipeline-root", help="where outputs go (default: runs/)")
    run.add_argument("--verbose", action="store_true", help="also show each task's executor input")
    run.add_argument("--held-out", metavar="FILE",
                     help="chat JSONL: after the run, the base and the tuned model answer each "
                          "conversation's last user turn (the last assistant reply is the "
                          "reference); the summary compares them")
    run.add_argument("--expect-ending", default="", metavar="TEXT",
                     help="with --held-out: the rule the summary counts, a reply that ends "
                          "with TEXT (trailing whitespace aside)")
    run.add_argument("--dry-run", action="store_true",
                     help="check everything (template, parameters, datasets, model) and print "
                          "the request body; run nothing")
    run.set_defaults(handler=cmd_run)

    submit = commands.add_parser(
        "submit", help="submit a template to Vertex AI Pipelines or Kubeflow Pipelines")
    submit.add_argument("pipeline", nargs="?", help="template name (tune-large-model) or YAML path")
    submit.add_argument("--param", action="append", type=_parse_param, default=[],
                        metavar="NAME=VALUE", help="a pipeline parameter (repeatable)")
    submit.add_argument("--request-file", help="a Vertex pipelineJobs request body (JSON)")
    target = submit.add_mutually_exclusive_group(required=True)
    target.add_argument("--vertex", action="store_true", help="submit to Vertex AI Pipelines")
    target.add_argument("--kfp-host", metavar="URL", help="submit to this KFP API server")
    submit.add_argument("--project", help="Google Cloud project (with --vertex)")
    submit.add_argument("--region", help="pipeline job region (with --vertex)")
    submit.add_argument("--pipeline-root", metavar="URI",
                        help="where outputs go (Vertex: gs://BUCKET/DIR; default: the request's "
                             "gcsOutputDirectory)")
    submit.add_argument("--service-account", metavar="SA", help="the account the run runs as")
    submit.add_argument("--api-endpoint", metavar="URL",
                        help="a Vertex AI API endpoint other than REGION-aiplatform.googleapis.com "
                             "(an http:// one, a local fake, is called without credentials)")
    submit.add_argument("--wait", action="store_true", help="follow the run's state to its end")
    submit.add_argument("--dry-run", action="store_true",
                        help="check everything and print the request body; send nothing")
    submit.set_defaults(handler=cmd_submit)

    models = commands.add_parser("models", help="list registered models")
    models.add_argument("action", choices=["list"])
    models.add_argument("--all", action="store_true",
                        help="every version (by default the latest, with the number of versions)")
    models.set_defaults(handler=cmd_models)

    endpoints = commands.add_parser("endpoints", help="manage local endpoints")
    actions = endpoints.add_subparsers(dest="action", required=True)
    actions.add_parser("list", help="running endpoints: name, URL, pid, model, log")
    deploy = actions.add_parser("deploy", help="start an endpoint for a registered model")
    deploy.add_argument("model", metavar="MODEL[@VERSION]",
                        help="a registered model (latest version unless @VERSION; see `tunepipe "
                             "models list --all`) or a tuned model folder")
    deploy.add_argument("--name", help="the endpoint's name (default: the model's name); one "
                                       "of that name is replaced")
    predict = actions.add_parser("predict", help="send a predict request (text or chat)")
    predict.add_argument("name")
    shape = predict.add_mutually_exclusive_group(required=True)
    shape.add_argument("--prompt", action="append",
                       help="a text prompt; repeatable (one prediction each)")
    shape.add_argument("--message", action="append",
                       help="a chat turn; repeatable: user, assistant, user, ... in order")
    predict.add_argument("--context", default="", help="the chat's system context (with --message)")
    predict.add_argument("--temperature", type=float)
    predict.add_argument("--max-output-tokens", type=int)
    predict.add_argument("--top-p", type=float)
    predict.add_argument("--top-k", type=int)
    predict.add_argument("--json", action="store_true", help="print the whole reply")
    stop = actions.add_parser("stop", help="stop an endpoint, or all of them")
    stop.add_argument("name", nargs="?")
    stop.add_argument("--all", action="store_true", help="stop every endpoint")
    endpoints.set_defaults(handler=cmd_endpoints)

    runs = commands.add_parser("runs", help="the local runs' folders: list, show, remove")
    runs_actions = runs.add_subparsers(dest="action", required=True)
    runs_actions.add_parser("list", help="runs, newest first: run, pipeline, state, size, age")
    show = runs_actions.add_parser("show", help="a run's tasks, outputs, metrics and reports")
    show.add_argument("run", help="a run folder's name (from `tunepipe runs list`) or path")
    remove = runs_actions.add_parser(
        "rm", help="delete run folders (not one a task is still running in); asks nothing")
    remove.add_argument("run", nargs="?", help="a run folder's name or path")
    remove.add_argument("--all", action="store_true", help="every run under the pipeline root")
    for parser_ in runs_actions.choices.values():
        parser_.add_argument("--pipeline-root", default=DEFAULT_PIPELINE_ROOT,
                             help="where the runs are (default: runs/, as for `tunepipe run`)")
    runs.set_defaults(handler=cmd_runs)

    serve = commands.add_parser(
        "serve", help="serve a local REST API in Vertex AI's shape (pipelineJobs, tuningJobs, "
                      "models, endpoints)")
    serve.add_argument("--host",
                       help="the address to bind (default 127.0.0.1; any other needs --token)")
    serve.add_argument("--port", type=int, help="default 8080; 0 picks a free one")
    serve.add_argument("--token", help="the bearer token every request must carry (default: "
                                       "$TUNEPIPE_SERVE_TOKEN; none on 127.0.0.1)")
    serve.add_argument("--allow-root", action="append", default=[], metavar="FOLDER",
                       help="a folder whose files requests may name (repeatable; the tunepipe "
                            "home and the current directory always are)")
    serve.add_argument("--allow-teacher-url", action="append", default=[], metavar="URL",
                       help="a URL prefix the teachers of distillation jobs may call, with the "
                            "API key or Vertex token (repeatable; e.g. http://127.0.0.1:8000/v1, "
                            "https://us-central1-aiplatform.googleapis.com; default none)")
    serve.add_argument("--allow-origin", action="append", default=[], metavar="ORIGIN",
                       help="a web page origin (e.g. http://127.0.0.1:3000) whose requests are "
                            "answered, with CORS headers (repeatable; by default requests from "
                            "web pages other than the server's own are refused)")
    serve.add_argument("--max-body-bytes", type=int,
                       help="larger request bodies are refused (413); default 16 MiB")
    serve.set_defaults(handler=cmd_serve)

    for name, help_text in (("validate", "check a dataset against the rules"),
                            ("evaluate", "evaluate a model on an evaluation set")):
        delegated = commands.add_parser(name, help=help_text, add_help=False)
        delegated.add_argument("rest", nargs=argparse.REMAINDER)
        delegated.set_defaults(handler=None)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # validate and evaluate own their arguments: hand them everything after the command.
    if argv and argv[0] == "validate":
        from components.validate_dataset.cli import main as validate_main
        return validate_main(argv[1:])
    if argv and argv[0] == "evaluate":
        from components.evaluate.cli import main as evaluate_main
        return evaluate_main(argv[1:])
    args = build_parser().parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())

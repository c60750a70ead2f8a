"""The server: its settings, the routes of every collection, and ``tunepipe serve``'s loop.

Safe by default: it binds 127.0.0.1; binding any other address needs a bearer token
(``--token`` or ``$TUNEPIPE_SERVE_TOKEN``), and once a token is set every request must carry it.
Bound to loopback, it answers only requests whose ``Host`` is its loopback address; requests from
web pages are refused unless their origin is one the operator allows (``--allow-origin``).
Request bodies over ``max_body_bytes`` are refused unread; connections, slow clients and load
are bounded as :mod:`components.common.http_server` says. One server runs per tunepipe home
(:mod:`service.home_lock`).
"""
from __future__ import annotations

import ipaddress
import os
import signal
import sys
from dataclasses import dataclass, field

from components.common.http_server import HttpServer, Limits, RequestGuard
from components.generate_rationales.outbound import TeacherAllowList
from service.endpoints import Endpoints
from service.home_lock import HomeLock, HomeLockError
from service.http_api import Route, error_body, make_app
from service.jobs import JobRunner
from service.local_paths import AllowedRoots
from service.models import Models
from service.pipeline_jobs import COLLECTION as PIPELINE_JOBS, PipelineJobs
from service.records import RecordStore, service_dir
from service.tuning_jobs import COLLECTION as TUNING_JOBS, TuningJobs

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8080
DEFAULT_MAX_BODY_BYTES = 16 * 2**20  # an inline pipelineSpec is about 60 kB
TOKEN_ENV = "TUNEPIPE_SERVE_TOKEN"


@dataclass
class ServeConfig:
    """How ``tunepipe serve`` runs; ``token`` None reads ``$TUNEPIPE_SERVE_TOKEN``."""

    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    token: str | None = None
    allow_roots: list[str] = field(default_factory=list)
    allow_origins: list[str] = field(default_factory=list)
    allow_teacher_urls: list[str] = field(default_factory=list)
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES


def is_loopback(host: str) -> bool:
    """Whether ``host`` is a loopback address (or ``localhost``)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class Service:
    """The HTTP server with its job runner; ``with Service(config) as service`` serves on a
    thread until the block ends (tests), :meth:`serve_forever` on the calling thread."""

    def __init__(self, config: ServeConfig):
        token = config.token if config.token is not None else os.environ.get(TOKEN_ENV) or None
        if not token and not is_loopback(config.host):
            raise ValueError(f"binding {config.host} opens the API to other machines: give "
                             f"--token TOKEN (or set {TOKEN_ENV}); clients then send "
                             "'Authorization: Bearer TOKEN'")
        self.teacher_urls = TeacherAllowList.parse(config.allow_teacher_urls)
        self.lock = HomeLock.acquire()
        try:
            self.runner = JobRunner()
            self.roots = AllowedRoots.default(config.allow_roots)
            jobs = [PipelineJobs(RecordStore(PIPELINE_JOBS), self.runner, self.roots,
                                 teacher_urls=self.teacher_urls),
                    TuningJobs(RecordStore(TUNING_JOBS), self.runner, self.roots)]
            routes: list[Route] = [r for collection in jobs for r in collection.routes()]
            routes += Models().routes() + Endpoints().routes()
            limits = Limits(max_body_bytes=config.max_body_bytes,
                            max_body_setting="tunepipe serve --max-body-bytes")
            guard = RequestGuard.of(is_loopback(config.host), config.allow_origins)
            self.http = HttpServer(make_app(routes, token, limits, guard), config.host,
                                   config.port, limits, error_body)
        except BaseException:
            self.lock.release()
            raise
        self.lock.record(self.url)
        self.runner.start([collection.kind for collection in jobs])

    @property
    def url(self) -> str:
        return self.http.url

    def serve_forever(self) -> None:
        """Serves on the calling thread until :meth:`close` (from another thread), SIGINT or
        SIGTERM."""
        self.http.serve_forever()

    def close(self) -> None:
        """Stops serving and stops the runner (a running job ends FAILED)."""
        self.http.stop()
        self.runner.stop()
        self.lock.release()

    def __enter__(self) -> Service:
        self.http.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def run(config: ServeConfig) -> int:
    """``tunepipe serve``: serves until Ctrl-C or SIGTERM; the exit status."""
    try:
        service = Service(config)
    except ValueError as error:
        print(f"tunepipe serve: {error}", file=sys.stderr)
        return 2
    except HomeLockError as error:
        print(f"tunepipe serve: {error}", file=sys.stderr)
        return 1
    except OSError as error:
        print(f"tunepipe serve: cannot listen on {config.host}:{config.port}: {error}",
              file=sys.stderr)
        return 1
    signal.signal(signal.SIGTERM, _interrupt)
    teacher_urls = ", ".join(map(str, service.teacher_urls.prefixes))
    print(f"tunepipe serve: listening on {service.url}\n"
          f"  Vertex AI REST API: {service.url}/v1/projects/PROJECT/locations/LOCATION/...\n"
          f"  records: {service_dir()}\n"
          f"  local paths allowed under: {', '.join(map(str, service.roots.roots))}\n"
          f"  distillation teachers may call: {teacher_urls or 'no URL (--allow-teacher-url)'}\n"
          "  Ctrl-C stops it", flush=True)
    try:
        service.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        service.close()
    print("tunepipe serve: stopped", flush=True)
    return 0

"""The Kubernetes API of the cluster a task's pod runs in, over REST, as the pod's service account.

In a pod the API server is ``https://$KUBERNETES_SERVICE_HOST:$KUBERNETES_SERVICE_PORT``. Every
request carries the service account's token and TLS is verified against its ``ca.crt``; both,
with the pod's ``namespace``, are in ``/var/run/secrets/kubernetes.io/serviceaccount/``.

For tests and development only: ``TUNEPIPE_KUBERNETES_API`` names another API server (an
``http://`` URL is then allowed, as a fake on loopback needs; an ``https://`` one is verified
against ``ca.crt`` as always) and ``TUNEPIPE_SERVICE_ACCOUNT_DIR`` another service-account folder.
"""
from __future__ import annotations

import json
import os
import ssl
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from components.common.cluster import CLUSTER_ENV

SERVICE_ACCOUNT_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")
API_URL_ENV = "TUNEPIPE_KUBERNETES_API"  # tests and development only
ACCOUNT_DIR_ENV = "TUNEPIPE_SERVICE_ACCOUNT_DIR"  # tests and development only
REQUEST_TIMEOUT_S = 30


class ApiError(RuntimeError):
    """An answer of the API server other than 2xx; ``status`` is the HTTP status and
    ``details`` the ``details`` of its Status object (empty when it sent none)."""

    def __init__(self, method: str, path: str, status: int, body: str) -> None:
        try:
            answer = json.loads(body)
        except ValueError:
            answer = None
        if not isinstance(answer, dict):
            answer = {"message": body.strip()}
        self.status = status
        self.reason = answer.get("reason", "")
        self.message = answer.get("message", "")
        self.details = answer.get("details") or {}
        super().__init__(f"{method} {path}: HTTP {status} {self.reason}: {self.message}")


@dataclass(frozen=True)
class KubernetesApi:
    """An API server and the service-account folder whose token and CA it uses."""

    url: str
    account_dir: Path

    @classmethod
    def from_pod(cls) -> KubernetesApi:
        """The API of the cluster this pod runs in (or the test and development overrides)."""
        account_dir = Path(os.environ.get(ACCOUNT_DIR_ENV) or SERVICE_ACCOUNT_DIR)
        url = os.environ.get(API_URL_ENV)
        if not url:
            host, port = (os.environ.get(name) for name in CLUSTER_ENV)
            if not (host and port):
                raise RuntimeError(f"Not in a Kubernetes pod: {' and '.join(CLUSTER_ENV)} are "
                                   "not set")
            url = f"https://[{host}]:{port}" if ":" in host else f"https://{host}:{port}"
        return cls(url.rstrip("/"), account_dir)

    @property
    def namespace(self) -> str:
        """The pod's namespace."""
        return self._account_file("namespace").strip()

    def request(self, method: str, path: str, body: dict | None = None) -> dict:
        """Sends one request (``body`` as JSON) and returns the JSON answer; raises
        :class:`ApiError` for an HTTP error status, ConnectionError when the server is not
        reached."""
        request = urllib.request.Request(
            self.url + path, method=method,
            data=None if body is None else json.dumps(body).encode(),
            headers={"Authorization": f"Bearer {self._account_file('token').strip()}",
                     "Accept": "application/json", "Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=REQUEST_TIMEOUT_S,
                                        context=self._tls()) as answer:
                return json.load(answer)
        except urllib.error.HTTPError as error:
            raise ApiError(method, path, error.code,
                           error.read().decode(errors="replace")) from None
        except urllib.error.URLError as error:
            raise ConnectionError(f"Cannot reach the Kubernetes API at {self.url}: "
                                  f"{error.reason}") from None

    def _tls(self) -> ssl.SSLContext | None:
        """A context verifying the server against the service account's CA (https only)."""
        if not self.url.startswith("https://"):
            return None
        return ssl.create_default_context(cadata=self._account_file("ca.crt"))

    def _account_file(self, name: str) -> str:
        path = self.account_dir / name
        try:
            return path.read_text()
        except FileNotFoundError:
            raise FileNotFoundError(
                f"{path} is missing: the pod has no service-account credentials to call the "
                "Kubernetes API with (is automountServiceAccountToken false for the pipeline's "
                "pods?)") from None

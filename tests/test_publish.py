"""`tunepipe publish`: kfp's real RegistryClient uploads the Vertex templates to a fake template
registry on loopback that answers the upload as Artifact Registry's KFP endpoint does."""
from __future__ import annotations

import email.parser
import email.policy
import hashlib
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import yaml
from kfp.registry import ApiAuth

from command import main as cli
from pipelines.templates import COMPILED_DIR, VERTEX_SUBDIR
from pipelines.vertex_publish import publish


class FakeRegistry(ThreadingHTTPServer):
    """Answers ``POST /PROJECT/REPO`` (a multipart upload: ``content`` and optional ``tags``)
    with ``PACKAGE/sha256:DIGEST``, the package being the template's pipeline name."""

    def __init__(self):
        super().__init__(("127.0.0.1", 0), _RegistryHandler)
        self.uploads: list[dict] = []

    @property
    def host(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/my-project/my-repo"


class _RegistryHandler(BaseHTTPRequestHandler):
    def do_POST(self) -> None:  # noqa: N802
        body = self.rfile.read(int(self.headers["Content-Length"]))
        message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
            f"Content-Type: {self.headers['Content-Type']}\r\n\r\n".encode() + body)
        fields = {part.get_param("name", header="content-disposition"): part
                  for part in message.iter_parts()}
        content = fields["content"].get_payload(decode=True)
        package = yaml.safe_load(content)["pipelineInfo"]["name"]
        version = "sha256:" + hashlib.sha256(content).hexdigest()
        self.server.uploads.append({
            "path": self.path, "authorization": self.headers.get("Authorization"),
            "file_name": fields["content"].get_filename(), "content": content,
            "tags": fields["tags"].get_content().split(",") if "tags" in fields else []})
        reply = f"{package}/{version}".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)

    def log_message(self, format: str, *args) -> None:  # noqa: A002
        pass


@pytest.fixture
def registry():
    server = FakeRegistry()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def test_publish_uploads_every_vertex_template_with_its_tags(registry):
    published = publish(registry.host, ["v1.0.0", "latest"], auth=ApiAuth("dummy-token"))
    templates = sorted((COMPILED_DIR / VERTEX_SUBDIR).glob("*.yaml"))
    assert sorted(entry.path for entry in published) == templates
    assert len(registry.uploads) == len(templates)
    for entry, upload in zip(published, registry.uploads):
        assert upload["path"] == "/my-project/my-repo"
        assert upload["authorization"] == "Bearer dummy-token"
        assert upload["file_name"] == entry.path.name
        assert upload["content"] == entry.path.read_bytes()
        assert upload["tags"] == ["v1.0.0", "latest"]
        assert entry.package == entry.path.stem  # the registry names it by the pipeline
        assert entry.version == "sha256:" + hashlib.sha256(upload["content"]).hexdigest()
        assert "Tune (8x NVIDIA_A100_80GB, us-central1)" in upload["content"].decode()


def test_tunepipe_publish_names_what_it_published(registry, capsys):
    assert cli.main(["publish", "--host", registry.host, "--tag", "v1.0.0"]) == 0
    printed = capsys.readouterr().out
    assert f"as {registry.host}/tune-large-model/sha256:" in printed
    assert "(tags: v1.0.0)" in printed
    assert f"as {registry.host}/distillation/sha256:" in printed
    assert [upload["tags"] for upload in registry.uploads] == [["v1.0.0"]] * 3  # 3 templates


def test_publish_without_compiled_templates_says_what_to_do(tmp_path, capsys):
    assert cli.main(["publish", "--host", "http://127.0.0.1:9/p/r",
                     "--compiled-dir", str(tmp_path)]) == cli.USAGE_ERROR
    assert "run `tunepipe compile` first" in capsys.readouterr().err

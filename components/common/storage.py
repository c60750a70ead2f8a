"""One way to read and write files, whether they live on local disk or in Cloud Storage.

Every component takes its inputs and writes its outputs through this module, so a
pipeline runs the same against a local directory, a ``file://`` URI or a ``gs://``
bucket.

Locations
    * local paths: ``str`` or ``os.PathLike``, and ``file:///abs/path`` URIs;
    * ``gs://bucket/key`` URIs, handled by the google-cloud-storage client. When the
      ``STORAGE_EMULATOR_HOST`` environment variable is set, the client talks to that
      emulator with anonymous credentials; otherwise it uses the default credentials,
      and without any it raises :class:`MissingCredentialsError`, which says how to get
      some. One client is kept per emulator host for the life of the process.

A gs:// "directory" is every object under the prefix ``uri + "/"``.

Atomicity
    * Local writes go to a temporary sibling that is renamed over the target, so a
      reader sees the old content or the new, never a half-written file. Replacing an
      existing directory takes two renames (old one aside, new one in), leaving a very
      short window in which the path is missing.
    * A single Cloud Storage upload is atomic: the object only becomes visible once
      the upload is finalized. A directory upload is one such upload per file, so the
      tree as a whole is not atomic, and objects already under the prefix that are not
      in the local tree are left in place.

Missing files and objects raise ``FileNotFoundError`` whose message names the URI;
a gs:// URI without a bucket raises ``ValueError``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import unquote, urlparse

if TYPE_CHECKING:  # the client library is imported on first gs:// use: local paths never need it
    from google.cloud import storage

Uri = str | os.PathLike

GCS_SCHEME = "gs://"
FILE_SCHEME = "file://"
EMULATOR_ENV = "STORAGE_EMULATOR_HOST"

_clients: dict[str | None, storage.Client] = {}
_clients_lock = threading.Lock()


class MissingCredentialsError(PermissionError):
    """A gs:// location was used with no Google credentials and no emulator to talk to."""

    def __init__(self) -> None:
        super().__init__(
            "No Google credentials to read or write gs:// locations: run `gcloud auth "
            "application-default login` (or set GOOGLE_APPLICATION_CREDENTIALS to a key file), "
            f"or set {EMULATOR_ENV} to a Cloud Storage emulator (e.g. http://127.0.0.1:9023)."
        )


# --------------------------------------------------------------------------- locations


def is_gcs(uri: Uri) -> bool:
    """True when ``uri`` is a ``gs://`` URI."""
    return isinstance(uri, str) and uri.startswith(GCS_SCHEME)


def join(base: Uri, *parts: Uri) -> str:
    """Join path components onto a local path or a gs:// URI, returning a string.

    For gs:// URIs the parts are joined with ``/`` whatever the platform, and slashes
    at the seams are collapsed, so ``join("gs://b/dir/", "/x")`` is ``"gs://b/dir/x"``.
    """
    if not is_gcs(base):
        return os.path.join(os.fspath(base), *(os.fspath(part) for part in parts))
    _split_gcs(base)  # validate
    result = base
    for part in parts:
        result = result.rstrip("/") + "/" + os.fspath(part).lstrip("/")
    return result


def _split_gcs(uri: str) -> tuple[str, str]:
    """Split ``gs://bucket/key`` into ``(bucket, key)``; the key may be empty."""
    bucket, _, key = uri[len(GCS_SCHEME):].partition("/")
    if not bucket:
        raise ValueError(
            f"Malformed Cloud Storage URI {uri!r}: expected gs://BUCKET/PATH, with a bucket name."
        )
    return bucket, key


def _local_path(uri: Uri) -> Path:
    """The local filesystem path for a local path or ``file://`` URI."""
    if is_gcs(uri):
        raise ValueError(f"{uri!r} is a Cloud Storage URI; a local path is needed here.")
    path = os.fspath(uri)
    if isinstance(path, str) and path.startswith(FILE_SCHEME):
        parsed = urlparse(path)
        if parsed.netloc not in ("", "localhost"):
            raise ValueError(
                f"Unsupported file URI {path!r}: only local files (file:///abs/path) are supported."
            )
        path = unquote(parsed.path)
    return Path(path)


def _local_not_found(uri: Uri) -> FileNotFoundError:
    return FileNotFoundError(
        f"{os.fspath(uri)} does not exist. Check the path (relative paths are resolved "
        f"against {os.getcwd()}) and that the step that should have written it ran."
    )


def _gcs_not_found(uri: str, what: str = "object") -> FileNotFoundError:
    return FileNotFoundError(
        f"Cloud Storage {what} {uri} was not found. Check that the bucket exists and the "
        f"path is spelled right, that the step that should have written it ran, and that "
        f"these credentials may read it."
    )


# ------------------------------------------------------------------------------ client


def _not_found() -> type[Exception]:
    """The client library's "not found" exception (``except _not_found():``)."""
    from google.api_core.exceptions import NotFound

    return NotFound


def _client() -> storage.Client:
    """The storage client for the current ``STORAGE_EMULATOR_HOST`` (cached)."""
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage

    host = os.environ.get(EMULATOR_ENV) or None
    with _clients_lock:
        client = _clients.get(host)
        if client is None:
            if host:
                client = storage.Client(project="local", credentials=AnonymousCredentials())
            else:
                client = _default_client()
            _clients[host] = client
    return client


def _default_client() -> storage.Client:
    """A client with the default credentials; :class:`MissingCredentialsError` without any."""
    from google.auth.exceptions import DefaultCredentialsError
    from google.cloud import storage

    try:
        return storage.Client()
    except DefaultCredentialsError:
        raise MissingCredentialsError() from None


def _gcs_file_blobs(uri: str) -> list[storage.Blob]:
    """The blobs under the "directory" ``uri``, without folder placeholder objects."""
    bucket, key = _split_gcs(uri)
    prefix = key.rstrip("/") + "/" if key else ""
    try:
        blobs = _client().list_blobs(bucket, prefix=prefix)
        return [blob for blob in blobs if not blob.name.endswith("/")]
    except _not_found():
        raise _gcs_not_found(f"gs://{bucket}", "bucket") from None


# ------------------------------------------------------------------- local atomic writes


def _temp_sibling(path: Path) -> Path:
    """A fresh hidden name next to ``path``, for staging a write."""
    return path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _move_into_place(staged: Path, dest: Path) -> None:
    """Rename ``staged`` over ``dest``, replacing an existing directory tree too."""
    if not (staged.is_dir() and dest.is_dir() and not dest.is_symlink()):
        os.replace(staged, dest)
        return
    aside = _temp_sibling(dest)
    os.replace(dest, aside)
    try:
        os.replace(staged, dest)
    except BaseException:
        os.replace(aside, dest)
        raise
    shutil.rmtree(aside, ignore_errors=True)


@contextlib.contextmanager
def staged_local_path(dest: Path) -> Iterator[Path]:
    """Yield a not-yet-existing temp sibling of ``dest`` for the caller to create (a file or
    a directory tree).

    On success it is renamed over ``dest``; on any failure it is removed and ``dest``
    is left as it was.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    staged = _temp_sibling(dest)
    try:
        yield staged
        _move_into_place(staged, dest)
    except BaseException:
        _remove(staged)
        raise


# ------------------------------------------------------------------------ public API


def read_bytes(uri: Uri) -> bytes:
    """The content of a local file or gs:// object."""
    if is_gcs(uri):
        bucket, key = _split_gcs(uri)
        if not key or key.endswith("/"):
            raise ValueError(f"{uri!r} names no object; expected gs://BUCKET/PATH/TO/FILE.")
        try:
            return _client().bucket(bucket).blob(key).download_as_bytes()
        except _not_found():
            raise _gcs_not_found(uri) from None
    try:
        return _local_path(uri).read_bytes()
    except FileNotFoundError:
        raise _local_not_found(uri) from None


def read_text(uri: Uri, encoding: str = "utf-8") -> str:
    """The content of a file or object, strictly decoded.

    A byte order mark is kept and newlines are not translated, so callers can
    validate both.
    """
    return read_bytes(uri).decode(encoding)


def write_bytes(uri: Uri, data: bytes) -> None:
    """Atomically write ``data`` to a local file (creating parent dirs) or gs:// object."""
    if is_gcs(uri):
        bucket, key = _split_gcs(uri)
        if not key or key.endswith("/"):
            raise ValueError(f"{uri!r} names no object; expected gs://BUCKET/PATH/TO/FILE.")
        try:
            _client().bucket(bucket).blob(key).upload_from_string(data)
        except _not_found():
            raise _gcs_not_found(f"gs://{bucket}", "bucket") from None
        return
    with staged_local_path(_local_path(uri)) as staged:
        # O_EXCL on a fresh name; mode 0o666 lets the umask decide, as open() would.
        fd = os.open(staged, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())


def write_text(uri: Uri, text: str, encoding: str = "utf-8") -> None:
    """Atomically write ``text``, encoded as-is (no newline translation)."""
    write_bytes(uri, text.encode(encoding))


def exists(uri: Uri) -> bool:
    """Whether a local path exists, or a gs:// object or any object under ``uri/``."""
    if not is_gcs(uri):
        return _local_path(uri).exists()
    bucket_name, key = _split_gcs(uri)
    client = _client()
    bucket = client.bucket(bucket_name)
    if not key:
        return bucket.exists()
    if not key.endswith("/") and bucket.blob(key).exists():
        return True
    try:
        return any(client.list_blobs(bucket, prefix=key.rstrip("/") + "/", max_results=1))
    except _not_found():
        return False


def _download_gcs(uri: str, dest: Path) -> None:
    """Download an object to the file ``dest``, or a "directory" to the dir ``dest``."""
    bucket, key = _split_gcs(uri)
    if key and not key.endswith("/"):
        try:
            _client().bucket(bucket).blob(key).download_to_filename(dest)
            return
        except _not_found():
            pass  # not an object: try it as a directory (the client removed the partial file)
    blobs = _gcs_file_blobs(uri)
    if not blobs:
        raise _gcs_not_found(uri, "object or directory")
    prefix_len = len(key.rstrip("/") + "/") if key else 0
    root = dest.resolve()
    dest.mkdir()
    for blob in blobs:
        target = (dest / blob.name[prefix_len:]).resolve()
        if root not in target.parents:
            raise ValueError(f"Refusing to download gs://{bucket}/{blob.name} outside {dest}.")
        target.parent.mkdir(parents=True, exist_ok=True)
        blob.download_to_filename(target)


def _copy_local(source: Path, dest: Path, source_uri: Uri) -> None:
    if not source.exists():
        raise _local_not_found(source_uri)
    with staged_local_path(dest) as staged:
        if source.is_dir():
            shutil.copytree(source, staged)
        else:
            shutil.copy2(source, staged)


def download(uri: Uri, local_path: Uri) -> None:
    """Copy a file, or a directory tree, to ``local_path``, which it becomes (atomically).

    ``uri`` may be a gs:// object, a gs:// "directory" (every object under ``uri/``)
    or a local path. An existing ``local_path`` is replaced.
    """
    dest = _local_path(local_path)
    if not is_gcs(uri):
        _copy_local(_local_path(uri), dest, uri)
        return
    with staged_local_path(dest) as staged:
        _download_gcs(uri, staged)


def upload(local_path: Uri, uri: Uri) -> None:
    """Copy a local file or directory tree to ``uri``, a gs:// location or a local path.

    A directory lands as one object per file under ``uri/``. A local destination is
    written atomically and an existing one is replaced.
    """
    source = _local_path(local_path)
    if not is_gcs(uri):
        _copy_local(source, _local_path(uri), local_path)
        return
    bucket_name, key = _split_gcs(uri)
    if source.is_file():
        if not key or key.endswith("/"):
            raise ValueError(f"{uri!r} names no object to upload {source} to.")
        files = [(source, key)]
    elif source.is_dir():
        prefix = key.rstrip("/") + "/" if key else ""
        files = [
            (path, prefix + path.relative_to(source).as_posix())
            for path in sorted(source.rglob("*"))
            if path.is_file()
        ]
    else:
        raise _local_not_found(local_path)
    bucket = _client().bucket(bucket_name)
    try:
        for path, name in files:
            bucket.blob(name).upload_from_filename(path)
    except _not_found():
        raise _gcs_not_found(f"gs://{bucket_name}", "bucket") from None


@contextlib.contextmanager
def local_copy(uri: Uri) -> Iterator[str]:
    """Yield a local path to read ``uri`` from: the path itself when local, else a
    temporary download (file or directory, keeping its base name) removed on exit."""
    if not is_gcs(uri):
        path = _local_path(uri)
        if not path.exists():
            raise _local_not_found(uri)
        yield str(path)
        return
    bucket, key = _split_gcs(uri)
    name = key.rstrip("/").rpartition("/")[2] or bucket
    with tempfile.TemporaryDirectory(prefix="tunepipe-") as tmp:
        path = Path(tmp) / name
        download(uri, path)
        yield str(path)

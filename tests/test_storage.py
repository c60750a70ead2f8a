"""components.common.storage against local disk and an in-process GCS emulator."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from components.common import storage
from tests.gcs_emulator import gcs_emulator  # noqa: F401


def _tree(root: Path) -> dict[str, bytes]:
    return {
        path.relative_to(root).as_posix(): path.read_bytes()
        for path in root.rglob("*")
        if path.is_file()
    }


def _leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.endswith(".tmp"))


TREE = {
    "config.json": b'{"a": 1}',
    "weights/model.safetensors": bytes(range(256)) * 10,
    "weights/deep/nested.txt": "héllo\r\n".encode(),
}


def _make_tree(root: Path) -> None:
    for name, data in TREE.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)


# ---------------------------------------------------------------------------- locations


def test_is_gcs():
    assert storage.is_gcs("gs://b/k")
    assert not storage.is_gcs("/tmp/x")
    assert not storage.is_gcs(Path("gs_like"))
    assert not storage.is_gcs("file:///tmp/x")


def test_join():
    assert storage.join("gs://b", "a", "b.txt") == "gs://b/a/b.txt"
    assert storage.join("gs://b/dir/", "/x") == "gs://b/dir/x"
    assert storage.join("/tmp", "a", Path("b")) == os.path.join("/tmp", "a", "b")
    assert storage.join(Path("/tmp"), "a") == os.path.join("/tmp", "a")
    with pytest.raises(ValueError, match="gs:///x"):
        storage.join("gs:///x", "y")


@pytest.mark.parametrize("uri", ["gs://", "gs:///key"])
def test_malformed_gcs_uri(uri):
    with pytest.raises(ValueError, match=uri):
        storage.read_bytes(uri)


# -------------------------------------------------------------------------------- local


def test_local_round_trip_creates_parents(tmp_path):
    target = tmp_path / "a" / "b" / "f.bin"
    storage.write_bytes(target, b"\x00\x01")
    assert storage.read_bytes(target) == b"\x00\x01"
    storage.write_text(str(target), "over\r\nwritten")
    assert storage.read_bytes(target) == b"over\r\nwritten"
    assert _leftovers(target.parent) == []


def test_read_text_keeps_bom_and_newlines_and_is_strict(tmp_path):
    path = tmp_path / "t.txt"
    path.write_bytes(b"\xef\xbb\xbfa\r\nb\rc\n")
    assert storage.read_text(path) == "\ufeffa\r\nb\rc\n"
    path.write_bytes(b"\xff\xfe bad")
    with pytest.raises(UnicodeDecodeError):
        storage.read_text(path)


def test_file_uri(tmp_path):
    target = tmp_path / "with space" / "f.txt"
    uri = target.as_uri()  # percent-encodes the space
    assert uri.startswith("file:///")
    storage.write_text(uri, "hi")
    assert target.read_text() == "hi"
    assert storage.read_text(uri) == "hi"
    assert storage.exists(uri)
    assert storage.exists(storage.join(tmp_path.as_uri(), "with space"))
    with storage.local_copy(uri) as local:
        assert local == str(target)


def test_failed_write_keeps_old_file_and_no_temp(tmp_path, monkeypatch):
    target = tmp_path / "f.txt"
    storage.write_text(target, "old")

    def boom(src, dst):
        raise OSError("disk on fire")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="disk on fire"):
        storage.write_text(target, "new")
    assert target.read_text() == "old"
    assert _leftovers(tmp_path) == []


def test_local_write_respects_umask(tmp_path):
    old = os.umask(0o022)
    try:
        storage.write_bytes(tmp_path / "f", b"x")
    finally:
        os.umask(old)
    assert (tmp_path / "f").stat().st_mode & 0o777 == 0o644


def test_local_missing_file(tmp_path):
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        storage.read_text(missing)
    assert not storage.exists(missing)
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        with storage.local_copy(missing):
            pass
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        storage.upload(missing, tmp_path / "dest")


def test_local_to_local_tree_copy_replaces_atomically(tmp_path):
    src = tmp_path / "src"
    _make_tree(src)
    dest = tmp_path / "out" / "dest"
    dest.mkdir(parents=True)
    (dest / "stale.txt").write_text("stale")

    storage.upload(src, dest)
    assert _tree(dest) == TREE
    storage.download(src / "config.json", tmp_path / "out" / "config.json")
    assert (tmp_path / "out" / "config.json").read_bytes() == TREE["config.json"]
    assert _leftovers(tmp_path / "out") == []


def test_local_tree_copy_failure_leaves_destination(tmp_path, monkeypatch):
    src = tmp_path / "src"
    _make_tree(src)
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "keep.txt").write_text("keep")

    def copy_half_then_fail(source, staged):
        staged.mkdir()
        (staged / "config.json").write_bytes(b"partial")
        raise OSError("copy failed")

    monkeypatch.setattr(storage.shutil, "copytree", copy_half_then_fail)
    with pytest.raises(OSError, match="copy failed"):
        storage.upload(src, dest)
    assert _tree(dest) == {"keep.txt": b"keep"}
    assert _leftovers(tmp_path) == []


# --------------------------------------------------------------------------------- gcs


def test_gcs_bytes_and_text_round_trip(gcs_emulator):
    uri = gcs_emulator.uri("runs/1/data.bin")
    storage.write_bytes(uri, b"\x00\xffdata")
    assert storage.read_bytes(uri) == b"\x00\xffdata"

    text_uri = gcs_emulator.uri("runs/1/notes.txt")
    storage.write_text(text_uri, "\ufeffé\r\nx")
    assert storage.read_text(text_uri) == "\ufeffé\r\nx"
    storage.write_text(text_uri, "replaced")
    assert storage.read_text(text_uri) == "replaced"


def test_gcs_exists(gcs_emulator):
    storage.write_text(gcs_emulator.uri("dir/sub/file.txt"), "x")
    assert storage.exists(gcs_emulator.uri("dir/sub/file.txt"))
    assert storage.exists(gcs_emulator.uri("dir"))
    assert storage.exists(gcs_emulator.uri("dir/"))
    assert storage.exists(gcs_emulator.uri("dir/sub"))
    assert storage.exists(f"gs://{gcs_emulator.bucket}")
    assert not storage.exists(gcs_emulator.uri("di"))  # a prefix of a name, not a directory
    assert not storage.exists(gcs_emulator.uri("dir/sub/file.txt/more"))
    assert not storage.exists("gs://no-such-bucket/x")
    assert not storage.exists("gs://no-such-bucket")


def test_gcs_missing_object(gcs_emulator):
    uri = gcs_emulator.uri("missing/thing.jsonl")
    with pytest.raises(FileNotFoundError, match=uri) as excinfo:
        storage.read_bytes(uri)
    assert "Check" in str(excinfo.value)
    with pytest.raises(FileNotFoundError, match=uri):
        storage.read_text(uri)
    with pytest.raises(FileNotFoundError, match="gs://no-such-bucket"):
        storage.read_bytes("gs://no-such-bucket/x")


def test_gcs_missing_download_leaves_nothing(gcs_emulator, tmp_path):
    uri = gcs_emulator.uri("missing")
    with pytest.raises(FileNotFoundError, match=uri):
        storage.download(uri, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_gcs_write_to_missing_bucket(gcs_emulator):
    with pytest.raises(FileNotFoundError, match="gs://no-such-bucket"):
        storage.write_bytes("gs://no-such-bucket/x", b"x")


def test_gcs_tree_upload_download(gcs_emulator, tmp_path):
    src = tmp_path / "src"
    _make_tree(src)
    prefix = gcs_emulator.uri("models/run-1")
    storage.upload(src, prefix)

    assert storage.read_bytes(storage.join(prefix, "weights/deep/nested.txt")) == TREE[
        "weights/deep/nested.txt"
    ]
    dest = tmp_path / "out" / "model"
    storage.download(prefix, dest)
    assert _tree(dest) == TREE
    storage.download(prefix + "/", dest)  # trailing slash, replacing the existing tree
    assert _tree(dest) == TREE
    assert _leftovers(tmp_path / "out") == []

    storage.download(storage.join(prefix, "config.json"), tmp_path / "config.json")
    assert (tmp_path / "config.json").read_bytes() == TREE["config.json"]


def test_gcs_file_upload(gcs_emulator, tmp_path):
    src = tmp_path / "one.txt"
    src.write_bytes(b"one")
    storage.upload(src, gcs_emulator.uri("x/one.txt"))
    assert storage.read_bytes(gcs_emulator.uri("x/one.txt")) == b"one"
    with pytest.raises(ValueError):
        storage.upload(src, gcs_emulator.uri("x/"))


def test_gcs_local_copy(gcs_emulator, tmp_path):
    storage.write_bytes(gcs_emulator.uri("ckpt/model.gguf"), b"GGUF")
    with storage.local_copy(gcs_emulator.uri("ckpt/model.gguf")) as local:
        assert local.endswith("model.gguf")
        assert Path(local).read_bytes() == b"GGUF"
    assert not Path(local).exists()

    with storage.local_copy(gcs_emulator.uri("ckpt")) as local_dir:
        assert Path(local_dir).is_dir()
        assert _tree(Path(local_dir)) == {"model.gguf": b"GGUF"}
    assert not Path(local_dir).exists()


def test_gcs_from_subprocess(gcs_emulator):
    storage.write_text(gcs_emulator.uri("shared.txt"), "from parent")
    code = (
        "from components.common import storage; import sys; "
        "storage.write_text(sys.argv[2], storage.read_text(sys.argv[1]) + ' and child')"
    )
    subprocess.run(
        [sys.executable, "-c", code, gcs_emulator.uri("shared.txt"), gcs_emulator.uri("child.txt")],
        check=True,
        cwd=Path(__file__).resolve().parents[1],
        timeout=60,
    )
    assert storage.read_text(gcs_emulator.uri("child.txt")) == "from parent and child"


def test_gcs_client_is_cached_per_host(gcs_emulator, monkeypatch):
    client = storage._client()
    assert storage._client() is client
    assert client._connection.API_BASE_URL == gcs_emulator.host
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", "http://127.0.0.1:9")
    assert storage._client() is not client


def test_emulator_isolated_between_tests_first(gcs_emulator):
    storage.write_text(gcs_emulator.uri("leak.txt"), "x")


def test_emulator_isolated_between_tests_second(gcs_emulator):
    assert not storage.exists(gcs_emulator.uri("leak.txt"))

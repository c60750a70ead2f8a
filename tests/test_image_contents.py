"""What the Dockerfile copies is enough to install tunepipe: the image cannot be built here (no
docker or podman, no registry for the base image), so this builds the wheel its ``pip install
.`` would build, from exactly the files its COPY lines name, and checks every module of the
components, the pipelines and the command is in it, with the sources of the C kernels (and the header they
share), which are built on the machine that runs them.
"""
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
COPY = re.compile(r"^COPY\s+(?P<sources>.+?)\s+(?P<destination>\S+)\s*$")


def copied_paths() -> list[str]:
    """The repository paths the Dockerfile's COPY lines name."""
    paths = []
    for line in (REPO / "Dockerfile").read_text().splitlines():
        match = COPY.match(line)
        if match:
            paths += match["sources"].split()
    return paths


def test_the_dockerfile_copies_what_pip_install_needs(tmp_path):
    context = tmp_path / "context"
    context.mkdir()
    for path in copied_paths():
        source = REPO / path
        assert source.exists(), f"the Dockerfile copies {path}, which does not exist"
        if source.is_dir():
            shutil.copytree(source, context / path,
                            ignore=shutil.ignore_patterns("__pycache__", "*.so", "*.pyc"))
        else:
            shutil.copy(source, context / path)
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet",
         "--wheel-dir", str(tmp_path / "wheels"), str(context)],
        capture_output=True, text=True)
    assert built.returncode == 0, built.stderr
    wheel, = (tmp_path / "wheels").glob("tunepipe-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {str(path.relative_to(REPO)) for package in ("components", "pipelines", "command")
                for path in (REPO / package).rglob("*.py") if "__pycache__" not in path.parts}
    assert expected - names == set()
    kernel_sources = {f"components/common/{name}" for name in
                      ("int8_kernels.c", "attention_kernels.c", "avx2_math.h", "avx512_math.h")}
    assert kernel_sources - names == set()
    entry_points = next(name for name in names if name.endswith("entry_points.txt"))
    assert "tunepipe = command.main:main" in zipfile.ZipFile(wheel).read(entry_points).decode()

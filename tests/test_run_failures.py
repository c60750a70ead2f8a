"""How `tunepipe run` and `tunepipe validate` fail, as a user sees it: a bad request is refused
before the runner starts (exit 2, one line), a failing task ends the run with the task's name
and its own error message (exit 1, no traceback), and gs:// without credentials says how to
get some."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _tunepipe(*args: str, cwd: Path, env: dict[str, str] | None = None
              ) -> subprocess.CompletedProcess:
    """``tunepipe ARGS`` in ``cwd`` (environment: ``env``, default this one)."""
    return subprocess.run([sys.executable, "-m", "command", *args], cwd=cwd,
                          env={**(os.environ if env is None else env), "PYTHONPATH": str(ROOT)},
                          capture_output=True, text=True, timeout=120)


def _run_args(dataset: Path, *params: str) -> list[str]:
    return ["run", "tune-large-model", "--param", "project=p", "--param", "model_display_name=x",
            "--param", f"dataset_uri={dataset}", "--param", "train_steps=1", *params]


@pytest.fixture
def bad_dataset(tmp_path) -> Path:
    """A file that exists (it passes the checks before the run) with invalid lines."""
    path = tmp_path / "bad.jsonl"
    path.write_text('{"input_text": "hi", "output_text": "there"}\nnot json at all\n')
    return path


@pytest.mark.parametrize("param,problem", [
    ("dataset_uri=DIR/missing.jsonl", "dataset_uri 'DIR/missing.jsonl' does not exist"),
    ("large_model_reference=gpt-9",
     "large_model_reference: Unknown model reference 'gpt-9'. Use one of: "),
])
def test_a_bad_request_is_refused_before_the_runner_starts(tmp_path, bad_dataset, param, problem):
    param, problem = (text.replace("DIR", str(tmp_path)) for text in (param, problem))
    runs = tmp_path / "runs"
    done = _tunepipe(*_run_args(bad_dataset, "--param", param, "--pipeline-root", str(runs)),
                     cwd=tmp_path)
    assert done.returncode == 2
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith(f"tunepipe run: invalid request: {problem}")
    assert not runs.exists() and "Executing task" not in done.stdout  # the runner never started


@pytest.mark.parametrize("teacher,problem", [
    ("gpt-9", "teacher_model_reference: Unknown model reference 'gpt-9'."),
    ("http://127.0.0.1:8000/v1", "teacher_model_reference: 'http://127.0.0.1:8000/v1': say which "
                                 "API the URL speaks, e.g. openai:http://127.0.0.1:8000/v1#MODEL"),
])
def test_a_teacher_that_names_no_teacher_is_refused_before_the_runner_starts(
        tmp_path, bad_dataset, teacher, problem):
    runs = tmp_path / "runs"
    done = _tunepipe("run", "distillation", "--param", "project=p", "--param",
                     "model_display_name=x", "--param", f"dataset_uri={bad_dataset}",
                     "--param", f"teacher_model_reference={teacher}",
                     "--pipeline-root", str(runs), cwd=tmp_path)
    assert done.returncode == 2
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith(f"tunepipe run: invalid request: {problem}")
    assert not runs.exists()


@pytest.mark.parametrize("param,problem", [
    ("model_display_name=../../x", "model_display_name '../../x' is not valid: use 1 to 128 "
                                   "letters, digits, spaces or . _ @ -, starting with a letter"),
    ("train_steps=1000000", "train_steps must be an integer from 1 to 100000, not 1000000"),
    ("train_steps=\uff13\uff10\uff10",
     "parameter 'train_steps'='\uff13\uff10\uff10': expected an integer"),
])
def test_a_dry_run_refuses_names_and_numbers_beyond_their_limits(tmp_path, bad_dataset, param,
                                                                 problem):
    done = _tunepipe(*_run_args(bad_dataset, "--param", param, "--dry-run"), cwd=tmp_path)
    assert done.returncode == 2 and not done.stdout and "Traceback" not in done.stderr
    assert done.stderr.startswith("tunepipe run: invalid request") and problem in done.stderr


def test_a_failing_task_ends_with_its_name_and_message(tmp_path, bad_dataset):
    done = _tunepipe(*_run_args(bad_dataset, "--pipeline-root", str(tmp_path / "runs")),
                     cwd=tmp_path)
    assert done.returncode == 1
    assert "Traceback" not in done.stdout + done.stderr
    assert done.stderr.strip().splitlines() == [
        "tunepipe run: validate-dataset failed:",
        "Dataset validation failed with 2 errors:",
        f"  {bad_dataset}: (dataset): 2 examples; at least 10 are required",
        f"  {bad_dataset}:2: (line): invalid JSON: Expecting value (column 1)",
    ]
    assert "finished with status \x1b[91mFAILURE" in done.stdout  # the runner's own line


def test_gcs_without_credentials_says_how_to_get_some(tmp_path):
    env = {name: value for name, value in os.environ.items()
           if name not in ("GOOGLE_APPLICATION_CREDENTIALS", "STORAGE_EMULATOR_HOST")}
    env.update(HOME=str(tmp_path), CLOUDSDK_CONFIG=str(tmp_path),
               GCE_METADATA_HOST="127.0.0.1:1", NO_GCE_CHECK="True")  # no metadata server
    done = _tunepipe("validate", "gs://b/x.jsonl", cwd=tmp_path, env=env)
    assert done.returncode == 2
    (line,) = done.stderr.strip().splitlines()
    assert "No Google credentials to read or write gs:// locations: run `gcloud auth " \
           "application-default login`" in line
    assert "STORAGE_EMULATOR_HOST" in line

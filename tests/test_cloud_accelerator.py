"""The tuner on a cloud machine uses the accelerator it was given, or fails saying what to fix.

This machine has no GPU and no torch_xla, so the refusals run for real; only "torch_xla is
installed" is simulated (``find_spec``), since torch_xla cannot be installed here.
"""
import importlib.util
import os

import pytest

from components.tune import launch

KFP_POD = {"KUBERNETES_SERVICE_HOST": "10.0.0.1", "KUBERNETES_SERVICE_PORT": "443",
           "KFP_POD_NAME": "tune-large-model-abc-tune"}
VERTEX_JOB = {"CLOUD_ML_JOB_ID": "1234567890"}
CLOUD_ENV = (*KFP_POD, *VERTEX_JOB, "PJRT_DEVICE")


@pytest.fixture
def environment(monkeypatch):
    for name in CLOUD_ENV:
        monkeypatch.delenv(name, raising=False)

    def set_environment(values: dict):
        for name, value in values.items():
            monkeypatch.setenv(name, value)
    return set_environment


@pytest.mark.parametrize("accelerator", ["GPU", "TPU"])
def test_a_local_run_is_not_checked(environment, accelerator):
    launch.check_cloud_accelerator(accelerator)  # accelerator_type only sets the batch size here


@pytest.mark.parametrize("cloud", [KFP_POD, VERTEX_JOB], ids=["kfp-pod", "vertex-custom-job"])
def test_a_gpu_task_without_cuda_refuses_to_tune_on_the_cpu(environment, cloud):
    environment(cloud)
    assert launch.on_cloud_machine()
    with pytest.raises(RuntimeError, match=r"accelerator_type GPU, but this task sees no CUDA GPU "
                                           r"\(torch .*, built for CUDA no: a CPU build\).*"
                                           "refusing to tune on the CPU"):
        launch.check_cloud_accelerator("GPU")


@pytest.mark.parametrize("cloud", [KFP_POD, VERTEX_JOB], ids=["kfp-pod", "vertex-custom-job"])
def test_a_tpu_task_without_torch_xla_names_the_tpu_image(environment, cloud):
    environment(cloud)
    with pytest.raises(RuntimeError, match=r"accelerator_type TPU, but this image has no torch_xla: "
                                           r"build the TPU image \(make image VARIANT=tpu"):
        launch.check_cloud_accelerator("TPU")


def test_a_tpu_task_with_torch_xla_runs_on_xla(environment, monkeypatch):
    environment(KFP_POD)
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *args: (
        object() if name == "torch_xla" else real_find_spec(name, *args)))
    launch.check_cloud_accelerator("TPU")
    assert os.environ["PJRT_DEVICE"] == "TPU"
    monkeypatch.setenv("PJRT_DEVICE", "CPU")  # a setting of the user's own is kept
    launch.check_cloud_accelerator("TPU")
    assert os.environ["PJRT_DEVICE"] == "CPU"

"""The precision rule (components.common.precision): each CPU kind simulated, forcing, warnings."""
from __future__ import annotations

import json
import warnings

import pytest
import torch

from components.common import precision
from components.common.precision import (CpuInfo, SlowPrecisionWarning, cached_cpu_matmuls,
                                         choose_precision)

AVX2 = CpuInfo("AVX2", None)
AMX = CpuInfo("AVX512", "AMX")
AVX512_BF16 = CpuInfo("AVX512", "AVX512_BF16")
ARM_BF16 = CpuInfo("DEFAULT", "Arm BF16")
SLOW_BF16 = {"float32": 50.0, "bfloat16": 1.2}  # an AVX2 CPU, as measured here
FAST_BF16 = {"float32": 50.0, "bfloat16": 180.0}


def never_measured():
    raise AssertionError("a CPU with native bf16 must not be measured")


@pytest.fixture(autouse=True)
def automatic(monkeypatch, tmp_path):
    """No forced precision (conftest pins fp32 for the other tests) and an empty cache."""
    monkeypatch.delenv(precision.PRECISION_ENV, raising=False)
    monkeypatch.setenv("TUNEPIPE_CACHE", str(tmp_path / "cache"))


@pytest.mark.parametrize("cpu, name", [(AMX, "AMX"), (AVX512_BF16, "AVX512_BF16"),
                                       (ARM_BF16, "Arm BF16")])
def test_native_bf16_cpus_get_bf16_without_measuring(cpu, name):
    chosen = choose_precision("cpu", cpu=cpu, measure=never_measured)
    assert chosen.dtype == torch.bfloat16
    assert chosen.describe() == f"cpu bfloat16: native bf16 ({name})"


def test_avx2_cpu_gets_float32_and_says_why():
    chosen = choose_precision("cpu", cpu=AVX2, measure=lambda: SLOW_BF16)
    assert chosen.dtype == torch.float32
    assert chosen.describe() == "cpu float32: no native bf16 (AVX2; bf16 1.2 vs fp32 50.0 GFLOP/s)"


def test_cpu_without_native_flags_gets_bf16_when_measured_faster():
    chosen = choose_precision("cpu", cpu=CpuInfo("AVX512", None), measure=lambda: FAST_BF16)
    assert chosen.dtype == torch.bfloat16
    assert chosen.reason.startswith("bf16 matmuls measured faster")


def test_measurement_is_cached_per_machine(tmp_path):
    calls = []

    def measure():
        calls.append(1)
        return SLOW_BF16

    assert cached_cpu_matmuls(AVX2, measure) == SLOW_BF16
    assert cached_cpu_matmuls(AVX2, measure) == SLOW_BF16
    assert len(calls) == 1
    cache = json.loads((tmp_path / "cache" / "precision.json").read_text())
    assert list(cache.values()) == [SLOW_BF16]
    cached_cpu_matmuls(CpuInfo("AVX512", None), measure)  # another machine kind: measured anew
    assert len(calls) == 2


def test_real_measurement_returns_both_speeds():
    speeds = precision.measure_cpu_matmuls()
    assert set(speeds) == {"float32", "bfloat16"} and all(v > 0 for v in speeds.values())


@pytest.mark.parametrize("cpu", [AVX2, AMX])
def test_forcing_fp32_by_environment(monkeypatch, cpu):
    monkeypatch.setenv(precision.PRECISION_ENV, "fp32")
    chosen = choose_precision("cpu", cpu=cpu, measure=never_measured)
    assert chosen.dtype == torch.float32
    assert chosen.reason == "forced by TUNEPIPE_PRECISION=fp32"


def test_forcing_bf16_where_it_is_slow_warns(monkeypatch):
    monkeypatch.setenv(precision.PRECISION_ENV, "bf16")
    with pytest.warns(SlowPrecisionWarning, match="float32 is faster"):
        chosen = choose_precision("cpu", cpu=AVX2, measure=lambda: SLOW_BF16)
    assert chosen.dtype == torch.bfloat16
    assert "slower than fp32 here" in chosen.reason


def test_forcing_bf16_where_it_is_fast_does_not_warn(monkeypatch):
    monkeypatch.setenv(precision.PRECISION_ENV, "bf16")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        chosen = choose_precision("cpu", cpu=AMX, measure=never_measured)
    assert chosen.dtype == torch.bfloat16


def test_an_explicit_request_wins_over_the_environment(monkeypatch):
    monkeypatch.setenv(precision.PRECISION_ENV, "bf16")
    chosen = choose_precision("cpu", "fp32", cpu=AMX, measure=never_measured)
    assert chosen.dtype == torch.float32 and chosen.reason == "forced by precision=fp32"


def test_a_bad_setting_is_named(monkeypatch):
    monkeypatch.setenv(precision.PRECISION_ENV, "half")
    with pytest.raises(ValueError, match="TUNEPIPE_PRECISION must be one of auto, bf16, fp32, got 'half'"):
        choose_precision("cpu", cpu=AVX2, measure=lambda: SLOW_BF16)


def test_cuda_follows_bf16_support(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert choose_precision("cuda").describe() == "cuda bfloat16: GPU supports bf16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert choose_precision("cuda").dtype == torch.float32
    monkeypatch.setenv(precision.PRECISION_ENV, "bf16")
    with pytest.raises(ValueError, match="no bfloat16 support"):
        choose_precision("cuda")


def test_the_tuner_runtime_uses_the_rule(monkeypatch):
    from components.tune.runtime import start_runtime

    monkeypatch.setenv(precision.PRECISION_ENV, "fp32")
    runtime = start_runtime("auto")
    assert runtime.dtype == torch.float32
    assert runtime.precision.describe() == "cpu float32: forced by TUNEPIPE_PRECISION=fp32"


# --- serving (components.common.serving_numerics) -------------------------------------------

def int8_description() -> str:
    """What serving with the int8 kernels says, naming the kernel variant this CPU runs."""
    from components.common.int8_linear import int8_kernel_name

    return ("cpu float32: the int8 kernel's, an answer the same alone and batched, int8 "
            f"weights: {int8_kernel_name()}, 3.5x less memory to stream per token")


@pytest.fixture
def kernels(monkeypatch):
    """Whether the int8 kernels build, as a test says (``None``: they do)."""
    from components.common import int8_linear

    def build(reason: str | None) -> None:
        monkeypatch.setattr(int8_linear, "int8_unavailable_reason", lambda: reason)

    for name in ("TUNEPIPE_SERVING_PRECISION", "TUNEPIPE_SERVING_WEIGHTS"):
        monkeypatch.delenv(name, raising=False)
    return build


@pytest.mark.parametrize("tuning", ["auto", "bf16", "fp32"])
def test_serving_uses_the_int8_kernel_in_float32_whatever_the_tuner_uses(monkeypatch, kernels,
                                                                         tuning):
    from components.common.serving_numerics import choose_serving_numerics

    kernels(None)
    monkeypatch.setenv(precision.PRECISION_ENV, tuning)
    numerics = choose_serving_numerics("cpu")
    assert (numerics.dtype, numerics.weights.kind) == (torch.float32, "int8")
    assert numerics.describe() == int8_description()


def test_serving_without_the_kernels_is_float32_and_says_why(kernels, monkeypatch):
    from components.common.serving_numerics import choose_serving_numerics

    kernels("no C compiler to build the int8 kernels (set $CC)")
    assert choose_serving_numerics("cpu").describe() == (
        "cpu float32: for serving, bf16's answers depend on the batch, float weights: no C "
        "compiler to build the int8 kernels (set $CC)")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)  # no GPU here
    assert choose_serving_numerics("cuda").describe() == (  # a GPU keeps the tuner's rule
        "cuda bfloat16: GPU supports bf16, float weights: the model is on cuda in torch.bfloat16")


def test_serving_numerics_can_be_forced(monkeypatch, kernels):
    from components.common.serving_numerics import BatchDependentWarning, choose_serving_numerics

    kernels(None)
    monkeypatch.setenv("TUNEPIPE_SERVING_PRECISION", "bf16")
    with pytest.warns(BatchDependentWarning, match="may change with the requests it is batched"):
        numerics = choose_serving_numerics("cpu")
    assert (numerics.dtype, numerics.weights.kind) == (torch.bfloat16, "float")
    monkeypatch.setenv("TUNEPIPE_SERVING_WEIGHTS", "int8")
    with pytest.warns(BatchDependentWarning), pytest.raises(
            ValueError, match="TUNEPIPE_SERVING_WEIGHTS=int8, but the model is on cpu in "
                              "torch.bfloat16"):
        choose_serving_numerics("cpu")
    monkeypatch.setenv("TUNEPIPE_SERVING_PRECISION", "fp32")
    numerics = choose_serving_numerics("cpu")
    assert numerics.describe() == ("cpu float32: forced by TUNEPIPE_SERVING_PRECISION=fp32, "
                                   "int8 weights: TUNEPIPE_SERVING_WEIGHTS=int8")
    monkeypatch.setenv("TUNEPIPE_SERVING_PRECISION", "half")
    with pytest.raises(ValueError, match="TUNEPIPE_SERVING_PRECISION='half': use one of "
                                         r"\['auto', 'fp32', 'bf16'\]"):
        choose_serving_numerics("cpu")


@pytest.mark.c_kernels
def test_the_local_teacher_serves_as_the_endpoint_does(tiny_model_dir):
    """With no precision forced the tuner's rule may pick bf16 here (native bf16); the teacher
    takes the serving numerics: int8 layers computing in float32."""
    from components.common.int8_linear import Int8Linear
    from components.generate_rationales.local_teacher import LocalTeacher

    teacher = LocalTeacher(str(tiny_model_dir))
    model, _ = teacher._load()
    assert teacher.description.endswith(int8_description())
    assert any(isinstance(module, Int8Linear) for module in model.modules())
    assert {p.dtype for p in model.parameters()} == {torch.float32}

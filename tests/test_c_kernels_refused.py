"""Where the C kernels are refused (``TUNEPIPE_C_KERNELS=off``, as where they cannot build: no
compiler, no AVX2), the PyTorch paths pass the numeric tests: all but the kernels' own tests
(marker ``c_kernels``), run in a subprocess."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from components.common import c_kernels, fast_attention, int8_linear

REPO = Path(__file__).resolve().parent.parent
NUMERIC_TESTS = ("tests/test_prefix_cache.py", "tests/test_int8_decode.py",
                 "tests/test_fast_attention.py", "tests/test_generation.py")


def test_the_switch_refuses_every_kernel_and_says_so(monkeypatch):
    monkeypatch.setenv(c_kernels.SWITCH_ENV, "off")
    c_kernels.forget_kernels()
    try:
        assert (int8_linear.int8_unavailable_reason()
                == "the int8 kernels are turned off (TUNEPIPE_C_KERNELS=off)")
        assert (fast_attention.fast_attention_unavailable_reason()
                == "the attention kernels are turned off (TUNEPIPE_C_KERNELS=off)")
    finally:
        c_kernels.forget_kernels()


def test_the_numeric_tests_pass_with_the_kernels_refused():
    env = {**os.environ, c_kernels.SWITCH_ENV: "off", "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:xdist", "-p",
                             "no:cacheprovider", "-m", "not c_kernels", *NUMERIC_TESTS],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    summary = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else result.stderr
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert " passed" in summary and "failed" not in summary and "skipped" not in summary, summary

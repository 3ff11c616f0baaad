"""``triton_available()`` / ``why_unavailable()``: the switch the model uses to fall back to SDPA.

Each case runs in a fresh interpreter, because whether the Triton interpreter can work depends on
what was imported, and when, in the process.
"""
import os
import subprocess
import sys

import pytest
import torch

pytestmark = [
    pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only decisions"),
    pytest.mark.skipif(__import__("importlib").util.find_spec("triton") is None,
                       reason="triton not installed"),
]


def run(code: str, interpret: bool) -> str:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip().splitlines()[-1]


def test_cpu_without_interpreter_is_unavailable_and_says_why():
    code = ("import sys, imagebert_ds.kernels as K; "
            "print(K.triton_available(), 'triton' in sys.modules, K.why_unavailable())")
    # False, and importing the package did not import triton (so TRITON_INTERPRET may still be set)
    assert run(code, interpret=False) == "False False no CUDA device, and TRITON_INTERPRET=1 is not set"


def test_interpreter_set_after_package_import_still_works():
    code = ("import os, torch, imagebert_ds.kernels as K; os.environ['TRITON_INTERPRET'] = '1'; "
            "x = torch.randn(1, 1, 5, 16); "
            "print(K.triton_available(), torch.allclose(K.attention(x, x, x), K.attention_ref(x, x, x), atol=1e-5))")
    assert run(code, interpret=False) == "True True"


def test_triton_imported_before_interpreter_flag_is_reported():
    code = ("import os, torch, triton; os.environ['TRITON_INTERPRET'] = '1'; import imagebert_ds.kernels as K; "
            "print(K.triton_available(), K.why_unavailable())")
    line = run(code, interpret=False)
    assert line.startswith("False TRITON_INTERPRET=1 was set after triton had been imported")

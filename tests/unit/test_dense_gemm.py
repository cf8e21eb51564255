"""layers/dense.py's choice between cuBLAS and the skinny kernel, on the CPU: the rule (dtype, rows,
a device with programmatic dependent launch, the MESHSERVE_DENSE_GEMM switch) and the refusal of an
unknown switch value. The kernel itself is tested in test_skinny_gemm_kernel.py and, launched as
the model launches it, in tests/gpu/test_skinny_gemm.py."""

from __future__ import annotations

import os
import subprocess
import sys

import torch
import torch.nn.functional as F

from meshserve.layers import dense


def test_rule(monkeypatch):
    monkeypatch.setattr(dense, "_pdl_device", lambda t: True)  # as on an sm_90 GPU
    w = torch.randn(8, 32, dtype=torch.bfloat16)
    rows = dense.SKINNY_MAX_M
    assert dense.takes_skinny(torch.randn(rows, 32, dtype=torch.bfloat16), w)
    assert dense.takes_skinny(torch.randn(2, rows // 2, 32, dtype=torch.bfloat16), w)  # rows over leading dims
    assert not dense.takes_skinny(torch.randn(rows + 1, 32, dtype=torch.bfloat16), w)
    assert not dense.takes_skinny(torch.randn(1, 32), w.float())  # float32 models keep cuBLAS
    assert not dense.takes_skinny(torch.randn(1, 32), w)  # mixed dtypes
    monkeypatch.setattr(dense, "_CHOICE", "cublas")
    assert not dense.takes_skinny(torch.randn(1, 32, dtype=torch.bfloat16), w)


def test_cpu_takes_f_linear():
    x, w, b = torch.randn(1, 32, dtype=torch.bfloat16), torch.randn(8, 32, dtype=torch.bfloat16), torch.randn(8)
    assert not dense.takes_skinny(x, w)
    assert torch.equal(dense.dense_linear(x, w, b.bfloat16()), F.linear(x, w, b.bfloat16()))


def test_layers_import_without_triton():
    """A CPU install has no Triton (a test extra): the layers must not import it."""
    code = ("import sys; sys.modules['triton'] = None; import meshserve.executor.model_runner, meshserve.models.llama, "
            "meshserve.models.qwen3, meshserve.models.mixtral, meshserve.models.qwen_moe, meshserve.models.deepseek; "
            "import torch; from meshserve.layers.dense import dense_linear; dense_linear(torch.ones(1, 4), torch.ones(2, 4))")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]


def test_unknown_switch_is_refused_by_name():
    env = {**os.environ, "MESHSERVE_DENSE_GEMM": "cutlass"}
    run = subprocess.run([sys.executable, "-c", "import meshserve.layers.dense"], env=env, capture_output=True,
                         text=True, timeout=120)
    assert run.returncode != 0
    assert "MESHSERVE_DENSE_GEMM='cutlass': expected one of auto, cublas" in run.stderr


def test_pdl_is_off_on_the_cpu():
    from meshserve.layers.kernels.pdl import pdl_enabled

    assert not pdl_enabled(torch.zeros(1))

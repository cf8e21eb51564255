"""Kernels compiled for sm_90 (H100/H200) on this machine, no GPU needed. The skinny GEMM: every
decode configuration builds (the inline PTX, the bulk L2 prefetch and the grid-dependency
instructions assemble), the bf16 loop converts FP8 without the F2F instructions that would bound
it (kernels/skinny_gemm.py), 16-row tiles use mma.sync and 64-row tiles wgmma, each leaves room
for at least two programs per SM, and a PDL launch prefetches and waits while one without has
neither instruction. Decode attention's stage 1: it reads an FP8 pool with no more conversion
instructions than a bf16 one."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")
_BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
pytestmark = pytest.mark.skipif(not (_BIN / "ptxas").exists() or not (_BIN / "cuobjdump").exists(),
                                reason="Triton's NVIDIA backend tools (ptxas, cuobjdump) are not installed")
_SM90_SHARED_BYTES = 227 * 1024  # the most one program may use on sm_90


def test_decode_configurations_build_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = Path(__file__).resolve().parents[2]
    run = subprocess.run([sys.executable, "-m", "tests.sm90_build"], cwd=root, env=env, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    built = json.loads(run.stdout.strip().splitlines()[-1])
    decode = {pool: built.pop(f"decode_{pool}_pool")["conversions"] for pool in ("bf16", "fp8e4nv")}
    assert set(built) == {"bf16_rows_16", "bf16_blocks_16_split", "bf16_rows_64", "fp16_rows_16",
                          "bf16_dense_16_split", "bf16_dense_16"}
    # Decode attention over an FP8 pool converts what it reads without the conversion pipe
    # (read_fp8): the same conversions as over a bf16 pool (the output's), none per element read.
    assert decode["fp8e4nv"] == decode["bf16"], decode
    for name, code in built.items():
        pdl = name not in ("bf16_rows_64", "fp16_rows_16")
        assert code["pdl"] == code["prefetch"] == pdl, (name, code)
        assert code["f2f"] == 0, (name, code)
        assert 2 * code["shared"] <= _SM90_SHARED_BYTES, (name, code)
        assert code["mma"] == ("wgmma" if "_64" in name else "mma.sync"), (name, code)

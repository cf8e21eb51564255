"""Compile the skinny FP8 kernel for sm_90 without a GPU (Triton's bundled ptxas and cuobjdump) and
print, per launch configuration, what the compiled code is made of, as one JSON object:
{name: {"mma": "mma.sync" | "wgmma", "shared": bytes, "f2f": F2F instructions in the SASS}}.

Run in a process without TRITON_INTERPRET (under it, triton.jit builds interpreter functions):

  python -m tests.sm90_build
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import tempfile
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from meshserve.layers.kernels import fp8_skinny_gemm

# name -> (activation dtype, BLOCK_M, BLOCK_K, block scales, partial sums): decode launches.
CONFIGS = {
    "bf16_rows_16": ("bf16", 16, 256, False, False),
    "bf16_blocks_16_split": ("bf16", 16, 128, True, True),
    "bf16_rows_64": ("bf16", 64, 128, False, False),
    "fp16_rows_16": ("fp16", 16, 256, False, False),
}
_INTS = ("M", "N", "K", "K_PER_SPLIT", "stride_xm", "stride_wn", "stride_sn", "stride_sk", "stride_om", "stride_os")


def build(dtype: str, block_m: int, block_k: int, block_scales: bool, partial: bool) -> dict:
    signature = {"X": f"*{dtype}", "W": "*fp8e4nv", "S": "*fp32", "B": f"*{dtype}",
                 "OUT": "*fp32" if partial else f"*{dtype}", **{name: "i32" for name in _INTS}}
    constexprs = {"BLOCK_SCALES": block_scales, "GROUP_N": 128 if block_scales else 1,
                  "GROUP_K": 128 if block_scales else 1, "HAS_BIAS": not partial, "PARTIAL": partial,
                  "PRECISION": "tf32", "EVEN_K": True, "BF16_ASM": dtype == "bf16", "BLOCK_M": block_m,
                  "BLOCK_N": fp8_skinny_gemm.BLOCK_N, "BLOCK_K": block_k}
    signature.update({name: "constexpr" for name in constexprs})
    # As the launcher specializes them: pointers and the K-sized integers are multiples of 16.
    names = list(signature)
    aligned = ["X", "W", "S", "B", "OUT", "K", "K_PER_SPLIT", "stride_xm", "stride_wn"]
    attrs = {(names.index(name),): [["tt.divisibility", 16]] for name in aligned}
    kernel = triton.compile(ASTSource(fn=fp8_skinny_gemm._skinny_kernel, signature=signature, constexprs=constexprs,
                                      attrs=attrs),
                            target=GPUTarget("cuda", 90, 32), options={"num_warps": 4, "num_stages": 3})
    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(kernel.asm["cubin"])
        cubin.flush()
        sass = subprocess.run([str(cuobjdump), "-sass", cubin.name], check=True, capture_output=True,
                              text=True).stdout
    return {"mma": "wgmma" if "wgmma" in kernel.asm["ptx"] else "mma.sync", "shared": kernel.metadata.shared,
            "f2f": len(re.findall(r"\bF2F\.", sass))}


def main() -> None:
    assert os.environ.get("TRITON_INTERPRET") != "1", "run without TRITON_INTERPRET"
    print(json.dumps({name: build(*config) for name, config in CONFIGS.items()}))


if __name__ == "__main__":
    main()

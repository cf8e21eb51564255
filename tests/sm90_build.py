"""Compile the skinny GEMM kernel and the decode attention kernel for sm_90 without a GPU (Triton's
bundled ptxas and cuobjdump) and print, per launch configuration, what the compiled code is made
of, as one JSON object: {name: {"mma": "mma.sync" | "wgmma", "shared": bytes, "f2f": F2F
instructions in the SASS, "pdl": waits for the previous kernel, "prefetch": bulk L2 prefetches}}
for the GEMM, {name: {"conversions": {SASS conversion opcode: count}}} for decode attention over a
bf16 and an FP8 pool (bf16 queries, the 8B model's heads, pool already holding the new tokens).

Run in a process without TRITON_INTERPRET (under it, triton.jit builds interpreter functions):

  python -m tests.sm90_build
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import tempfile
from collections import Counter
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from meshserve.layers.attention import triton_decode
from meshserve.layers.kernels import skinny_gemm

# name -> (activation dtype, weight dtype, BLOCK_M, BLOCK_K, scales, partial sums, PDL): decode launches.
CONFIGS = {
    "bf16_rows_16": ("bf16", "fp8e4nv", 16, 256, "rows", False, True),
    "bf16_blocks_16_split": ("bf16", "fp8e4nv", 16, 128, "blocks", True, True),
    "bf16_rows_64": ("bf16", "fp8e4nv", 64, 128, "rows", False, False),
    "fp16_rows_16": ("fp16", "fp8e4nv", 16, 256, "rows", False, False),
    "bf16_dense_16_split": ("bf16", "bf16", 16, 128, "none", True, True),
    "bf16_dense_16": ("bf16", "bf16", 16, 128, "none", False, True),
}
_INTS = ("M", "N", "K", "K_PER_SPLIT", "PREFETCH_K", "stride_xm", "stride_wn", "stride_sn", "stride_sk", "stride_om",
         "stride_os")


def build(dtype: str, weight: str, block_m: int, block_k: int, scales: str, partial: bool, pdl: bool) -> dict:
    signature = {"X": f"*{dtype}", "W": f"*{weight}", "S": "*fp32", "B": f"*{dtype}",
                 "OUT": "*fp32" if partial else f"*{dtype}", **{name: "i32" for name in _INTS}}
    fp8 = weight == "fp8e4nv"
    constexprs = {"SCALES": scales, "GROUP_N": 128 if scales == "blocks" else 1,
                  "GROUP_K": 128 if scales == "blocks" else 1, "HAS_BIAS": not partial, "PARTIAL": partial,
                  "PRECISION": "tf32", "EVEN_K": True, "BF16_ASM": fp8 and dtype == "bf16", "PDL": pdl,
                  "W_BYTES": 1 if fp8 else 2, "BLOCK_M": block_m, "BLOCK_N": skinny_gemm.BLOCK_N, "BLOCK_K": block_k}
    signature.update({name: "constexpr" for name in constexprs})
    # As the launcher specializes them: pointers and the K-sized integers are multiples of 16.
    names = list(signature)
    aligned = ["X", "W", "S", "B", "OUT", "K", "K_PER_SPLIT", "PREFETCH_K", "stride_xm", "stride_wn"]
    attrs = {(names.index(name),): [["tt.divisibility", 16]] for name in aligned}
    kernel = triton.compile(ASTSource(fn=skinny_gemm._skinny_kernel, signature=signature, constexprs=constexprs,
                                      attrs=attrs),
                            target=GPUTarget("cuda", 90, 32), options={"num_warps": 4, "num_stages": 3})
    sass = _sass(kernel)
    ptx = kernel.asm["ptx"]
    return {"mma": "wgmma" if "wgmma" in ptx else "mma.sync", "shared": kernel.metadata.shared,
            "f2f": len(re.findall(r"\bF2F\.", sass)), "pdl": "griddepcontrol.wait" in ptx,
            "prefetch": "cp.async.bulk.prefetch.L2" in ptx}


def build_decode(pool: str) -> dict:
    """Decode attention's stage 1 as the Triton backend launches it at batch > 2 over a `pool`
    ("bf16" or "fp8e4nv") pool, both at the FP8 pool's keys per block (the conversions of the
    probabilities scale with it): its conversion instructions (F2F / F2FP opcodes) and their counts."""
    pointers = {"Q": "*bf16", "K": f"*{pool}", "V": f"*{pool}", "NewK": "*bf16", "NewV": "*bf16", "Cos": "*fp32",
                "Sin": "*fp32", "Positions": "*i64", "Slots": "*i64", "Out": "*bf16", "PartialOut": "*fp32",
                "PartialLse": "*fp32", "Table": "*i64", "Rows": "*i64", "SeqLens": "*i64"}
    fp8 = pool == "fp8e4nv"
    constexprs = {"GROUP": 4, "HEAD_DIM": 128, "BLOCK_G": 16, "BLOCK_D": 128, "V_DIM": 128, "BLOCK_DV": 128,
                  "BLOCK_N": triton_decode.keys_per_block(2, 128, fp8_pool=True), "SPLITS": 1, "PRECISION": "tf32",
                  "NEW_IN_POOL": True,
                  "KV_FP8": fp8, "FP8_ASM": fp8, "PDL": True}
    names = triton_decode._decode_stage1.arg_names
    signature = {name: pointers.get(name, "fp32" if "scale" in name else "i32") for name in names}
    signature.update({name: "constexpr" for name in constexprs})
    kernel = triton.compile(ASTSource(fn=triton_decode._decode_stage1, signature=signature, constexprs=constexprs),
                            target=GPUTarget("cuda", 90, 32), options={"num_warps": 4, "num_stages": 2})
    return {"conversions": dict(Counter(re.findall(r"\b(F2FP?\.[A-Z0-9_.]+)", _sass(kernel))))}


def _sass(kernel) -> str:
    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(kernel.asm["cubin"])
        cubin.flush()
        return subprocess.run([str(cuobjdump), "-sass", cubin.name], check=True, capture_output=True,
                              text=True).stdout


def main() -> None:
    assert os.environ.get("TRITON_INTERPRET") != "1", "run without TRITON_INTERPRET"
    built = {name: build(*config) for name, config in CONFIGS.items()}
    built.update({f"decode_{pool}_pool": build_decode(pool) for pool in ("bf16", "fp8e4nv")})
    print(json.dumps(built))


if __name__ == "__main__":
    main()

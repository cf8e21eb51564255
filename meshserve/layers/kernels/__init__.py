"""Triton kernels behind the layers' GPU paths (RMSNorm, SiLU·mul, rotary + KV-pool store).

Each kernel reproduces its PyTorch reference's rounding: where the reference rounds an
intermediate to the activation dtype (bf16 products, the residual sum, the normalised value
before the weight), the kernel rounds at the same place, so fused and unfused paths agree to
the last bit except where a float32 reduction order differs. Layers call these for CUDA tensors
and keep the plain PyTorch path on the CPU; on a machine without CUDA the tests run the same
kernels in Triton's interpreter (TRITON_INTERPRET=1).
"""

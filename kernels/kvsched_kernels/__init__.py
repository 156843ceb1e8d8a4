"""Triton kernels of kvsched (GPU; checked on CPU with TRITON_INTERPRET=1).

`score`: retention values of eviction candidates; `fp8`: FP8 e4m3 quantize+gather / dequantize+scatter of KV pages.
kvsched.ops dispatches to these launchers; their specification is the torch reference in kvsched.ops.
"""

from kvsched_kernels import fp8, score

__all__ = ["fp8", "score"]

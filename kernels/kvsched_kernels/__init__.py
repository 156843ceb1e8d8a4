"""Triton kernels of kvsched (GPU; checked on CPU with TRITON_INTERPRET=1).

`score`: retention values of eviction candidates; `fp8`: FP8 e4m3 quantize+gather / dequantize+scatter of KV pages.
kvsched.ops dispatches to these launchers; their specification is the torch reference in kvsched.ops.
"""

from triton.runtime.interpreter import InterpretedFunction

from kvsched_kernels import fp8, score

# triton.jit made every kernel above interpreted or compiled when it was defined, by TRITON_INTERPRET at this import;
# set later, the variable does not make them interpreted, so the dispatcher (kvsched.ops.backends) asks this flag.
INTERPRETED: bool = isinstance(score._retention_values_kernel, InterpretedFunction)

__all__ = ["INTERPRETED", "fp8", "score"]

"""Triton kernels of kvsched (GPU; checked on CPU with TRITON_INTERPRET=1)."""

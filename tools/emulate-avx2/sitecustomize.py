"""Make this AVX-512 machine look like an AVX2-only one to torch, vLLM and kvsched (a developer's tool, not shipped).

With this directory first on PYTHONPATH, every Python process of the tree (API server, engine core, workers, tests)
sees torch's CPU probes answer as on an AVX2-only x86 CPU (no AVX-512, no AVX512-BF16, no AMX): vLLM then loads its
AVX2 kernels (`vllm._C_AVX2`), refuses an fp8 KV cache, and kvsched picks float32 models and caps its C++ kernels at
AVX2. torch's own kernels and oneDNN are capped too (ATEN_CPU_CAPABILITY, ONEDNN_MAX_CPU_ISA). What it cannot change:
the caches, memory bandwidth and clock of this CPU, so timings are indicative, not those of a real AVX2 machine.

    PYTHONPATH=tools/emulate-avx2 make test
"""

import os

os.environ.setdefault("ATEN_CPU_CAPABILITY", "avx2")
os.environ.setdefault("ONEDNN_MAX_CPU_ISA", "AVX2")
os.environ.setdefault("KVSCHED_CPU_ISA", "avx2")

try:
    import torch.cpu as _cpu
except ImportError:  # an interpreter of the tree without torch (build helpers): nothing to emulate
    pass
else:
    for _name in ("_is_avx512_supported", "_is_avx512_bf16_supported", "_is_amx_tile_supported",
                  "_is_amx_fp16_supported"):
        if hasattr(_cpu, _name):
            setattr(_cpu, _name, lambda: False)

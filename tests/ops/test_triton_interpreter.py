"""The Triton kernels, run by Triton's CPU interpreter (TRITON_INTERPRET=1 must be set before triton is imported,
so the checks run in a fresh interpreter process rather than in this one)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.ops.triton_run import checks_run

pytest.importorskip("triton")


def test_triton_kernels_match_the_reference_in_the_interpreter():
    """triton_checks.py in its own process, started when the suite was collected (triton_run.py says why)."""
    code, out, err = checks_run().result(timeout_s=600)
    assert code == 0, out + err
    if out.startswith("SKIP"):
        pytest.skip(out.strip())
    assert out.count("ok ") == 23, out


@pytest.mark.parametrize(("at_import", "later", "offered"), [("0", "1", False), ("1", "0", False), ("1", "1", True)])
def test_triton_is_offered_on_cpu_only_where_its_kernels_run_interpreted(at_import: str, later: str, offered: bool):
    """Found by review: the dispatcher read TRITON_INTERPRET at each call, but triton.jit fixed the kernels' mode when
    kvsched_kernels was imported; set later, Triton was offered on a CPU and the call failed in the GPU launcher.
    (Cleared later, Triton's interpreter fails at a launch: not offered either.)"""
    code = (
        "import os, torch\n"
        "from kvsched.ops import backends, fp8, score\n"
        "assert backends.triton_kernels() is not None\n"
        f"os.environ['TRITON_INTERPRET'] = '{later}'\n"
        "offered = {'triton' in op.available('cpu', torch.float32) for op in (fp8.QUANTIZE, score.RETENTION_VALUES)}\n"
        "if offered == {True}:\n"
        "    q, s = fp8.quantize_kv_fp8(torch.randn(2, 1, 4, 8), impl='triton')\n"
        "print(offered)\n"
    )
    env = dict(os.environ, TRITON_INTERPRET=at_import)
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300,
                          check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == str({offered})

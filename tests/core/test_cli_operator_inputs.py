"""An operator's inputs to `kvsched plan` and `kvsched simulate` that were taken without a word and gave something other
than what was asked (review 67): a `--plot` path without a suffix, a directory as `--plot`, a KV dtype vLLM has no
cache of. Each is a one-line error with exit status 2, or does exactly what the flag says."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kvsched.cli import main

PNG = b"\x89PNG\r\n\x1a\n"


def test_plan_plot_writes_its_png_at_the_path_given_even_without_a_suffix(tmp_path: Path, capsys) -> None:
    """matplotlib appended ".png" to a name without a suffix: `--plot chart` wrote chart.png and the JSON said chart."""
    pytest.importorskip("matplotlib")
    out = tmp_path / "chart"
    assert main(["plan", "--plot", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["plot"] == str(out)
    assert out.read_bytes()[:8] == PNG
    assert not (tmp_path / "chart.png").exists()


def test_plan_plot_to_a_directory_is_a_one_line_error(tmp_path: Path, capsys) -> None:
    """It wrote DIR.png beside the directory and exited 0, saying nothing."""
    pytest.importorskip("matplotlib")
    folder = tmp_path / "charts"
    folder.mkdir()
    assert main(["plan", "--plot", str(folder)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("kvsched plan: error:") and "Is a directory" in err and "Traceback" not in err
    assert not (tmp_path / "charts.png").exists() and not any(folder.iterdir())


@pytest.mark.parametrize("dtype", ["fp4", "int4", "int8", "float32", "fp32"])
def test_simulate_refuses_a_kv_dtype_vllm_has_no_cache_of(dtype: str, tmp_path: Path, capsys) -> None:
    """`kvsched plan --kv-dtype fp4` was refused, `kvsched simulate --kv-dtype fp4` sized the pool at half a byte an
    element (twice the blocks of fp8) and replayed it: the planner's table holds weight dtypes too."""
    out = tmp_path / "sim.json"
    code = main(["simulate", "--generate", "--quick", "--workflows", "1", "--no-progress", "--kv-gib", "16",
                 "--kv-dtype", dtype, "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and "unknown dtype for vLLM's KV cache" in err and "Traceback" not in err
    assert not out.exists()


def test_simulate_still_takes_the_kv_dtypes_vllm_serves(tmp_path: Path, capsys) -> None:
    sizes = {}
    for dtype in ("fp16", "BF16", "fp8"):
        out = tmp_path / f"{dtype}.json"
        assert main(["simulate", "--generate", "--quick", "--workflows", "1", "--no-progress", "--kv-gib", "16",
                     "--kv-dtype", dtype, "--out", str(out)]) == 0
        sizes[dtype] = json.loads(out.read_text())["config"]["kv_bytes_per_token"]
    capsys.readouterr()
    assert sizes["fp16"] == sizes["BF16"] == 2 * sizes["fp8"]

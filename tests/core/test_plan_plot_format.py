"""`kvsched plan --plot PATH` writes the format PATH's suffix names (.svg, .pdf: matplotlib's), a PNG otherwise, at
exactly PATH. Found by review (review68): the fix that wrote a suffix-less name as a PNG at that path (review67) forced
PNG for every path, so `--plot chart.svg`, an SVG before it, became PNG bytes in a file named .svg."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvsched.cli import main


@pytest.mark.parametrize("name, magic", [("chart.svg", b"<?xml"), ("chart.pdf", b"%PDF"), ("chart.PNG", b"\x89PNG"),
                                         ("chart", b"\x89PNG"), ("chart.v2", b"\x89PNG")])
def test_the_chart_is_written_in_the_format_its_suffix_names(tmp_path: Path, capsys, name: str, magic: bytes) -> None:
    pytest.importorskip("matplotlib")
    out = tmp_path / name
    assert main(["plan", "--plot", str(out)]) == 0
    assert out.read_bytes().startswith(magic) and [p.name for p in tmp_path.iterdir()] == [name]

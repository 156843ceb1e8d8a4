"""README's settings table names every setting the code reads: each `KVSCHED_*` variable (the literal ones and those
derived from the retention and compaction config fields) and each `--kvsched-*` flag."""

from __future__ import annotations

import re
from dataclasses import fields
from pathlib import Path

from kvsched.core.compaction_config import CompactionConfig
from kvsched.core.config import RetentionConfig

ROOT = Path(__file__).resolve().parents[1]


def settings_in_code() -> set[str]:
    names: set[str] = set()
    for path in (ROOT / "kvsched").rglob("*.py"):
        text = path.read_text()
        names |= set(re.findall(r'"(KVSCHED_[A-Z0-9_]*[A-Z0-9])"', text))
        names |= set(re.findall(r'"(--kvsched-[a-z0-9-]+)"', text))
    names |= {f"KVSCHED_{f.name.upper()}" for f in fields(RetentionConfig)}
    names |= {f"KVSCHED_COMPACTION_{f.name.upper()}" for f in fields(CompactionConfig) if f.name != "strategy"}
    return names


def settings_table() -> str:
    readme = (ROOT / "README.md").read_text()
    start = readme.index("### Settings")
    return readme[start:readme.index("\n## ", start)]


def test_every_setting_the_code_reads_is_in_the_readme_table() -> None:
    table = settings_table()
    missing = sorted(n for n in settings_in_code() if f"`{n}" not in table)
    assert not missing, f"README's settings table lacks {missing}"
    assert len(settings_in_code()) > 20  # the scan itself found the settings


def test_every_variable_in_the_readme_table_is_read_by_the_code() -> None:
    """The other direction: a row whose variable nothing reads (renamed, or removed) would mislead an operator."""
    table = set(re.findall(r"^\| `(KVSCHED_[A-Z0-9_]*[A-Z0-9])", settings_table(), re.M))
    table |= set(re.findall(r"^\| `KVSCHED_[A-Z0-9_]+` / `(KVSCHED_[A-Z0-9_]*[A-Z0-9])`", settings_table(), re.M))
    assert len(table) > 60
    unread = sorted(table - settings_in_code())
    assert not unread, f"README rows the code never reads: {unread}"


def test_the_readme_says_vllm_plugins_must_name_kvsched() -> None:
    """Found by review: with `VLLM_PLUGINS` set (vLLM's allow-list, for every plugin group) without kvsched, the plugin
    never loads and `--scheduler kvsched` fails as an ambiguous prefix of `--scheduler-cls`. The name it must hold is
    the entry point's."""
    import tomllib

    entry = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["entry-points"]["vllm.general_plugins"]
    readme = " ".join((ROOT / "README.md").read_text().split())
    assert list(entry) == ["kvsched"]
    assert "`VLLM_PLUGINS`" in readme and "include `kvsched`" in readme and "ambiguous option" in readme

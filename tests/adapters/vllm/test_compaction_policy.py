"""Compaction's summary calls are sent at a lower vLLM priority, which vLLM's default FCFS policy ignores
(vllm/v1/core/sched/request_queue.py): `vllm serve --scheduler kvsched` says so once at start."""

from __future__ import annotations

import pytest

pytest.importorskip("vllm")

from tests.adapters.vllm.test_compat import serve  # noqa: E402

WARNING = "--scheduling-policy priority"


@pytest.fixture(autouse=True)
def _no_compaction_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("KVSCHED_COMPACTION", "KVSCHED_COMPACTION_CLIENT_STRATEGIES"):
        monkeypatch.delenv(var, raising=False)


@pytest.mark.parametrize("env", [{"KVSCHED_COMPACTION": "summarize"},
                                 {"KVSCHED_COMPACTION_CLIENT_STRATEGIES": "summarize"}])
def test_summaries_under_fcfs_are_warned_about_once(vllm_cli, monkeypatch, capsys, env) -> None:
    """Found by review: the summary call's priority (KVSCHED_COMPACTION_SUMMARY_PRIORITY) did nothing under vLLM's
    default policy, and nothing said so."""
    for var, value in env.items():
        monkeypatch.setenv(var, value)
    serve(vllm_cli, "--scheduler", "kvsched")
    err = capsys.readouterr().err
    assert err.count(WARNING) == 1 and "kvsched: warning: " in err and "fcfs" in err
    serve(vllm_cli, "--scheduler", "kvsched", "--scheduling-policy", "priority")
    assert WARNING not in capsys.readouterr().err


@pytest.mark.parametrize(("env", "argv"), [
    ({}, ["--scheduler", "kvsched"]),  # compaction off
    ({"KVSCHED_COMPACTION": "sliding_window"}, ["--scheduler", "kvsched"]),  # no summary call
    ({"KVSCHED_COMPACTION": "summarize"}, []),  # stock vLLM: kvsched's compaction does not run
])
def test_no_warning_without_summary_calls(vllm_cli, monkeypatch, capsys, env, argv) -> None:
    for var, value in env.items():
        monkeypatch.setenv(var, value)
    serve(vllm_cli, *argv)
    assert WARNING not in capsys.readouterr().err

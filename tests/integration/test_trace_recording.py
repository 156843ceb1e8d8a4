"""KVSCHED_RECORD_TRACE on a real `vllm serve --scheduler kvsched` (the package's shared hardened server records every
request it serves): a conversation driven through the real openai client is in the trace with the lengths the API
reported and its turns as deltas of one another, nothing it sent is in the file, and `kvsched simulate` replays the
whole recording at the engine's pool."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

openai = pytest.importorskip("openai")

from tests.integration.secure import KEYS, SYSTEM  # noqa: E402

pytestmark = pytest.mark.integration


def lines_of(path: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    lines = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    return lines[0], lines[1:]


def session_with(path: Path, prompts: list[int], timeout_s: float = 15.0) -> list[dict[str, Any]]:
    """The recorded lines of the session whose prompts were exactly `prompts`, in arrival order."""
    deadline = time.monotonic() + timeout_s
    while True:
        by_session: dict[str, list[dict[str, Any]]] = {}
        for line in lines_of(path)[1]:
            by_session.setdefault(line["session"], []).append(line)
        for rows in by_session.values():
            rows.sort(key=lambda r: r["t"])
            if [r["prompt_tokens"] for r in rows] == prompts:
                return rows
        if time.monotonic() > deadline:
            raise AssertionError(f"no recorded session with prompts {prompts} in {len(by_session)} sessions")
        time.sleep(0.2)


def test_a_conversation_is_recorded_as_the_engine_served_it_and_replays(secure_server, secure_recording, tmp_path):
    sid, salt = f"rec-{uuid.uuid4().hex[:8]}", f"salt-{uuid.uuid4().hex}"
    client = openai.OpenAI(base_url=secure_server.url, api_key=KEYS[0], max_retries=0, timeout=120)
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Find the three largest tables."}]
    usage = []
    for turn in range(3):
        reply = client.chat.completions.create(model="tiny", messages=messages, max_tokens=6, temperature=0.0,
                                               extra_headers={"X-Session-Id": sid, "X-Agent-Role": "researcher"},
                                               extra_body={"cache_salt": salt})
        usage.append((reply.usage.prompt_tokens, reply.usage.completion_tokens))
        messages += [{"role": "assistant", "content": reply.choices[0].message.content},
                     {"role": "user", "content": f"tool result {turn}: " + "rows columns " * 20}]
    rows = session_with(secure_recording, [p for p, _ in usage])
    header, body = lines_of(secure_recording)
    assert header["block_size"] == 32 and header["meta"]["capacity_blocks"] == 47 and header["meta"]["anonymized"]
    assert [(r["prompt_tokens"], r["output_tokens"]) for r in rows] == usage
    assert all(r["role"] == "researcher" and r["duration_s"] > 0 for r in rows)
    assert rows[1]["reuse"] >= usage[0][0] // 32 - 1 and rows[2]["reuse"] >= usage[1][0] // 32 - 1  # deltas
    assert len({r["salt"] for r in rows}) == 1
    text = secure_recording.read_text()
    assert sid not in text and salt not in text and KEYS[0] not in text and "tables" not in text
    out = tmp_path / "sim.json"
    done = subprocess.run([sys.executable, "-m", "kvsched.cli", "simulate", str(secure_recording), "--capacity-blocks",
                           str(header["meta"]["capacity_blocks"]), "--policies", "lru,kvsched", "--out", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    sim = json.loads(out.read_text())
    assert sim["lru"]["requests"] + sim["lru"].get("rejected", 0) >= len(body)

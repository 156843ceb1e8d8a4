"""What a message counts for the compaction trigger (found by review, /tmp/rev_compaction/p2_multimodal.py: image,
audio, video and file parts counted 0 tokens, and tool call ids and names nothing, so a session of pictures never
triggered and its summary calls went past the model's context)."""

import asyncio

from kvsched.adapters.vllm.compaction_tokens import MediaCosts, TokenCounter, message_text
from kvsched.core.compaction_config import CompactionConfig
from tests.adapters.vllm.test_compaction import SCOPE, FakeVllm, compactor, request, run


def words(text: str) -> int:
    return len(text.split())


IMAGE = {"type": "image_url", "image_url": {"url": "data:image/png;base64," + "A" * 200_000}}
AUDIO = {"type": "input_audio", "input_audio": {"data": "B" * 100_000, "format": "wav"}}
VIDEO = {"type": "video_url", "video_url": {"url": "https://example.com/v.mp4"}}
FILE = {"type": "file", "file": {"file_data": "C" * 1000}}


def test_media_parts_count_their_configured_cost_and_text_parts_their_words():
    counter = TokenCounter(words, MediaCosts(image=100, audio=50, video=400))
    msgs = [{"role": "user", "content": [{"type": "text", "text": "look at this"}, IMAGE]},
            {"role": "user", "content": [AUDIO, {"type": "text", "text": "and hear"}]},
            {"role": "user", "content": [VIDEO, FILE, 7, {"type": "refusal", "refusal": "no way"}]}]
    assert asyncio.run(counter.counts(msgs, {})) == [3 + 100, 2 + 50, 400 + 100 + 2]  # a file counts as an image
    defaults = CompactionConfig()
    assert (defaults.image_tokens, defaults.audio_tokens, defaults.video_tokens) == (1024, 750, 4096)


def test_the_text_of_list_content_tool_calls_names_and_tool_call_ids_is_counted():
    assert message_text({"role": "user", "content": [{"type": "text", "text": "a b"}, IMAGE,
                                                     {"type": "text", "text": "c"}]}) == "a b\nc"
    call = {"id": "call_1", "type": "function", "function": {"name": "search", "arguments": '{"q": "kv"}'}}
    text = message_text({"role": "assistant", "content": None, "tool_calls": [call]})
    assert "search" in text and "call_1" in text and '\\"q\\"' in text
    tool = message_text({"role": "tool", "tool_call_id": "call_" + "x" * 40, "name": "search", "content": "ok"})
    assert tool.split() == ["ok", "search", "call_" + "x" * 40]


def test_a_session_of_pictures_is_compacted():
    comp = compactor(FakeVllm(), wait_for_summary=True, image_tokens=30)
    payload = request(3)  # 16 words of older text: under the trigger of 40 without the pictures
    for m in payload["messages"][1:-1]:
        if m["role"] == "user":
            m["content"] = [{"type": "text", "text": m["content"]}, IMAGE]
    out = run(comp.prepare(SCOPE, payload, {}))
    assert out.replaced > 0 and comp.stats()["summaries"] == 1

"""Session ids users send (UUIDs, e-mail addresses, URLs, non-Latin scripts with combining marks, emoji sequences)
pass; a character that prints as nothing where it stands, or as a plain space, is refused naming it
(kvsched/core/unseen.py's rule).

Found by review (review68): every Unicode Cf character was refused, U+200D ZERO WIDTH JOINER among them, so a family
emoji, the rainbow flag, Scotland's flag, a Persian word (U+200C inside it) or a Devanagari conjunct (U+200D after the
virama) was a 400; while `wf-1` + U+FE0F (prints as `wf-1`), a Hangul filler, U+034F or a no-break or hair space
(`wf 1` beside `wf 1`) passed as a second session."""

from __future__ import annotations

import re

import pytest

from kvsched.core.client_fields import read_session_fields
from kvsched.core.sessions import InvalidSessionInput, validate_session_id

SENT = {
    "uuid": "3f2b9c1e-8d4a-4e6f-9b7a-2c1d0e5f6a7b",
    "email": "ana.lópez+agents@example.com",
    "url": "https://example.com/runs/42?step=3#turn",
    "cjk": "日本語のセッション-7",
    "korean": "세션-일",
    "arabic": "محادثة-٣",
    "hindi": "नमस्ते-सत्र",
    "thai": "เซสชัน",
    "accents": "e\u0301te\u0301",
    "family": "\U0001f468\u200d\U0001f469\u200d\U0001f467",
    "rainbow flag": "\U0001f3f3\ufe0f\u200d\U0001f308",
    "astronaut, skin tone": "\U0001f9d1\U0001f3fd\u200d\U0001f680",
    "heart on fire": "\u2764\ufe0f\u200d\U0001f525",
    "polar bear": "\U0001f43b\u200d\u2744\ufe0f",
    "team of emoji": "team-\U0001f469\u200d\U0001f4bb-\U0001f468\u200d\U0001f52c",
    "scotland": "\U0001f3f4\U000e0067\U000e0062\U000e0073\U000e0063\U000e0074\U000e007f",
    "red heart": "\u2764\ufe0f",
    "keycap": "run-1\ufe0f\u20e3",
    "persian": "\u0645\u06cc\u200c\u062e\u0648\u0627\u0647\u0645",
    "devanagari conjunct": "\u0915\u094d\u200d\u0937",
    "devanagari half form": "\u0915\u094d\u200c\u0937",
    "sinhala": "\u0dc1\u0dca\u200d\u0dbb\u0dd3",
    "bengali ra, joiner, virama": "\u09b0\u200d\u09cd\u09af\u09be\u09ac",
    "head shaking (an arrow, Sm)": "\U0001f642\u200d\u2194\ufe0f",
    "mongolian vowel separator": "\u1828\u1820\u1822\u182e\u1820\u180e\u1820",
    "ideographic variant": "\u845b\U000e0100",
    "arabic number sign": "\u0600\u0661\u0662",
    "ideographic space": "\u5c71\u7530\u3000\u592a\u90ce",
    "spaces inside": "my agent 7",
}
UNSEEN = {
    "trailing joiner": ("wf-1\u200d", 0x200D),
    "leading joiner": ("\u200d\U0001f468", 0x200D),
    "joiner between letters": ("a\u200db", 0x200D),
    "joiner emoji then letter": ("\U0001f600\u200da", 0x200D),
    "non-joiner between Latin letters": ("a\u200cb", 0x200C),
    "joiner between ASCII symbols": ("a+\u200d+", 0x200D),
    "vowel separator outside Mongolian": ("\u00e9\u180e\u00e9", 0x180E),
    "selector after ASCII": ("wf-1\ufe0f", 0xFE0F),
    "selector alone": ("\ufe0f", 0xFE0F),
    "hangul filler": ("wf\u3164", 0x3164),
    "grapheme joiner": ("a\u034fb", 0x034F),
    "tags, no cancel": ("\U0001f3f4\U000e0067\U000e0062", 0xE0067),
    "tags after a letter": ("a\U000e0067\U000e007f", 0xE0067),
    "cancel tag alone": ("x\U000e007f", 0xE007F),
    "zero-width space": ("wf-1\u200b", 0x200B),
    "bidi override": ("a\u202eb", 0x202E),
    "line separator": ("a\u2028b", 0x2028),
    "no-break space": ("wf\u00a01", 0x00A0),
    "hair space": ("wf\u200a-1", 0x200A),
    "narrow no-break space": ("wf\u202f1", 0x202F),
}


@pytest.mark.parametrize("name", SENT)
def test_ids_users_send_pass(name):
    assert validate_session_id(SENT[name]) == SENT[name]


@pytest.mark.parametrize("name", UNSEEN)
def test_a_character_that_prints_as_nothing_is_refused_naming_it(name):
    bad, code = UNSEEN[name]
    with pytest.raises(InvalidSessionInput, match=re.escape(f"U+{code:04X}")):
        validate_session_id(bad)


def test_the_refusal_says_the_rule():
    with pytest.raises(InvalidSessionInput) as info:
        validate_session_id("wf-1\u200d")
    message = str(info.value)
    assert "U+200D ZERO WIDTH JOINER at 4" in message and "print alike" in message and "emoji ZWJ" in message
    with pytest.raises(InvalidSessionInput, match="bidi control"):
        validate_session_id("a\u202eb")


def test_the_request_fields_take_an_emoji_zwj_id_from_the_body_and_the_header():
    family = SENT["family"]
    assert read_session_fields({"session_id": family}, {}).session_id == family
    assert read_session_fields({}, {"x-session-id": family}).session_id == family

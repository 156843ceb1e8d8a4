"""kvsched/core/unseen.py against a second, plain reading of its written rule (`reference`: each visible sequence
found by a regular expression over the whole id, the rule's sets spelt out here), on ids of random characters drawn
from those the rule is about, and `unseen`'s fast path (ASCII, or printable with no suspect) against its full scan
(`scan`) on every one. Then what review69 found: U+2800 BRAILLE PATTERN BLANK passed (an id of it alone prints
blank), and so did the unassigned default-ignorable code points (U+2065, U+FFF0, U+E0080: printed as nothing); the
emoji U+203C, U+2049, U+3030 and U+303D (Po and Pd) with U+FE0F, sequences of UTS #51's emoji-variation-sequences,
were refused, and so was CJK punctuation's positional variant (U+3001 U+FE00, StandardizedVariants)."""

from __future__ import annotations

import re
import unicodedata

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvsched.core.sessions import InvalidSessionInput, validate_session_id
from kvsched.core.unseen import scan, unseen
from kvsched.core.variation_data import VARIATION_BASES

ZWJ, ZWNJ, FE0F, KEYCAP, CANCEL = "\u200d", "\u200c", "\ufe0f", "\u20e3", "\U000e007f"
SELECTORS = "[\ufe00-\ufe0f\U000e0100-\U000e01ef\u180b-\u180d\u180f]"
TAGS = "[\U000e0020-\U000e007e]"
MODIFIERS = "[\U0001f3fb-\U0001f3ff]"
PREPENDED = "\u0600\u0601\u0602\u0603\u0604\u0605\u06dd\u070f\u0890\u0891\u08e2\U000110bd\U000110cd"
BLANKS = "\u034f\u115f\u1160\u17b4\u17b5\u3164\uffa0"


def emoji(ch: str) -> bool:
    return not ch.isascii() and unicodedata.category(ch) in ("So", "Sm")


def arabic_letter(ch: str) -> bool:
    return unicodedata.bidirectional(ch) == "AL" and ch.isalpha()


def visible(text: str) -> set[int]:
    """Indices of the joiners, tags, selectors and signs the rule takes, each sequence found as a whole."""
    ok: set[int] = {i for i, ch in enumerate(text) if ch in PREPENDED}
    for m in re.finditer(f"(?=({TAGS}+{CANCEL}))", text):
        start = m.start()  # a whole run of tags then CANCEL TAG, after an So (not after another tag)
        if start and unicodedata.category(text[start - 1]) == "So":
            ok.update(range(start, start + len(m.group(1))))
    for i, ch in enumerate(text):
        before, after = text[:i][-1:], text[i + 1:i + 2]
        if ch in (ZWJ, ZWNJ) and 9 in (unicodedata.combining(before or " "), unicodedata.combining(after or " ")):
            ok.add(i)
        elif ch == ZWJ:
            head = re.sub(f"(?:{SELECTORS}|{MODIFIERS})+$", "", text[:i])
            if head and emoji(head[-1]) and after and emoji(after):
                ok.add(i)
        elif ch == ZWNJ:
            left = "".join(c for c in text[:i] if unicodedata.category(c) != "Mn")[-1:]
            right = "".join(c for c in text[i + 1:] if unicodedata.category(c) != "Mn")[:1]
            if left and right and arabic_letter(left) and arabic_letter(right):
                ok.add(i)
        elif ch == "\u180e":
            if before and after and all(0x1820 <= ord(c) <= 0x18AF for c in before + after):
                ok.add(i)
        elif re.fullmatch(SELECTORS, ch):
            if ch == FE0F and before and before in "0123456789#*" and after == KEYCAP:
                ok.add(i)
            elif before and not before.isascii() and sequence(before, ch):
                ok.add(i)
    return ok


def sequence(base: str, selector: str) -> bool:
    """Unicode defines `base` + `selector` (a non-ASCII base): the generated table for U+FE00..U+FE0F, an ideograph's
    IVD selectors, a Mongolian letter's free variation selectors."""
    o = ord(selector)
    if o >= 0xE0100:
        return "CJK UNIFIED IDEOGRAPH-" in unicodedata.name(base, "")
    if o >= 0xFE00:
        return ord(base) in VARIATION_BASES[o] if o in VARIATION_BASES else False
    return 0x1820 <= ord(base) <= 0x18AF


def mongolian_suffix(text: str, i: int) -> bool:
    """U+202F after a Mongolian letter (past one free variation selector) and before one."""
    head = re.sub("[\u180b-\u180d\u180f]\\Z", "", text[:i])
    return bool(head) and 0x1820 <= ord(head[-1]) <= 0x18AF and re.match("[\u1820-\u18af]", text[i + 1:]) is not None


def reference(text: str) -> tuple[int, str] | None:
    """(index, kind) of the first character the written rule refuses."""
    ok = visible(text)
    for i, ch in enumerate(text):
        o, cat = ord(ch), unicodedata.category(ch)
        if cat in ("Zl", "Zp"):
            return i, "separator"
        if ch in "\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069":
            return i, "bidi control"
        if (cat == "Zs" and ch not in " \u1680\u3000" and not (ch == "\u202f" and mongolian_suffix(text, i))) \
                or ch == "\u2800":
            return i, "space"
        ignorable = cat == "Cn" and (o == 0x2065 or 0xFFF0 <= o <= 0xFFF8 or 0xE0000 <= o <= 0xE0FFF)
        if ch in BLANKS or ignorable or ((cat == "Cf" or re.fullmatch(SELECTORS, ch)) and i not in ok):
            return i, "invisible"
    return None


KINDS = {"separator": "line or paragraph separator", "bidi control": "bidi control", "space": "a space that prints",
         "invisible": "an invisible character"}
ALPHABET = ("a1#* -.", "\u00e9\u00a9\u2122\u2139\u203c\u3030\u3001", "\u2764\u2b1b\u2194\u2640",
            "\U0001f468\U0001f469\U0001f3f4\U0001f3f3\U0001f525\U0001f3fd", ZWJ + ZWNJ, FE0F + "\ufe0e\ufe00",
            "\U000e0100\u180b\u180f" + KEYCAP, "\U000e0067\U000e0062\U000e0073" + CANCEL + "\U000e0001",
            "\u0915\u094d\u0937\u09b0\u09cd", "\u0645\u06cc\u064e\u0627\u062e", "\u1820\u1828\u180e\u202f\u180b",
            "\u845b\u2229\u0030\u00ae",
            "\u200b\u00ad\u2060\ufeff\u202e\u2066\u2028", "\u00a0\u200a\u202f\u3000\u1680\u2800",
            BLANKS, "\u0600\u0661\u2065\ufff0\U000e0080\U0001fa77", "\u65e5\uc138\U0001d173")
CHARS = st.sampled_from("".join(ALPHABET))


@settings(max_examples=3000, deadline=None)
@given(st.text(CHARS, min_size=1, max_size=12))
def test_the_rule_as_written_and_the_fast_path_agree_on_random_ids(text):
    got, want, full = unseen(text), reference(text), scan(text)
    assert got == full, (text, got, full)  # the fast path gives what every character's look gives
    if want is None:
        assert got is None, (ascii(text), got)
    else:
        i, kind = want
        assert got is not None and f"U+{ord(text[i]):04X}" in got and f" at {i}: " in got, (ascii(text), got, want)
        assert KINDS[kind] in got, (ascii(text), got, want)


@settings(max_examples=3000, deadline=None)
@given(st.text(st.characters(exclude_categories=("Cs",)), min_size=1, max_size=16))
def test_the_fast_path_agrees_with_the_scan_on_any_characters(text):
    assert unseen(text) == scan(text), ascii(text)
    want = reference(text)
    assert (unseen(text) is None) == (want is None), (ascii(text), unseen(text), want)


@pytest.mark.parametrize("text", ["https://example.com/runs/a%20b?q=%E2%9C%93&x=1", "user+tag@example.co.uk",
                                  "urn:uuid:f81d4fae-7dec-11d0-a765-00a0c91e6bf6", "\U0001f44d\U0001f3fd-run",
                                  "\U0001f1ef\U0001f1f5-\U0001f1fa\U0001f1e6", "#\ufe0f\u20e3-*\ufe0f\u20e3",
                                  "\u0915\u094d\u0937\u0924\u094d\u0930\u093f\u092f",
                                  "\u0645\u064f\u062d\u064e\u0645\u0651\u064e\u062f", "\u4f1a\u8bdd\uff1a\u7b2c\u4e00",
                                  "\U0001f469\U0001f3fb\u200d\U0001f91d\u200d\U0001f468\U0001f3ff",
                                  "\u2139\ufe0f-info"])
def test_more_ids_clients_send_pass(text):
    assert validate_session_id(text) == text and reference(text) is None


@pytest.mark.parametrize("text", ["\u203c\ufe0f", "run-\u2049\ufe0f", "\u3030\ufe0f", "\u303d\ufe0f",
                                  "\u3001\ufe00"])
def test_emoji_and_variants_after_punctuation_pass(text):
    assert validate_session_id(text) == text


@pytest.mark.parametrize(("text", "code", "at"), [("\u2800", 0x2800, 0), ("\u2800\u2800\u2800", 0x2800, 0),
                                                  ("wf\u28001", 0x2800, 2), ("wf\u20651", 0x2065, 2),
                                                  ("wf-\ufff0", 0xFFF0, 3), ("a\U000e0080b", 0xE0080, 1)])
def test_blank_and_unassigned_ignorable_characters_are_refused_naming_them(text, code, at):
    with pytest.raises(InvalidSessionInput, match=re.escape(f"U+{code:04X}") + f".* at {at}: "):
        validate_session_id(text)

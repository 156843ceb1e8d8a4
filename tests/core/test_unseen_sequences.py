"""A variation selector is taken only in a variation sequence Unicode defines (StandardizedVariants.txt, UTS #51's
emoji-variation-sequences.txt, an ideograph's IVD selector, a Mongolian letter's free variation selector): the only
sequences that print unlike their base alone; and U+202F NARROW NO-BREAK SPACE between two Mongolian letters (before
a suffix) is Mongolian's own space (kvsched/core/unseen.py's rule).

Found by leftovers70: a Mongolian id with U+202F before its suffix was refused, and a selector after any non-ASCII
letter, number, symbol or punctuation mark passed (`café` + U+FE0F prints as `café`: two sessions printed alike)."""

from __future__ import annotations

import re

import pytest

from kvsched.core.sessions import InvalidSessionInput, validate_session_id
from kvsched.core.variation_data import VARIATION_BASES

TAKEN = {
    "mongolian suffix (bichig-un)": "\u182a\u1822\u1834\u1822\u182d\u202f\u1824\u1828",
    "mongolian suffix after a free variation selector": "\u1828\u1820\u180b\u202f\u1822\u1822\u1828",
    "mongolian letter, free variation selector": "\u1820\u180b\u1821",
    "intersection with serifs": "set-\u2229\ufe00",
    "ideographic variant (IVD)": "\u845b\U000e0100\u57ce",
    "copyright sign, emoji form": "\u00a9\ufe0f-2024",
    "registered sign, text form": "\u00ae\ufe0e",
    "CJK comma's positional variant": "\u4e00\u3001\ufe01",
    "script capital B variant": "\u212c\ufe00",
}
REFUSED = {
    "letter with an emoji selector": ("caf\u00e9\ufe0f", 0xFE0F, 4),
    "letter with a text selector": ("\u0436\ufe0e", 0xFE0E, 1),
    "emoji with a selector it has no sequence for": ("\u00a9\ufe00", 0xFE00, 1),
    "IVD selector after a letter": ("\u00e9\U000e0100", 0xE0100, 1),
    "free variation selector after Cyrillic": ("\u0436\u180b", 0x180B, 1),
    "ASCII zero's short-stroke form": ("wf-0\ufe00", 0xFE00, 4),
    "narrow no-break space between Latin letters": ("wf\u202f1", 0x202F, 2),
    "narrow no-break space after a Mongolian letter, before a Latin one": ("\u1820\u202fa", 0x202F, 1),
    "narrow no-break space at the end of Mongolian": ("\u1820\u1821\u202f", 0x202F, 2),
}


@pytest.mark.parametrize("name", TAKEN)
def test_real_sequences_and_mongolian_suffix_spaces_pass(name):
    assert validate_session_id(TAKEN[name]) == TAKEN[name]


@pytest.mark.parametrize("name", REFUSED)
def test_selectors_outside_a_sequence_and_other_narrow_spaces_are_refused_naming_them(name):
    text, code, at = REFUSED[name]
    with pytest.raises(InvalidSessionInput, match=re.escape(f"U+{code:04X}") + f".* at {at}: "):
        validate_session_id(text)


def test_the_table_holds_unicodes_sequences():
    """Spot checks of tools/variation_data.py's output against lines of the two Unicode 15.0 files."""
    assert {0xFE00, 0xFE01, 0xFE02, 0xFE0E, 0xFE0F} == set(VARIATION_BASES)
    assert 0x2764 in VARIATION_BASES[0xFE0F] and 0x2764 in VARIATION_BASES[0xFE0E]  # 2764 FE0F ; emoji style
    assert 0x1F004 in VARIATION_BASES[0xFE0F] and 0x23 in VARIATION_BASES[0xFE0F]
    assert 0x3001 in VARIATION_BASES[0xFE00] and 0x3001 in VARIATION_BASES[0xFE01]  # East Asian punctuation
    assert 0x2229 in VARIATION_BASES[0xFE00] and 0x8C48 in VARIATION_BASES[0xFE00]  # CJK compatibility ideograph
    assert 0x00E9 not in VARIATION_BASES[0xFE0F] and len(VARIATION_BASES[0xFE0F]) == 354

"""Characters of a session id that print as nothing where they stand: two ids that print alike must not be two
sessions, listed, logged and deleted under what reads as one name (review67), and a bidi control reorders the log line
it is printed in.

The rule (`unseen`): a format character (Unicode Cf: bidi controls, zero-width space, word joiner, BOM, soft hyphen,
invisible operators), a line or paragraph separator (Zl, Zp), a space that prints as U+0020 or narrower (no-break,
thin, hair: Zs but U+0020, U+1680, U+3000, and U+2800 BRAILLE PATTERN BLANK, which prints as a space), a blank filler
(Hangul fillers, U+034F), an unassigned default-ignorable code point (U+2065, U+FFF0..U+FFF8, U+E0000..U+E0FFF but
the tags and selectors: Unicode reserves them to print as nothing, whatever it assigns them) or a variation selector
is refused, except where it is part of a visible sequence:
- U+200D ZERO WIDTH JOINER between two emoji (an emoji ZWJ sequence: the family U+1F468 U+200D U+1F469 U+200D
  U+1F467, the rainbow flag, a skin-toned astronaut) or next to a virama (Indic conjuncts: Devanagari, Sinhala,
  Bengali's ra + U+200D + virama + ya);
- U+200C ZERO WIDTH NON-JOINER next to a virama, or between two Arabic-script letters (Persian writes it inside words);
- U+180E MONGOLIAN VOWEL SEPARATOR between two Mongolian letters, and U+202F NARROW NO-BREAK SPACE there (before
  a Mongolian suffix, whose letter forms it selects: the suffix then prints unlike after a plain space);
- tag characters in an emoji tag sequence (U+1F3F4 then tags then U+E007F CANCEL TAG: the flags of Scotland, Wales);
- a variation selector in a variation sequence Unicode defines, the only ones that change how their base prints
  (StandardizedVariants.txt says so): U+FE00..U+FE0F after a base StandardizedVariants.txt or UTS #51's
  emoji-variation-sequences.txt gives it (variation_data.py: the emoji form of U+2764 or of U+203C, CJK punctuation's
  positional variants, a mathematical symbol's variant), U+E0100..U+E01EF after a CJK unified ideograph (the
  Ideographic Variation Database's sequences, a Japanese name's variant of U+845B), Mongolian's free variation
  selectors after a Mongolian letter, and U+FE0F in a keycap (1 U+FE0F U+20E3); no other selector after an ASCII
  character (`0` + U+FE00, a short-stroke zero, prints as `0` in a log's font);
- the prepended concatenation marks (U+0600 ARABIC NUMBER SIGN ...), which are Cf but print a sign.
These are IDNA's contextual rules for the joiners (RFC 5892, CONTEXTJ, its joining types read as the Arabic-letter bidi
class; Bengali's joiner before the virama added) and Unicode's emoji sequences (UTS #51, an emoji read as a non-ASCII
symbol, So or Sm). Found by review (review68): every Cf character was refused, so an id of a family emoji, a Scottish
flag, a Persian word or a Devanagari conjunct was a 400, while U+FE0F after an ASCII letter (`wf-1` + U+FE0F prints as
`wf-1`) and a Hangul filler passed. Known gaps (the standard library has neither joining types nor the emoji list): a
ZWNJ after an Arabic letter that joins on one side only (alef, dal, reh, waw) changes nothing visible, and is taken; so
is a ZWJ between two emoji that form no sequence (U+1F600 U+200D U+1F600 prints as two faces). Canonically equivalent
ids (U+00E9, or e + U+0301) and look-alike letters (Cyrillic a) are two sessions still. Found by review (review69):
U+2800 (an id of it alone prints blank) and the unassigned default-ignorables passed, and the emoji U+203C, U+2049,
U+3030 and U+303D (punctuation) were refused with their U+FE0F (UTS #51's emoji-variation-sequences list them).
Found by leftovers70: U+202F, which Mongolian writes before its suffixes, was refused in Mongolian text; a selector
after any non-ASCII letter, number, symbol or mark passed (`café` + U+FE0F prints as `café`, a second session). Known
gaps: an ideograph takes every selector of U+E0100..U+E01EF, registered or not (the IVD is too large to carry), and a
Mongolian letter every free variation selector (Unicode's Mongolian variants, UTN #57, outgrew
StandardizedVariants.txt).
"""

from __future__ import annotations

import re
import unicodedata

from kvsched.core.variation_data import VARIATION_BASES

ZWNJ, ZWJ = "\u200c", "\u200d"
KEYCAP = "\u20e3"
CANCEL_TAG = "\U000e007f"
VIRAMA = 9  # canonical combining class of a virama (halant, al-lakuna)
BIDI_CONTROLS = frozenset("\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")
VISIBLE_FORMAT = frozenset("\u0600\u0601\u0602\u0603\u0604\u0605\u06dd\u070f\u0890\u0891\u08e2\U000110bd\U000110cd")
BLANKS = frozenset("\u034f\u115f\u1160\u17b4\u17b5\u3164\uffa0")  # default-ignorable letters and marks
SEPARATORS = frozenset({"Zl", "Zp"})
VISIBLE_SPACES = frozenset(" \u1680\u3000")  # a space, OGHAM SPACE MARK (a stroke), the ideographic space (CJK's)
NNBSP = "\u202f"  # NARROW NO-BREAK SPACE: Mongolian writes it before a suffix, which it shapes
BRAILLE_BLANK = "\u2800"  # So, but prints as a space: refused as the spaces narrower than the ideographic one
EMOJI_MODIFIERS = range(0x1F3FB, 0x1F400)  # skin tones (category Sk)


# what `str.isprintable` passes of the above (it refuses Cf, Zl, Zp: one C loop for the ids with none of them)
_PRINTABLE_SUSPECTS = re.compile("[\u034f\u115f\u1160\u17b4\u17b5\u3164\uffa0\ufe00-\ufe0f\u180b-\u180d\u180f"
                                 "\U000e0100-\U000e01ef\u2800]")


def _unassigned_ignorable(ch: str) -> bool:
    """An unassigned code point of Unicode's Default_Ignorable_Code_Point (DerivedCoreProperties.txt)."""
    o = ord(ch)
    return (o == 0x2065 or 0xFFF0 <= o <= 0xFFF8 or 0xE0000 <= o <= 0xE0FFF) and unicodedata.category(ch) == "Cn"


def _selector(ch: str) -> bool:
    o = ord(ch)
    return 0xFE00 <= o <= 0xFE0F or 0xE0100 <= o <= 0xE01EF or 0x180B <= o <= 0x180D or o == 0x180F


def _tag(ch: str) -> bool:
    return 0xE0020 <= ord(ch) <= 0xE007E


def _emoji(ch: str) -> bool:
    """An emoji as far as the standard library tells: a non-ASCII symbol (So, or Sm: the arrows of U+1F642 U+200D
    U+2194, head shaking)."""
    return bool(ch) and not ch.isascii() and unicodedata.category(ch) in ("So", "Sm")


def _emoji_before(text: str, i: int) -> bool:
    """The character before `i`, past its variation selector and skin tone, is an emoji."""
    i -= 1
    while i >= 0 and (_selector(text[i]) or ord(text[i]) in EMOJI_MODIFIERS):
        i -= 1
    return i >= 0 and _emoji(text[i])


def _mongolian(ch: str) -> bool:
    return bool(ch) and 0x1820 <= ord(ch) <= 0x18AF


def _mongolian_before(text: str, i: int) -> bool:
    """The character before `i`, past its free variation selector, is a Mongolian letter."""
    i -= 1
    if i >= 0 and _selector(text[i]) and 0x180B <= ord(text[i]) <= 0x180F:
        i -= 1
    return i >= 0 and _mongolian(text[i])


def _ideograph(ch: str) -> bool:
    """A CJK unified ideograph: the bases of the Ideographic Variation Database's sequences (U+E0100..U+E01EF)."""
    return unicodedata.name(ch, "").startswith("CJK UNIFIED IDEOGRAPH-")


def _variation_sequence(before: str, ch: str, after: str) -> bool:
    """`before` + the selector `ch` is a variation sequence Unicode defines (StandardizedVariants.txt, UTS #51's
    emoji-variation-sequences.txt: variation_data.py; an ideographic one; Mongolian's free variation selectors after
    a Mongolian letter), or U+FE0F in a keycap. An ASCII base takes none but the keycap's."""
    o = ord(ch)
    if not before:
        return False
    if before.isascii():
        return ch == "\ufe0f" and before in "0123456789#*" and after == KEYCAP
    if 0xFE00 <= o <= 0xFE0F:
        return ord(before) in VARIATION_BASES.get(o, ())
    if 0xE0100 <= o <= 0xE01EF:
        return _ideograph(before)
    return _mongolian(before)  # U+180B..U+180D, U+180F: the Mongolian script's free variation selectors


def _arabic_letter(text: str, i: int, step: int) -> bool:
    """The letter next to `i` (step -1: before, +1: after), past combining marks, is of a joining (Arabic) script."""
    i += step
    while 0 <= i < len(text) and unicodedata.category(text[i]) == "Mn":
        i += step
    return 0 <= i < len(text) and unicodedata.bidirectional(text[i]) == "AL" and text[i].isalpha()


def _in_tag_sequence(text: str, i: int) -> bool:
    """`text[i]` is in an emoji tag sequence: an emoji, one tag or more, CANCEL TAG."""
    start = i if text[i] != CANCEL_TAG else i - 1
    while start >= 0 and _tag(text[start]):
        start -= 1
    end = i
    while end < len(text) and _tag(text[end]):
        end += 1
    has_tags = start + 1 < (i if text[i] == CANCEL_TAG else end)
    return has_tags and start >= 0 and unicodedata.category(text[start]) == "So" and end < len(text) \
        and text[end] == CANCEL_TAG


def _shows(text: str, i: int) -> bool:
    """Whether `text[i]`, a format character or a selector, is part of a visible sequence (the module's rule)."""
    ch = text[i]
    before = text[i - 1] if i else ""
    after = text[i + 1] if i + 1 < len(text) else ""
    if ch in VISIBLE_FORMAT:
        return True
    if ch in (ZWJ, ZWNJ) and VIRAMA in (unicodedata.combining(before or " "), unicodedata.combining(after or " ")):
        return True  # after a virama (a conjunct's half form), or before one (Bengali's ra + U+200D + virama + ya)
    if ch == ZWJ:
        return _emoji_before(text, i) and _emoji(after)
    if ch == "\u180e":  # MONGOLIAN VOWEL SEPARATOR: shapes the letter after it
        return _mongolian(before) and _mongolian(after)
    if ch == ZWNJ:
        return _arabic_letter(text, i, -1) and _arabic_letter(text, i, 1)
    if _tag(ch) or ch == CANCEL_TAG:
        return _in_tag_sequence(text, i)
    if _selector(ch):
        return _variation_sequence(before, ch, after)
    return False


def _mongolian_suffix(text: str, i: int) -> bool:
    """`text[i]` is U+202F between two Mongolian letters: the narrow no-break space before a Mongolian suffix, which
    selects the suffix's letter forms (so it prints unlike a plain space there)."""
    return text[i] == NNBSP and _mongolian_before(text, i) and i + 1 < len(text) and _mongolian(text[i + 1])


def unseen(text: str) -> str | None:
    """Why `text` holds a character that prints as nothing where it stands (the module's rule), or None."""
    if text.isascii() or (text.isprintable() and _PRINTABLE_SUSPECTS.search(text) is None):
        return None  # (the common ids, at C speed: ASCII, or no format character, separator, filler or selector)
    return scan(text)


def scan(text: str) -> str | None:
    """`unseen` without its fast path: every character looked at."""
    for i, ch in enumerate(text):
        cat = unicodedata.category(ch)
        if cat in SEPARATORS:
            what = "a line or paragraph separator, which splits the line the id is printed in"
        elif ch in BIDI_CONTROLS:
            what = "a bidi control, which reorders the line the id is printed in"
        elif (cat == "Zs" and ch not in VISIBLE_SPACES and not _mongolian_suffix(text, i)) or ch == BRAILLE_BLANK:
            what = "a space that prints as a plain space or narrower, so ids that differ by it print alike"
        elif ch in BLANKS or _unassigned_ignorable(ch) or ((cat == "Cf" or _selector(ch)) and not _shows(text, i)):
            what = ("an invisible character, so ids that differ by it print alike (joiners, tags and variation "
                    "selectors are taken only inside a visible sequence: an emoji ZWJ, flag or keycap sequence, a "
                    "variation sequence Unicode defines, a joiner after a virama or between Arabic-script letters)")
        else:
            continue
        name = unicodedata.name(ch, "")
        return f"session id contains U+{ord(ch):04X}{f' {name}' if name else ''} at {i}: {what}"
    return None

import math
import re

import pytest

from kvsched.core.sessions import (
    MAX_SESSION_ID_LEN,
    InvalidSessionInput,
    validate_end_flag,
    validate_role,
    validate_session_id,
    validate_ttl,
)


@pytest.mark.parametrize("good", ["a", "wf-12/agent:3", "x" * MAX_SESSION_ID_LEN, "sessão-ü"])
def test_valid_session_ids_pass_through(good):
    assert validate_session_id(good) == good


@pytest.mark.parametrize(
    "bad, message",
    [
        ("", "empty"),
        ("x" * (MAX_SESSION_ID_LEN + 1), "limit is 128"),
        ("a\nb", "control character (U+000A)"),
        ("a\x00", "U+0000"),
        ("a\x7f", "U+007F"),
        (" padded", "white space"),
        (17, "must be a string"),
        (None, "must be a string"),
    ],
)
def test_malformed_session_ids_say_what_is_wrong(bad, message):
    with pytest.raises(InvalidSessionInput, match=re.escape(message)):
        validate_session_id(bad)


def test_ttl_parsing():
    assert validate_ttl("2.5") == 2.5
    assert validate_ttl(0) == 0.0
    for bad in ("soon", -1, math.inf, float("nan"), True, None):
        with pytest.raises(InvalidSessionInput):
            validate_ttl(bad)


def test_end_flag_and_role():
    assert validate_end_flag("1") is True and validate_end_flag(0) is False and validate_end_flag("false") is False
    with pytest.raises(InvalidSessionInput) as exc:
        validate_end_flag("maybe")
    for word in re.findall(r"[a-z0-9]+", str(exc.value).split("must be ")[1].split(", got")[0]):
        if word not in ("or",):  # every value the message lists is taken (found by review: it left yes/no out)
            assert validate_end_flag(word) in (True, False)
    assert "yes" in str(exc.value) and validate_end_flag("yes") is True and validate_end_flag("no") is False
    assert validate_role("Orchestrator") == "orchestrator"
    with pytest.raises(InvalidSessionInput):
        validate_role("drop table;")

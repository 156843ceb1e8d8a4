"""The raw-request checks both adapters (the engine's middleware, the Ray ingress) answer with a 400."""

from kvsched.core.client_fields import raw_path_is_utf8, repeated_header

NAMES = ("x-session-id", "x-agent-role")


def test_a_header_repeated_with_another_value_is_named_whatever_its_case() -> None:
    assert repeated_header([(b"X-Session-Id", b"a"), (b"x-other", b"1"), (b"x-session-id", b"b")], NAMES) == \
        "x-session-id"


def test_the_same_value_repeated_and_headers_not_named_pass() -> None:
    assert repeated_header([(b"X-Session-Id", b"a"), (b"x-session-id", b"a"), (b"x-other", b"1"),
                            (b"X-Other", b"2")], NAMES) is None


def test_a_raw_path_is_utf8_only_when_its_escapes_decode_as_utf8() -> None:
    assert raw_path_is_utf8(b"/kvsched/sessions/caf%C3%A9")
    assert not raw_path_is_utf8(b"/kvsched/sessions/%ff")
    assert raw_path_is_utf8(None)  # a server that gives no raw path: the decoded one stands

"""Tenant scope of the session routes and the list's paging."""

from __future__ import annotations

import base64

import pytest

from kvsched.core.sessions import MAX_SESSION_ID_LEN, SessionId, SessionKey, validate_session_id
from kvsched.core.tenancy import (
    DEFAULT_PAGE,
    MAX_CURSOR_CHARS,
    MAX_PAGE,
    Caller,
    InvalidQuery,
    PageQuery,
    admin_keys_from_env,
    decode_cursor,
    encode_cursor,
    page,
    parse_page_query,
    salt_digest,
    sort_key,
    tenant_of,
)


def key(sid, salt=None, tenant=None, branch=0):
    return SessionKey(SessionId(sid), salt, tenant, branch)


def test_a_caller_owns_only_its_key_and_salt_and_an_admin_owns_all():
    mine, salted, other = key("s", tenant="t1"), key("s", "salt", "t1"), key("s", tenant="t2")
    me = Caller(tenant="t1")
    assert me.owns(mine) and not me.owns(salted) and not me.owns(other)
    assert Caller(tenant="t1", cache_salt="salt", salt_given=True).owns(salted)
    admin = Caller(admin=True)
    assert all(admin.owns(k) for k in (mine, salted, other))
    assert [admin.owns(k) for k in (mine, salted)] == [True, True]
    narrowed = Caller(admin=True, cache_salt="salt", salt_given=True)
    assert narrowed.owns(salted) and not narrowed.owns(mine)
    assert Caller.from_args(narrowed.as_args()) == narrowed


def test_tenant_fingerprints_are_stable_distinct_and_not_the_key():
    assert tenant_of("k1") == tenant_of("k1") != tenant_of("k2")
    assert "k1" not in tenant_of("k1") and len(tenant_of("k1")) == 24


def test_pages_cover_every_row_once_in_a_stable_order():
    keys = [key(f"s{i % 7}", salt=None if i % 2 else f"salt{i}", branch=i % 3) for i in range(50)]
    rows = [(k, i) for i, k in enumerate(keys)]
    seen, cursor = [], None
    while True:
        got, nxt = page(rows, PageQuery(limit=7, cursor=decode_cursor(cursor) if cursor else None))
        seen += got
        if nxt is None:
            break
        cursor = nxt
    assert sorted(seen) == list(range(50))
    assert [keys[i] for i in seen] == sorted(keys, key=sort_key)
    assert "salt" not in (encode_cursor(sort_key(keys[0])))  # a salt only appears as a digest


def test_query_parsing():
    assert parse_page_query({}) == PageQuery(DEFAULT_PAGE, None, False)
    assert parse_page_query({"limit": "5", "summary": "1"}) == PageQuery(5, None, True)
    assert parse_page_query({"pinned_ids": "1"}).pinned_ids
    for params, param in (({"limit": "0"}, "limit"), ({"limit": str(MAX_PAGE + 1)}, "limit"),
                          ({"limit": "-1"}, "limit"), ({"limit": "\u00b2"}, "limit"),  # "²".isdigit(), int fails
                          ({"limit": "9" * 4400}, "limit"),  # past int()'s 4,300 digits: a ValueError (review)
                          ({"cursor": "%%%"}, "cursor"), ({"page": "2"}, "page"),
                          ({"cursor": base64.urlsafe_b64encode(b"[" * 5000).decode()}, "cursor"),  # RecursionError
                          ({"cursor": "A" * 100_000}, "cursor"),
                          ({"summary": "maybe"}, "summary"), ({"pinned_ids": "2"}, "pinned_ids"), ({"cursor": encode_cursor(("a", 0, 0, "", ""))[:-3]},
                                                              "cursor")):
        with pytest.raises(InvalidQuery) as info:
            parse_page_query(params)
        assert info.value.param == param


def test_the_longest_cursor_the_engine_gives_is_one_it_accepts():
    """Found by review: MAX_CURSOR_CHARS was a fixed 8,192 under a comment counting 1,024-character ids (the limit is
    MAX_SESSION_ID_LEN), not the longest cursor `encode_cursor` gives; now it is that cursor's length: the longest
    valid id of 4-byte characters (12 characters each as JSON escapes them), a 64-bit branch, tenant and salt
    digests. A longer cursor is no cursor the engine gave (400)."""
    sid = validate_session_id("\U0001F600" * MAX_SESSION_ID_LEN)
    longest = encode_cursor((sid, 1, 2**63 - 1, tenant_of("k"), salt_digest("s")))
    assert decode_cursor(longest)[0] == sid
    assert MAX_CURSOR_CHARS - 2 <= len(longest) <= MAX_CURSOR_CHARS
    with pytest.raises(InvalidQuery):
        decode_cursor("A" * (MAX_CURSOR_CHARS + 1))


def test_admin_keys_setting():
    assert admin_keys_from_env({}) == ()
    assert admin_keys_from_env({"KVSCHED_ADMIN_KEYS": " a, b ,"}) == ("a", "b")
    with pytest.raises(ValueError, match="KVSCHED_ADMIN_KEYS"):
        admin_keys_from_env({"KVSCHED_ADMIN_KEYS": " , "})

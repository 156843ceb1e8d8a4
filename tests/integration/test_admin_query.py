"""A query parameter of the session routes given twice is a 400 naming it, as a repeated header is (found by review:
`GET /kvsched/sessions?limit=1&limit=2` used the last one unsaid). Against the shared hardened server (conftest.py)."""

from __future__ import annotations

import pytest

from tests.integration.secure import ADMIN, KEYS, request


@pytest.mark.parametrize("query", ["limit=1&limit=2", "limit=5&limit=5", "summary=1&summary=0", "cursor=&cursor=",
                                   "limit=1&summary=1&limit=1"])
def test_a_query_parameter_given_twice_is_a_400_naming_it(secure_server, query):
    name = query.split("=")[0]
    for key in (KEYS[0], ADMIN):
        r = request(secure_server, "GET", f"/kvsched/sessions?{query}", key)
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert error["param"] == name and f"'{name}' is given more than once" in error["message"]


def test_each_parameter_once_is_still_served(secure_server):
    r = request(secure_server, "GET", "/kvsched/sessions?limit=1&summary=0", KEYS[0])
    assert r.status_code == 200, r.text
    assert "sessions" in r.json()

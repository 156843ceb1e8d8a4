"""The Ray ingress's session listing refuses a query parameter given twice, as each engine does (found by review:
`?cursor=A&cursor=B` went on with the last cursor unsaid, and the first was dropped; a repeated `limit` reached the
engines, whose 400 came back only after every replica was called)."""

from __future__ import annotations

import pytest

from kvsched.adapters.ray.listing import ListingError, parse_listing


@pytest.mark.parametrize("query, name", [("cursor=a&cursor=b", "cursor"), ("limit=1&limit=2", "limit"),
                                         ("limit=5&summary=1&limit=5", "limit"), ("summary=&summary=1", "summary")])
def test_a_parameter_given_twice_is_refused_naming_it(query, name):
    with pytest.raises(ListingError, match="more than once") as caught:
        parse_listing(query)
    assert caught.value.param == name


def test_parameters_given_once_pass_on():
    listing = parse_listing("limit=5&summary=0")
    assert listing.query == "limit=5&summary=0" and listing.paged

"""Requests that name no session are routed by their conversation's opening (kvsched.adapters.ray.opening), so an
unnamed chat conversation's turns reach one replica, where the engine's session inference continues its KV."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from kvsched.adapters.ray.config import parse_config
from kvsched.adapters.ray.opening import HOT_OPENING, OpeningRoutes, opening_id
from kvsched.core.sessions import InvalidSessionInput, validate_session_id
from tests.ray.test_ingress_handles import KEYED, FakeHandle, make_ingress, request

SYSTEM = {"role": "system", "content": "You are a helpful agent."}


def turns(first: str) -> list[list[dict[str, Any]]]:
    """Three turns of one conversation, each repeating the earlier ones as chat clients do."""
    one = [SYSTEM, {"role": "user", "content": first}]
    two = one + [{"role": "assistant", "content": "Sure."}, {"role": "user", "content": "And then?"}]
    three = two + [{"role": "assistant", "content": "Done."},
                   {"role": "user", "content": [{"type": "text", "text": "Thanks"}]}]
    return [one, two, three]


def test_every_turn_of_a_conversation_has_its_openings_id_and_another_opening_another() -> None:
    ids = {opening_id({"messages": m}) for m in turns("Plan a trip to Lisbon.")}
    assert len(ids) == 1 and None not in ids
    assert opening_id({"messages": turns("Plan a trip to Porto.")[0]}) not in ids
    other_system = [{"role": "system", "content": "Another system prompt."}, turns("Plan a trip to Lisbon.")[0][1]]
    assert opening_id({"messages": other_system}) not in ids


@pytest.mark.parametrize("payload", [{"prompt": "hello"}, {"messages": [SYSTEM]}, {"messages": "hi"},
                                     {"messages": [SYSTEM, "not a message", {"role": "user", "content": "x"}]}, {}])
def test_no_opening_without_a_user_message_in_chat_messages(payload: dict) -> None:
    assert opening_id(payload) is None


def test_no_client_session_id_can_name_an_openings_key() -> None:
    key = opening_id({"messages": turns("hi")[0]})
    assert key is not None
    with pytest.raises(InvalidSessionInput):
        validate_session_id(key)


def send(ing: Any, messages: list[dict], headers: dict[str, str] | None = None, **fields: Any) -> Any:
    body = json.dumps({"model": "w", "messages": messages, **fields}).encode()
    return asyncio.run(ing.generate(request(headers or {}, body), "/v1/chat/completions"))


def routed(handle: FakeHandle) -> list[tuple[Any, dict]]:
    """(the router's session key, the headers the engine got) of each routed generation call."""
    return [(c[4].get("session_id"), c[2][2]) for c in handle.calls if c[0] == "remote" and c[1] == "complete"]


def test_an_unnamed_conversations_turns_are_routed_as_one_session_the_engine_is_not_told() -> None:
    handle = FakeHandle({"r0": {}}, "r0")
    ing = make_ingress({"w": handle})
    for m in turns("Plan a trip to Lisbon.") + turns("Plan a trip to Porto.")[:1]:
        assert send(ing, m).status_code == 200
    keys = [k for k, _ in routed(handle)]
    assert keys[0] is not None and keys[:3] == [keys[0]] * 3 and keys[3] not in (None, keys[0])
    assert all("x-session-id" not in sent for _, sent in routed(handle))  # the engine infers the session itself


def test_two_tenants_with_one_opening_are_two_routing_keys() -> None:
    handle = FakeHandle({"r0": {}}, "r0")
    ing = make_ingress({"w": handle}, KEYED)
    for key in ("k1", "k2"):
        assert send(ing, turns("hi")[0], {"authorization": f"Bearer {key}"}).status_code == 200
    (a, _), (b, _) = routed(handle)
    assert a is not None and b is not None and a != b


def test_a_named_session_is_routed_by_its_name_and_least_loaded_keeps_the_old_routing() -> None:
    handle = FakeHandle({"r0": {}}, "r0")
    assert send(make_ingress({"w": handle}), turns("hi")[0], {"x-session-id": "conv-1"}).status_code == 200
    assert routed(handle)[0][0] == "conv-1"
    plain = FakeHandle({"r0": {}}, "r0")
    ing = make_ingress({"w": plain})
    ing.openings.enabled = False  # router: {unnamed: least_loaded}
    assert send(ing, turns("hi")[0]).status_code == 200 and routed(plain)[0][0] is None


def test_an_opening_is_no_session_for_the_long_context_pool() -> None:
    """Found by review: the opening's key was remembered like a session's, so once one conversation with a common
    opening ("Hi") grew past long_context_tokens, every new short conversation with it went to the long pool."""
    from kvsched.adapters.ray.ingress import OpenAIIngress

    w, big = FakeHandle({"r0": {}}, "r0"), FakeHandle({"L0": {}}, "L0")
    inner = OpenAIIngress.__mro__[1]
    ing = inner.__new__(inner)
    cfg = {"pools": [{"name": "w", "model": "/m"},
                     {"name": "long", "model": "/m", "models": ["w"], "long_context": True}],
           "long_context_tokens": 1000}
    inner.__init__(ing, parse_config(cfg).to_dict(), {"w": w, "long": big})
    w.replicas["r0"]["body"] = big.replicas["L0"]["body"] = json.dumps({"usage": {"total_tokens": 5000}}).encode()
    first = turns("Hi")[0]
    assert send(ing, first).headers["x-kvsched-pool"] == "w"
    grown = first + [{"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "x " * 4000}]
    assert send(ing, grown).headers["x-kvsched-pool"] == "long"  # by its own size
    assert send(ing, first).headers["x-kvsched-pool"] == "w"  # another conversation's first turn


def second_turn(first: str, reply: str, ask: str) -> dict[str, Any]:
    return {"messages": [*turns(first)[0], {"role": "assistant", "content": reply}, {"role": "user", "content": ask}]}


def test_a_hot_opening_goes_least_loaded_and_its_count_is_released() -> None:
    """Found by review: a burst of conversations with one opening piled onto one replica up to the load floor. Counted
    by conversation (the history before its last user message)."""
    routes = OpeningRoutes(True)
    a, b, c = (second_turn("Hi", reply, "go on") for reply in ("A.", "B.", "C."))
    held = [routes.sent(routes.key(p, lambda o: o)) for p in (a, b)]
    for h in held:
        h.__enter__()
    assert HOT_OPENING == 2 and routes.key(c, lambda o: o) is None  # a third conversation with it: least loaded
    assert routes.key(a, lambda o: o) is not None  # one of those in flight: still its replica
    held[0].__exit__(None, None, None)
    assert routes.key(c, lambda o: o) is not None
    with pytest.raises(RuntimeError), routes.sent(routes.key(c, lambda o: o)):
        raise RuntimeError("the engine call failed")
    held[1].__exit__(None, None, None)
    assert routes.in_flight == {}


def test_one_conversations_parallel_requests_stay_on_its_openings_replica() -> None:
    """Found by review: the guard counted requests, so an agent's fan-out over one unnamed history sent its third and
    later calls least-loaded, away from the replica holding the history's KV."""
    routes = OpeningRoutes(True)
    history = [*turns("Research X")[0], {"role": "assistant", "content": "notes " * 50}]
    calls = [{"messages": [*history, {"role": "user", "content": f"sub-task {i}"}]} for i in range(6)]
    opened = [routes.key(p, lambda o: o) for p in calls]
    for o in opened:
        routes.sent(o).__enter__()
    assert all(o is not None for o in opened) and len({o.key for o in opened if o}) == 1
    assert routes.key(calls[0], lambda o: o) is not None  # a seventh still joins them


@pytest.mark.parametrize("value", ["bogus", True, 1, None])
def test_a_bad_unnamed_routing_setting_is_a_config_error_naming_it(value: Any) -> None:
    from kvsched.adapters.ray.config import ConfigError

    with pytest.raises(ConfigError, match=r"router\.unnamed"):
        parse_config({"router": {"unnamed": value}, "pools": [{"name": "w", "model": "/m"}]})
    assert parse_config({"router": {"unnamed": "least_loaded"}, "pools": [{"name": "w", "model": "/m"}]})


def test_the_hot_opening_count_is_the_deployments_as_kvsched_runs_one_ingress_replica() -> None:
    """The guard counts the conversations in flight through its ingress replica. kvsched deploys one, so that is the
    whole deployment: of six conversations of one opening in flight, HOT_OPENING are keyed, the rest least-loaded.
    Ingress replicas added outside kvsched each count their own: with two, 2 x HOT_OPENING (the bound opening.py
    documents)."""
    from kvsched.adapters.ray.app import build_app

    cfg = parse_config({"pools": [{"name": "tiny", "model": "kvsched-tiny:test"}]})
    assert build_app(cfg)._bound_deployment.num_replicas == 1

    def keyed(ingresses: list[OpeningRoutes]) -> int:
        """Six conversations of one opening sent in turn over the ingress replicas, none answered yet."""
        n, held = 0, []
        for i in range(6):
            routes = ingresses[i % len(ingresses)]
            opening = routes.key(second_turn("Hi", f"Reply {i}.", "go on"), lambda o: o)
            held.append(routes.sent(opening))  # kept: a context manager collected unexited releases its count
            held[-1].__enter__()
            n += opening is not None
        return n

    assert keyed([OpeningRoutes(True)]) == HOT_OPENING
    assert keyed([OpeningRoutes(True), OpeningRoutes(True)]) == 2 * HOT_OPENING

"""kvsched's own answers (the session routes, its 400s) under vLLM's CORS settings (`--allowed-origins` etc.). vLLM
adds kvsched's middleware outside its CORSMiddleware (`init_entrypoints_middleware`: `--middleware` classes are added
last), so what kvsched answers itself never passed through it. Found by review: with `--allowed-origins` naming a
browser UI's origin, vLLM's own answers carried `access-control-allow-origin` and kvsched's did not, so the browser
could read neither a session page nor kvsched's 400 naming a bad field (a network error instead)."""

from __future__ import annotations

from argparse import Namespace

import pytest

pytest.importorskip("vllm")
from fastapi import FastAPI  # noqa: E402
from starlette.testclient import TestClient  # noqa: E402

from kvsched.adapters.vllm.compat.cli import MIDDLEWARE_PATH  # noqa: E402
from tests.adapters.vllm.test_session_admin_routes import Engine  # noqa: E402

UI = "https://ui.example"


def served(origins: list[str], credentials: bool = False, request_ids: bool = False) -> TestClient:
    """vLLM's API server middleware stack (its own `init_entrypoints_middleware`) over a stand-in engine core."""
    from vllm.entrypoints.serve.middleware.register import init_entrypoints_middleware

    app = FastAPI()
    app.state.args = Namespace(scheduler_cls="kvsched.adapters.vllm.scheduler.X", api_key=["k"],
                               allowed_origins=origins, allow_credentials=credentials, allowed_methods=["*"],
                               allowed_headers=["*"], enable_request_id_headers=request_ids,
                               middleware=[MIDDLEWARE_PATH])
    app.state.engine_client = Engine().state.engine_client

    @app.get("/v1/models")
    def models() -> dict[str, list[str]]:
        return {"data": []}

    @app.post("/v1/embeddings")
    def embeddings() -> dict[str, list[str]]:
        return {"data": []}

    init_entrypoints_middleware(app.state.args, app, ())
    return TestClient(app)


def allowed(response) -> str | None:
    return response.headers.get("access-control-allow-origin")


@pytest.mark.parametrize("origins, credentials, seen", [([UI], False, UI), (["*"], False, "*"), (["*"], True, UI),
                                                        (["https://other.example"], False, None), ([], False, None)])
def test_kvscheds_own_answers_carry_vllms_cors_headers(origins: list[str], credentials: bool,
                                                       seen: str | None) -> None:
    client = served(origins, credentials)
    headers = {"Origin": UI, "Authorization": "Bearer k"}
    assert allowed(client.get("/v1/models", headers=headers)) == seen  # vLLM's own route: its CORS middleware
    page = client.get("/kvsched/sessions", headers=headers)
    assert page.status_code == 200 and allowed(page) == seen
    refused = client.get("/kvsched/sessions?limit=0", headers=headers)
    assert refused.status_code == 400 and allowed(refused) == seen
    bad = client.post("/v1/chat/completions", headers={**headers, "X-Session-Id": "s" * 200},
                      json={"model": "m", "messages": []})
    assert bad.status_code == 400 and "200 characters" in bad.text and allowed(bad) == seen
    forged = client.post("/v1/embeddings", headers=headers, json={"input": "x", "vllm_xargs": {"kvsched_tenant": "t"}})
    assert forged.status_code == 400 and "kvsched_tenant" in forged.text and allowed(forged) == seen
    assert allowed(client.post("/v1/embeddings", headers=headers, json={"input": "x"})) == seen  # vLLM's, passed on
    stranger = client.get("/kvsched/sessions", headers={"Origin": UI, "Authorization": "Bearer wrong"})
    assert stranger.status_code == 401 and allowed(stranger) == seen
    assert allowed(client.get("/kvsched/sessions", headers={"Authorization": "Bearer k"})) is None  # no Origin

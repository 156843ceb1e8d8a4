"""What kvsched asks of Ray Serve's HTTP proxy, which reads every request before kvsched's ingress does.

Ray 2.60's proxy decodes the header named by `RAY_SERVE_SESSION_ID_HEADER_KEY` (default `x-session-id`, compared
case-insensitively with `-` and `_` alike) as UTF-8 for its own session routing (`serve/_private/proxy.py`,
`_matches_session_id_header` in `http_util.py`), so an `X-Session-Id` that is no UTF-8 got Ray's 500 where kvsched's
engine answers 400. kvsched never needs that value at the proxy: its ingress reads `X-Session-Id` itself and gives its
router the session with `handle.options(session_id=...)`. Ray reads the variable once, at the import of
`serve/_private/constants.py` in each process, so it must be in the proxy's environment when the proxy starts: the
Serve controller's `runtime_env.env_vars` (`controller_options`), which the proxy actors it creates inherit (checked
on a real cluster: tests/ray/test_hostile_ingress.py); they apply only when Serve starts, not to a Serve already
running.

The proxy also decodes `X-Request-Id`, `serve_multiplexed_model_id` and two timeout headers of its own (no variable
renames them): the same options name kvsched's proxy middleware (`proxy_headers.py`) as Ray's HTTP proxy callback,
which answers kvsched's 400 to those before Ray's proxy reads them, and refuses a body over the config's
`max_body_bytes` before the proxy queues it for the ingress (`proxy_body.py`; the limit in the same variables). A
callback already set in the environment (`RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH`, middlewares of your own) is
kept, with a warning: it can return `proxy_headers.middlewares()` among its own."""

from __future__ import annotations

import logging
import os
from typing import Any

from kvsched.adapters.ray.proxy_body import ENV_PROXY_MAX_BODY
from kvsched.adapters.ray.proxy_headers import CALLBACK
from kvsched.adapters.ray.requests import MAX_BODY_BYTES

logger = logging.getLogger(__name__)

RAY_SESSION_HEADER_ENV = "RAY_SERVE_SESSION_ID_HEADER_KEY"
# A name no HTTP header can have (a colon ends a header's name; spaces and parentheses are not in one either): Ray's
# proxy then matches no header, decodes none, and passes X-Session-Id to the ingress as the client's bytes.
RAY_SESSION_HEADER_OFF = "(none: kvsched reads X-Session-Id)"
RAY_PROXY_CALLBACK_ENV = "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"


def controller_options(max_body_bytes: int = MAX_BODY_BYTES) -> dict[str, Any]:
    """`serve.start(controller_options=...)` for the Serve kvsched starts: Ray's proxy reads no session header, and
    kvsched's middlewares answer 400 to a header of Ray's own that is no UTF-8 and 413 to a body over `max_body_bytes`
    (the config's: `proxy_body.py`) before the proxy queues it (unless a callback of yours is set)."""
    env = {RAY_SESSION_HEADER_ENV: RAY_SESSION_HEADER_OFF, ENV_PROXY_MAX_BODY: str(max_body_bytes)}
    theirs = os.environ.get(RAY_PROXY_CALLBACK_ENV)
    if theirs and theirs != CALLBACK:
        logger.warning("%s=%s is kept: Ray's proxy answers 500 to an X-Request-Id or serve_multiplexed_model_id that "
                       "is no UTF-8, and queues a body over the limit for the ingress, unless it returns %s() among "
                       "its middlewares", RAY_PROXY_CALLBACK_ENV, theirs, CALLBACK.replace(":", "."))
    else:
        env[RAY_PROXY_CALLBACK_ENV] = CALLBACK
    return {"runtime_env": {"env_vars": env}}

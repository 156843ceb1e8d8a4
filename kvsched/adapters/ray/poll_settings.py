"""How a replica's stats reach Ray: the deadline of a replica's poll of its engine and how long Ray's routing-stats
call waits for a poll in flight (`router: {poll_deadline_s, routing_wait_s}`), each bounded by the Ray Serve call it
serves, with a margin for the call's own way through Ray. Standard library only: the config's parsing and the poll
itself read them."""

from __future__ import annotations

import math
import os

POLL_DEADLINE_S = 5.0  # a poll of /metrics and /kvsched/sessions, each read whole (connect to last byte) within it
ROUTING_WAIT_S = 2.0  # Ray's routing-stats call waits this long for a poll in flight, then answers with the last stats
# Ray Serve's timeout of a replica's record_autoscaling_stats: ray/serve/_private/constants.py (2.60) reads this
# variable once, at its import in each replica process (get_env_float: float() of it, no check of the value), and
# replica.py wraps the call in asyncio.wait_for with it. The call waits for the poll it starts, so a poll that may
# outlast it would be cancelled with it, and a replica whose /metrics hangs would report nothing, not its metrics
# unread.
RAY_AUTOSCALING_STATS_TIMEOUT_ENV = "RAY_SERVE_RECORD_AUTOSCALING_STATS_TIMEOUT_S"
RAY_AUTOSCALING_STATS_TIMEOUT_S = 10.0  # its default
# What each setting leaves of Ray's timeout for the rest of the call: the call's hop from the replica's loop to the
# user-code loop, where the wait's timer fires only once that loop (which also relays every request's stream) runs;
# the parse after the poll's last byte; for the routing call, the actor call there and back, timed by the controller
# from before it sends it to the control-loop pass (every 0.1 s) that finds the answer. None of it grows with the
# timeout, so the margin is fixed, not a fraction (not measured: a loaded loop's lag, not Ray's RPC, is the part).
# Without it a wait of Ray's timeout less a hair would pass the check and its answer come too late: Ray drops a
# routing answer it no longer waits for (and retries; the router keeps the replica's older stats) and cancels an
# autoscaling call at its timeout.
RAY_CALL_MARGIN_S = 0.5


def autoscaling_stats_timeout_s() -> float | None:
    """Ray's timeout of record_autoscaling_stats as the replicas will read it: from the environment, now, as Ray does
    (the variable or 10 s). The replicas inherit the environment of the process that starts Ray (`kvsched ray-serve`
    without --address), so this is theirs; with --address it is the cluster's nodes'. None: the variable is no number,
    and Ray Serve would fail at the import of its constants."""
    raw = os.environ.get(RAY_AUTOSCALING_STATS_TIMEOUT_ENV)
    if raw is None:
        return RAY_AUTOSCALING_STATS_TIMEOUT_S
    try:
        return float(raw)
    except ValueError:
        return None


def routing_stats_timeout_s(stats_period_s: float) -> float:
    """Ray's timeout of a replica's record_routing_stats, as kvsched sets it (`RequestRouterConfig`, app.py): 5 s, or
    two periods when the period is longer. Ray's default would be 30 s (DEFAULT_REQUEST_ROUTING_STATS_TIMEOUT_S); no
    environment variable changes it: it is the deployment's setting, which Ray's controller times the call with."""
    return max(5.0, 2 * stats_period_s)


def poll_problems(poll_deadline_s: float, routing_wait_s: float, stats_period_s: float) -> list[str]:
    """What is wrong with these settings, one sentence each (none: they fit). Each must leave `RAY_CALL_MARGIN_S` of
    the Ray timeout it serves. A poll's deadline needs no relation to the period: one poll runs at a time, and calls
    made while it reads share it (the routing call for at most `routing_wait_s`)."""
    out = [f"{name} must be a finite number of seconds > 0, got {value!r}"
           for name, value in (("poll_deadline_s", poll_deadline_s), ("routing_wait_s", routing_wait_s))
           if isinstance(value, bool) or not isinstance(value, int | float) or not (math.isfinite(value) and value > 0)]
    if out:
        return out
    ray_timeout = autoscaling_stats_timeout_s()
    if ray_timeout is None:
        out.append(f"{RAY_AUTOSCALING_STATS_TIMEOUT_ENV}={os.environ.get(RAY_AUTOSCALING_STATS_TIMEOUT_ENV)!r} is no "
                   f"number of seconds (Ray Serve reads it as its timeout of record_autoscaling_stats)")
    elif not poll_deadline_s <= ray_timeout - RAY_CALL_MARGIN_S:
        out.append(f"poll_deadline_s must be <= {ray_timeout - RAY_CALL_MARGIN_S:g} s (Ray Serve's timeout of "
                   f"record_autoscaling_stats, which waits for the poll, {ray_timeout:g} s "
                   f"({RAY_AUTOSCALING_STATS_TIMEOUT_ENV} or its default), less {RAY_CALL_MARGIN_S:g} s for the call's "
                   f"way through Ray), got {poll_deadline_s!r}")
    timeout = routing_stats_timeout_s(stats_period_s)
    if routing_wait_s > timeout - RAY_CALL_MARGIN_S:
        out.append(f"routing_wait_s must be <= {timeout - RAY_CALL_MARGIN_S:g} s (Ray's timeout of the routing-stats "
                   f"call: 5 s or 2 x stats_period_s, the longer, less {RAY_CALL_MARGIN_S:g} s for the call's way "
                   f"through Ray), got {routing_wait_s!r}")
    return out

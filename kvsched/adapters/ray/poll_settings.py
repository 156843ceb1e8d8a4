"""How a replica's stats reach Ray: the deadline of a replica's poll of its engine and how long Ray's routing-stats
call waits for a poll in flight (`router: {poll_deadline_s, routing_wait_s}`), each bounded by the Ray Serve call it
serves. Standard library only: the config's parsing and the poll itself read them."""

from __future__ import annotations

import math

POLL_DEADLINE_S = 5.0  # a poll of /metrics and /kvsched/sessions, each read whole (connect to last byte) within it
ROUTING_WAIT_S = 2.0  # Ray's routing-stats call waits this long for a poll in flight, then answers with the last stats
# Ray Serve's timeout of a replica's record_autoscaling_stats (2.60: RAY_SERVE_RECORD_AUTOSCALING_STATS_TIMEOUT_S, its
# default): the call waits for the poll it starts, so a poll that may outlast it would be cancelled with it, and a
# replica whose /metrics hangs would report nothing, not its metrics unread.
RAY_AUTOSCALING_STATS_TIMEOUT_S = 10.0


def routing_stats_timeout_s(stats_period_s: float) -> float:
    """Ray's timeout of a replica's record_routing_stats, as kvsched sets it (`RequestRouterConfig`, app.py): Ray's
    own default, 5 s, or two periods when the period is longer."""
    return max(5.0, 2 * stats_period_s)


def poll_problems(poll_deadline_s: float, routing_wait_s: float, stats_period_s: float) -> list[str]:
    """What is wrong with these settings, one sentence each (none: they fit). A poll's deadline needs no relation to
    the period: one poll runs at a time, and calls made while it reads share it (the routing call for at most
    `routing_wait_s`)."""
    out = [f"{name} must be a finite number of seconds > 0, got {value!r}"
           for name, value in (("poll_deadline_s", poll_deadline_s), ("routing_wait_s", routing_wait_s))
           if isinstance(value, bool) or not isinstance(value, int | float) or not (math.isfinite(value) and value > 0)]
    if out:
        return out
    if poll_deadline_s >= RAY_AUTOSCALING_STATS_TIMEOUT_S:
        out.append(f"poll_deadline_s must be < {RAY_AUTOSCALING_STATS_TIMEOUT_S:g} s (Ray Serve's timeout of "
                   f"record_autoscaling_stats, which waits for the poll), got {poll_deadline_s!r}")
    timeout = routing_stats_timeout_s(stats_period_s)
    if routing_wait_s >= timeout:
        out.append(f"routing_wait_s must be < {timeout:g} s (Ray's timeout of the routing-stats call: 5 s or "
                   f"2 x stats_period_s, the longer), got {routing_wait_s!r}")
    return out

"""Who owns a session on the engines, as the ingress sees it: the caller's API key (on pools whose `vllm serve` checks
keys) and the cache salt. kvsched's vLLM side keys a session by (id, tenant of the key, salt) and lets a caller end
only its own (`kvsched.core.tenancy`), so the ingress forwards `Authorization` and the salt headers to the engine and
keys its own tables and the router's by the same owner (`hints.routing_session`).

A turn names its salt in the body (`cache_salt`, as vLLM reads it); a session route in `X-KVSched-Cache-Salt` or
`X-KVSched-Cache-Salt-B64` (base64 of any salt), as kvsched's session routes read it. An admin key
(`KVSCHED_ADMIN_KEYS`) ends every tenant's session of an id on the engines; the routers then forget only the admin's
own key for it, and the others' routing idles out (`session_idle_s`): where a session lived is a placement hint,
never who may end it.

Pure functions over headers and the config.
"""

from __future__ import annotations

import base64
import binascii
import os
from collections.abc import Iterable, Mapping
from typing import Any

from kvsched.adapters.ray.hints import routing_session
from kvsched.core.tenancy import admin_keys_from_env, bearer_token, digest_matches, key_digest

AUTH_HEADERS = ("authorization", "x-kvsched-cache-salt", "x-kvsched-cache-salt-b64")
SALT_HEADER, SALT_B64_HEADER = AUTH_HEADERS[1], AUTH_HEADERS[2]


def checks_api_keys(vllm_args: Iterable[str], env: Mapping[str, str], environ: Mapping[str, str] | None = None) -> bool:
    """Whether a pool's `vllm serve` refuses requests without an API key: `--api-key` among its arguments, or
    VLLM_API_KEY in its environment (the pool's `env`, or the Ray worker's, which the child inherits)."""
    environ = os.environ if environ is None else environ
    if any(a == "--api-key" or a.startswith("--api-key=") for a in vllm_args):
        return True
    return bool(env.get("VLLM_API_KEY") or environ.get("VLLM_API_KEY"))


def caller_headers(headers: Mapping[str, str]) -> dict[str, str]:
    """The caller's key and salt headers (lower-cased names), as a session route on the engine reads them."""
    return {k: v for k, v in headers.items() if k in AUTH_HEADERS}


def header_salt(headers: Mapping[str, str]) -> str | None:
    """The salt a session route names (None: unsalted). An undecodable base64 salt stands for itself: the engine
    refuses it (400) and nothing is ended."""
    raw = headers.get(SALT_HEADER)
    if raw is not None:  # the server decoded the header's bytes as latin-1; the engine reads them as UTF-8
        try:
            return raw.encode("latin-1").decode("utf-8")
        except UnicodeError:
            return raw
    encoded = headers.get(SALT_B64_HEADER)
    if encoded is None:
        return None
    text = encoded.strip().replace("-", "+").replace("_", "/")
    try:
        return base64.b64decode(text + "=" * (-len(text) % 4), validate=True).decode("utf-8")
    except (binascii.Error, ValueError, UnicodeDecodeError):
        return "\0b64:" + encoded


def body_salt(payload: Mapping[str, Any]) -> str | None:
    salt = payload.get("cache_salt")
    return salt if isinstance(salt, str) else None


def session_key(session_id: str, headers: Mapping[str, str], salt: str | None, keyed: bool) -> str:
    """The key the ingress and the routers know a session by (the id alone for unsalted sessions on pools without
    API keys). `keyed`: some pool checks API keys (else the engines give every caller one tenant, and so does this).
    The tenant is the bearer token, read as the engines read it (the scheme in any case: `core.tenancy.bearer_token`,
    as vLLM's own check). Found by review: keyed by the raw header text, "bearer k1" and "Bearer k1", one tenant on
    the engines, were two owners here. A header naming no bearer token is refused by the engines (401)."""
    return routing_session(session_id, bearer_token(headers.get("authorization")) if keyed else None, salt)


def admin_keys(pool_envs: Iterable[Mapping[str, str]], environ: Mapping[str, str] | None = None) -> frozenset[str]:
    """The operator's admin keys (KVSCHED_ADMIN_KEYS) in any pool's engine environment or this process's (which the
    engines inherit); a setting that names no key gives none (the CLI refuses it at start-up)."""
    keys: set[str] = set()
    for env in (*pool_envs, os.environ if environ is None else environ):
        try:
            keys.update(admin_keys_from_env(env))
        except ValueError:
            pass
    return frozenset(keys)


def is_admin(headers: Mapping[str, str], keys: Iterable[str]) -> bool:
    """Whether `Authorization: Bearer <token>` names one of `keys`, compared as kvsched's engines compare them
    (`kvsched.core.tenancy`: SHA-256 digests in constant time, every key tried)."""
    token = bearer_token(headers.get("authorization"))
    return token is not None and digest_matches(key_digest(token), [key_digest(k) for k in keys])

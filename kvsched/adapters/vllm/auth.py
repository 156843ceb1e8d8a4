"""Who is calling: the same bearer-token check vLLM applies (`--api-key` / `VLLM_API_KEY`), done by kvsched's
middleware before anything else, plus kvsched's admin keys (`KVSCHED_ADMIN_KEYS`).

vLLM adds plugin middleware outside its own authentication middleware, so kvsched's runs first: it must not read,
validate, tokenize or summarize anything for a request vLLM is about to refuse. A request without a valid key is
passed on untouched (vLLM answers 401) or, on kvsched's own routes, answered 401 here.
"""

from __future__ import annotations

import logging
import os
import secrets
from dataclasses import dataclass
from typing import Any

from kvsched.adapters.vllm import compat
from kvsched.core.tenancy import admin_keys_from_env, bearer_token, digest_matches, key_digest, tenant_of

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Identity:
    """authenticated: vLLM would accept the request (or the server has no keys); tenant: the fingerprint of the key
    used (None without keys); admin: the token is one of KVSCHED_ADMIN_KEYS."""

    authenticated: bool
    tenant: str | None = None
    admin: bool = False


class Auth:
    def __init__(self, environ: dict[str, str] | None = None) -> None:
        try:
            admin = admin_keys_from_env(dict(os.environ if environ is None else environ))
        except ValueError as exc:  # refused at start-up by the CLI check; never fatal here
            logger.error("kvsched: %s; no admin keys", exc)
            admin = ()
        self._admin = [key_digest(k) for k in admin]
        self._keys: list[tuple[bytes, str]] | None = None  # (digest, tenant) per vLLM API key, read on first use

    def keys(self, app: Any) -> list[tuple[bytes, str]]:
        if self._keys is None:
            self._keys = [(key_digest(k), tenant_of(k)) for k in compat.api_keys(app)]
        return self._keys

    def identify(self, app: Any, authorization: bytes | None) -> Identity:
        """As vLLM's `AuthenticationMiddleware.verify_token`: "Bearer <token>", the header read as Latin-1 and the
        token compared as UTF-8 bytes by SHA-256 digest in constant time."""
        keys = self.keys(app)
        token = bearer_token(authorization.decode("latin-1")) if authorization else None
        digest = key_digest(token) if token is not None else None
        admin = digest is not None and digest_matches(digest, self._admin)
        if not keys:
            return Identity(True, None, admin)
        tenant = None
        for known, key_tenant in keys:
            if digest is not None and secrets.compare_digest(digest, known):
                tenant = key_tenant
        return Identity(tenant is not None, tenant, admin)


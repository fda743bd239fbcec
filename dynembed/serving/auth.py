"""Token authorization, as TorchServe does it: Bearer tokens kept in a key file.

The server makes a management token (required by default) and an inference token (required
only when inference authorization is on) and writes them to ``key_file.json``, created
readable by its owner only (mode 0600). Tokens are compared in constant time.
"""

from __future__ import annotations

import hmac
import json
import os
import secrets
from pathlib import Path

from starlette.responses import JSONResponse


class Tokens:
    """The server's tokens.

    Args:
        management: require the management token on the management API.
        inference: require the inference token on the inference API.
        key_file: where :meth:`publish` writes the tokens (None: nowhere).
    """

    def __init__(self, *, management: bool = True, inference: bool = False,
                 key_file: str | os.PathLike | None = None) -> None:
        self.required = {"management": management, "inference": inference}
        self.keys = {"management": secrets.token_urlsafe(24),
                     "inference": secrets.token_urlsafe(24)}
        self.key_file = Path(key_file) if key_file is not None else None
        self._published = False

    def publish(self) -> None:
        """Writes the key file, if a token is required (once the server holds its ports:
        a server that fails to start must not replace a running server's tokens)."""
        if self.key_file is not None and any(self.required.values()) and not self._published:
            self._write()
            self._published = True

    def _write(self) -> None:
        self.key_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.key_file.with_name(f".{self.key_file.name}.{os.getpid()}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.fchmod(fd, 0o600)  # a leftover file keeps its mode through O_CREAT
        with os.fdopen(fd, "w") as f:
            json.dump({api: {"key": key} for api, key in self.keys.items()
                       if self.required[api]}, f, indent=1)
        os.replace(tmp, self.key_file)

    def allows(self, api: str, authorization: str | None) -> bool:
        """Whether a request to ``api`` with this Authorization header may proceed."""
        if not self.required[api]:
            return True
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer":  # auth schemes are case-insensitive (RFC 9110 11.1)
            return False
        return hmac.compare_digest(token.strip().encode(), self.keys[api].encode())

    def remove_file(self) -> None:
        """Deletes the key file this server wrote (at shutdown, as TorchServe does)."""
        if self._published:
            self.key_file.unlink(missing_ok=True)
            self._published = False


_HEALTH = frozenset({"/ping", "/v2/health/live", "/v2/health/ready"})
"""Health probes carry no data; load balancers and Kubernetes call them without a token."""


class AuthMiddleware:
    """ASGI middleware: 401 unless the request carries the API's token."""

    def __init__(self, app, tokens: Tokens, api: str) -> None:
        self.app, self.tokens, self.api = app, tokens, api

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and self.tokens.required[self.api] and \
                scope["path"] not in _HEALTH:
            headers = dict(scope.get("headers") or [])
            value = headers.get(b"authorization")
            if not self.tokens.allows(self.api, value.decode("latin-1") if value else None):
                response = JSONResponse({"code": 401, "type": "InvalidKeyException",
                                         "message": "Token Authorization failed. Token "
                                         "either incorrect, expired, or not provided "
                                         f"correctly (the {self.api} key in the key file)"},
                                        status_code=401)
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)

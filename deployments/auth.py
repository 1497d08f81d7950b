"""Optional API keys: when configured, every request outside ``open_paths`` (by default all
but ``/health``) needs ``Authorization: Bearer <key>``; a missing or wrong key gets 401 in
the OpenAI error shape from an ASGI middleware, so it never reaches a replica.

Keys come from any mix of: a list (``api_keys``), a file (``api_keys_file``: one key per
line, ``#`` comments), an environment variable (``api_keys_env``, default
``CBSERVE_API_KEYS``: keys separated by commas or whitespace), read where the ingress runs.
A file or variable that is configured but missing or empty is an error at start: the
server fails closed rather than silently open.

Keys never reach logs: the settings hold them as ``SecretStr``; the key set keeps SHA-256
digests and compares a presented key against every digest in constant time; error messages
never echo a presented key; ``install_log_redaction`` masks any key (and any bearer token)
in log records of the given loggers.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import re
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator

from deployments.errors import APIError
from deployments.limits import send_api_error

logger = logging.getLogger("ray.serve")

DEFAULT_KEYS_ENV = "CBSERVE_API_KEYS"
REDACTED = "[REDACTED]"
_SEPARATORS = re.compile(r"[\s,]+")
_BEARER = re.compile(r"(?i)(bearer\s+)[^\s'\",;]+")


class AuthConfigError(ValueError):
    """API keys were configured but could not be loaded (missing file, empty variable...)."""


class AuthSettings(BaseModel):
    """Where the ingress finds its API keys (``auth`` in the app's args). No source: no auth."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    api_keys: tuple[SecretStr, ...] = Field(
        default=(), description="Keys, inline (prefer a file or an environment variable: args show in Serve's config)."
    )
    api_keys_file: str | None = Field(default=None, description="File with one key per line ('#' starts a comment).")
    api_keys_env: str | None = Field(
        default=DEFAULT_KEYS_ENV,
        description="Environment variable of the ingress process holding keys (comma/space separated); "
        "unset or empty: not a source.",
    )
    open_paths: tuple[str, ...] = Field(default=("/health",), description="Paths served without a key.")

    @field_validator("api_keys")
    @classmethod
    def _real_keys(cls, keys: tuple[SecretStr, ...]) -> tuple[SecretStr, ...]:
        for k in keys:
            _check_key(k.get_secret_value())
        return keys

    def load(self, environ: dict[str, str] | None = None) -> ApiKeys:
        """Collect the keys from every configured source; raises AuthConfigError on a broken source."""
        env = os.environ if environ is None else environ
        keys = [k.get_secret_value() for k in self.api_keys]
        if self.api_keys_file is not None:
            path = Path(self.api_keys_file)
            try:
                text = path.read_text()
            except OSError as exc:
                raise AuthConfigError(f"api_keys_file {str(path)!r} cannot be read: {exc.strerror}") from None
            from_file = [ln.split("#", 1)[0].strip() for ln in text.splitlines()]
            from_file = [k for k in from_file if k]
            if not from_file:
                raise AuthConfigError(f"api_keys_file {str(path)!r} holds no key")
            keys += from_file
        if self.api_keys_env:
            raw = env.get(self.api_keys_env, "")
            keys += [k for k in _SEPARATORS.split(raw) if k]
        for k in keys:
            try:
                _check_key(k)
            except ValueError as exc:
                raise AuthConfigError(str(exc)) from None
        return ApiKeys(keys)


def _check_key(key: str) -> None:
    if not key or key != key.strip() or any(c.isspace() for c in key):
        raise ValueError("an API key must be non-empty and contain no whitespace")
    if set(key) == {"*"}:  # a SecretStr dumped to JSON ("**********") would become a guessable key
        raise ValueError("an API key must not be a masked placeholder ('*****')")


class ApiKeys:
    """A set of API keys; ``matches`` takes the same time whichever key (if any) matches."""

    def __init__(self, keys: Iterable[str]) -> None:
        keys = list(dict.fromkeys(keys))
        self._digests = tuple(_digest(k) for k in keys)
        self._plain = tuple(sorted(keys, key=len, reverse=True))  # for redaction only; longest first

    @property
    def enabled(self) -> bool:
        return bool(self._digests)

    def __len__(self) -> int:
        return len(self._digests)

    def __repr__(self) -> str:
        return f"ApiKeys(<{len(self)} keys>)"

    def matches(self, presented: str | bytes) -> bool:
        # Digests have one length whatever the key's, and every digest is compared (no early
        # exit), so timing tells neither a key's length nor which one nearly matched.
        d = _digest(presented)
        ok = False
        for ref in self._digests:
            ok |= hmac.compare_digest(d, ref)
        return ok

    def redact(self, text: str) -> str:
        for k in self._plain:
            if k in text:
                text = text.replace(k, REDACTED)
        return _BEARER.sub(lambda m: m.group(1) + REDACTED, text)


def _digest(key: str | bytes) -> bytes:
    return hashlib.sha256(key.encode("utf-8", "surrogateescape") if isinstance(key, str) else key).digest()


# ------------------------------------------------------------- ASGI middleware


def bearer_token(headers: Iterable[tuple[bytes, bytes]]) -> tuple[bytes | None, str | None]:
    """(token, None) from a single ``Authorization: Bearer <token>`` header, else (None, why)."""
    values = [v for k, v in headers if k.lower() == b"authorization"]
    if not values:
        return None, "missing"
    if len(values) > 1:
        return None, "several Authorization headers"
    scheme, _, token = values[0].strip().partition(b" ")
    token = token.strip()
    if scheme.lower() != b"bearer" or not token:
        return None, "not a bearer token"
    return token, None


class APIKeyMiddleware:
    """401 for requests outside ``open_paths`` without a valid bearer key; the app never sees them."""

    def __init__(
        self,
        app: Any,
        keys: ApiKeys,
        open_paths: Iterable[str] = ("/health",),
        on_reject: Callable[[str, int], None] | None = None,
    ) -> None:
        self.app = app
        self.keys = keys
        self.open_paths = frozenset(open_paths)
        self.on_reject = on_reject

    async def __call__(self, scope: dict, receive: Callable[..., Any], send: Callable[..., Any]) -> None:
        if scope["type"] not in ("http", "websocket") or not self.keys.enabled:
            await self.app(scope, receive, send)
            return
        path = _route_path(scope)
        if path in self.open_paths:
            await self.app(scope, receive, send)
            return
        token, why = bearer_token(scope.get("headers", ()))
        if token is not None and self.keys.matches(token):
            await self.app(scope, receive, send)
            return
        if token is None and why == "missing":
            message = "You didn't provide an API key. Send it as `Authorization: Bearer <key>`."
        elif token is None:
            message = f"Invalid Authorization header ({why}). Send `Authorization: Bearer <key>`."
        else:
            message = "Incorrect API key provided."  # never echo the key
        logger.info("%s %s -> 401: %s", scope.get("method", ""), path, why or "incorrect API key")
        if self.on_reject is not None:
            self.on_reject(path, 401)
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
            return
        err = APIError(401, message, type="invalid_request_error", code="invalid_api_key")
        await send_api_error(send, err, {"www-authenticate": "Bearer"})


def _route_path(scope: dict) -> str:
    """The path the app routes on: Serve mounts the app under ``root_path`` (its route prefix)
    and, like current ASGI servers, leaves that prefix in ``path``."""
    path, root = scope.get("path", ""), scope.get("root_path", "")
    if root and path.startswith(root):
        path = path[len(root) :] or "/"
    return path


# ------------------------------------------------------------- logs


class RedactingFilter(logging.Filter):
    """Masks API keys and bearer tokens in a record's formatted message (and drops its args)
    and in its formatted traceback (an exception's text may quote a header)."""

    def __init__(self, keys: ApiKeys) -> None:
        super().__init__()
        self.keys = keys

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:
            return True
        redacted = self.keys.redact(message)
        if redacted != message:
            record.msg, record.args = redacted, None
        if record.exc_info and not record.exc_text:
            # Formatters use exc_text when it is set, so the traceback is formatted (and masked) once here.
            record.exc_text = self.keys.redact(logging.Formatter().formatException(record.exc_info))
        elif record.exc_text:
            record.exc_text = self.keys.redact(record.exc_text)
        return True


def install_log_redaction(keys: ApiKeys, loggers: Iterable[str] = ("ray.serve", "ray", "")) -> RedactingFilter:
    """Add a RedactingFilter to these loggers and their handlers (a logger's own filter misses
    records propagated from child loggers; a handler's sees them). Idempotent per key set."""
    flt = RedactingFilter(keys)
    for name in loggers:
        lg = logging.getLogger(name)
        for target in (lg, *lg.handlers):
            if not any(isinstance(f, RedactingFilter) and f.keys is keys for f in target.filters):
                target.addFilter(flt)
    return flt

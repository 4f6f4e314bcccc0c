"""The ``auth`` plugin: API keys from the config, an environment variable and a watched key file.

A key is accepted as ``Authorization: Bearer <key>`` (OpenAI), ``x-api-key: <key>`` (Anthropic) or
``api-key: <key>`` (Azure), in that order of precedence. ``authenticate`` returns the key's
:class:`proxy.Principal` (name, tier, allowed models, and ``metadata`` with ``key_id``, ``rate_limit_key``,
``limits`` and ``expires``); ``check_request`` refuses a model the key may not use (403). A missing, unknown
or expired key is a 401 in OpenAI's format, the key masked. Logs name a key by its name or ``key_id``
(``sha256:`` and 8 hex digits), never by the key.

The key file is polled (mtime, size, inode) every ``watch_interval`` seconds, and read again by every config
reload (SIGHUP, ``POST /admin/reload``), which starts a new instance of this plugin; a file that fails to parse
on a poll keeps the previous keys and logs an error. See ``docs/auth-and-limits.md``.
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import os
import time
from fnmatch import fnmatchcase
from typing import TYPE_CHECKING, Any

import attrs
import structlog

from proxy.tasks import stop_task
from proxy import GatewayError, Principal, hookimpl

from ._keys import (
    KeyFileError,
    KeyRecord,
    KeyStore,
    env_keys,
    hash_key,
    key_id,
    mask_key,
    parse_lines,
    read_key_file,
)

if TYPE_CHECKING:
    from proxy import Exchange
    from proxy.gateway import Gateway

__all__ = ["AuthPlugin", "AuthConfig"]

log = structlog.get_logger("ssegate.auth")

_MISSING = ("You didn't provide an API key. You need to provide your API key in an Authorization header using "
            "Bearer auth (i.e. Authorization: Bearer YOUR_KEY), or in an x-api-key or api-key header.")
_MAX_CACHED = 4096


def _non_negative(_: Any, attribute: attrs.Attribute, value: float) -> None:  # type: ignore[type-arg]
    if value < 0:
        raise ValueError(f"{attribute.name} must not be negative; got {value!r}")


@attrs.frozen
class AuthConfig:
    require_api_key: bool = attrs.field(
        default=True, metadata={"doc": "Refuse requests without a key (false: they pass anonymously; a wrong "
                                       "key is still refused)."})
    hash_api_keys: bool = attrs.field(
        default=True, metadata={"doc": "Hold keys only as SHA-256 digests in memory."})
    keys: tuple[str, ...] = attrs.field(
        default=(), metadata={"doc": "Key lines, in the key-file format (`KEY name=... tier=...`)."})
    keys_env: str | None = attrs.field(
        default="SSEGATE_API_KEYS", metadata={"doc": "Environment variable with comma-separated keys."})
    key_file: str | None = attrs.field(
        default=None, metadata={"doc": "Key file: one key a line, `#` comments, optional attributes."})
    watch_interval: float = attrs.field(
        default=0.25, validator=_non_negative,
        metadata={"doc": "Seconds between checks of the key file for changes; 0 turns polling off (a config "
                         "reload, e.g. SIGHUP, still re-reads it)."})
    help_message: str = attrs.field(
        default="Ask the operator of this gateway for a valid API key.",
        metadata={"doc": "Appended to 401 messages, like OpenAI's 'You can find your API key at ...'."})


class AuthPlugin:
    Config = AuthConfig

    def __init__(self, config: AuthConfig | None = None) -> None:
        self.config = config or AuthConfig()
        keep_raw = not self.config.hash_api_keys
        try:
            self._inline = parse_lines(self.config.keys, "keys", keep_raw)
            self._env = env_keys(self.config.keys_env, keep_raw) if self.config.keys_env else []
            self._store = self._build_store()  # a bad key file is a config error (check-config reports it)
        except KeyFileError as exc:
            raise ValueError(str(exc)) from None
        self._watcher: asyncio.Task[None] | None = None
        self._model_cache: dict[tuple[tuple[str, ...], str], bool] = {}
        #: Counters of this instance's reloads (tests and health read them).
        self.reloads = 0
        self.reload_errors = 0
        self.last_error: str | None = None

    # -- keys ---------------------------------------------------------------------------------------------
    def _build_store(self) -> KeyStore:
        records: list[KeyRecord] = [*self._inline, *self._env]
        if self.config.key_file:
            records += read_key_file(self.config.key_file, keep_raw=not self.config.hash_api_keys)
        return KeyStore(records)

    def reload(self) -> bool:
        """Re-read the key file; on any problem keep the current keys, log it and return False."""
        try:
            store = self._build_store()
        except KeyFileError as exc:
            self.reload_errors += 1
            self.last_error = str(exc)
            log.error("auth_keys_reload_failed", error=str(exc), kept=len(self._store))
            return False
        self._store = store
        self.reloads += 1
        self.last_error = None
        log.info("auth_keys_loaded", keys=len(store), key_file=self.config.key_file)
        return True

    @property
    def key_count(self) -> int:
        return len(self._store)

    def health(self) -> dict[str, Any]:
        status = "degraded" if self.last_error else "ok"
        return {"status": status, "keys": len(self._store), "key_file": self.config.key_file,
                "error": self.last_error}

    # -- lifecycle ----------------------------------------------------------------------------------------
    @hookimpl
    async def startup(self, gateway: "Gateway") -> None:
        if self.config.key_file:
            self._store = self._build_store()  # the file may have changed since the config was checked
            if self.config.watch_interval > 0:
                self._watcher = asyncio.get_running_loop().create_task(self._watch(), name="ssegate-auth-watch")
        if not len(self._store) and self.config.require_api_key:
            log.warning("auth_no_keys", message="no API keys configured: every request will be refused")
        else:
            log.info("auth_keys_loaded", keys=len(self._store), key_file=self.config.key_file)

    @hookimpl
    async def shutdown(self, gateway: "Gateway") -> None:
        watcher, self._watcher = self._watcher, None
        await stop_task(watcher)

    @staticmethod
    def _stat(path: str) -> tuple[int, int, int] | None:
        try:
            st = os.stat(path)
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    async def _watch(self) -> None:
        path = self.config.key_file
        assert path is not None
        last = self._stat(path)
        missing_logged = False
        while True:
            await asyncio.sleep(self.config.watch_interval)
            seen = self._stat(path)
            if seen == last:
                continue
            if seen is None:
                if not missing_logged:
                    log.error("auth_key_file_missing", key_file=path, kept=len(self._store))
                    missing_logged = True
                last = None
                continue
            missing_logged = False
            self.reload()
            if self._stat(path) == seen:  # else it changed while being read: read it again next time
                last = seen

    # -- requests -----------------------------------------------------------------------------------------
    def _refuse(self, message: str, code: str) -> GatewayError:
        return GatewayError(401, f"{message} {self.config.help_message}".strip(), type="invalid_request_error",
                            code=code)

    @staticmethod
    def presented_key(headers: Any) -> str | None:
        """The key a request presents, or None. Raises GatewayError 401 for a malformed Authorization."""
        if headers is None:
            return None
        auth = headers.get("Authorization")
        if auth is not None:
            scheme, _, value = auth.strip().partition(" ")
            value = value.strip()
            lowered = scheme.lower()
            if lowered == "bearer" and value:
                return value
            if lowered == "basic" and value:  # OpenAI accepts the key as the password, with a blank user
                try:
                    _, _, password = base64.b64decode(value, validate=True).decode("utf-8").partition(":")
                except (binascii.Error, UnicodeDecodeError):
                    password = ""
                if password:
                    return password
            return ""  # present but unusable: refused as malformed
        return headers.get("x-api-key") or headers.get("api-key") or None

    @hookimpl
    def authenticate(self, exchange: "Exchange") -> Principal | None:
        key = self.presented_key(exchange.headers)
        if key is None:
            if self.config.require_api_key:
                log.info("auth_rejected", reason="missing_key", request_id=exchange.request_id,
                         client_ip=exchange.client_ip)
                raise GatewayError(401, _MISSING, type="invalid_request_error", code="missing_api_key")
            return None
        if not key:
            log.info("auth_rejected", reason="malformed_authorization", request_id=exchange.request_id,
                     client_ip=exchange.client_ip)
            raise self._refuse("The Authorization header must be 'Bearer YOUR_KEY'.", "invalid_api_key")
        record = self._store.lookup(key)
        if record is None:
            log.info("auth_rejected", reason="invalid_key", key_id=hash_key(key)[:15], request_id=exchange.request_id,
                     client_ip=exchange.client_ip)
            raise self._refuse(f"Incorrect API key provided: {mask_key(key)}.", "invalid_api_key")
        if record.expires is not None and time.time() >= record.expires:
            log.info("auth_rejected", reason="expired_key", key=record.name, key_id=key_id(record.digest),
                     request_id=exchange.request_id)
            raise self._refuse(f"The API key provided ({mask_key(key)}) has expired.", "expired_api_key")
        return record.principal

    @hookimpl
    def check_request(self, exchange: "Exchange") -> None:
        principal = exchange.principal
        if principal is None or principal.allowed_models is None or exchange.model is None:
            return
        if not self.model_allowed(principal.allowed_models, exchange.model):
            log.info("auth_model_refused", key=principal.name, key_id=principal.metadata.get("key_id"),
                     model=exchange.model, request_id=exchange.request_id)
            raise GatewayError(
                403, f"The API key '{principal.name}' is not allowed to use the model `{exchange.model}` "
                     f"(allowed: {', '.join(principal.allowed_models)}).",
                type="invalid_request_error", param="model", code="model_not_allowed")

    def model_allowed(self, allowed: tuple[str, ...], model: str) -> bool:
        if model in allowed:
            return True
        key = (allowed, model)
        verdict = self._model_cache.get(key)
        if verdict is None:
            verdict = any(fnmatchcase(model, pattern) for pattern in allowed)
            if len(self._model_cache) >= _MAX_CACHED:
                self._model_cache.clear()
            self._model_cache[key] = verdict
        return verdict

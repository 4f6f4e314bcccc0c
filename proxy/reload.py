"""Config reload without restart: validate the new config, start a new Gateway, swap it in, and retire the
old one once its in-flight requests (streams included) have finished on the config they started with."""
from __future__ import annotations

import asyncio
import os
from typing import Any

import attrs
import structlog

from .app_keys import GatewayHolder
from .config import ConfigError, layer_files, load_config_with_origins
from .gateway import Gateway
from .log import configure_logging
from .tls import load_into

__all__ = ["Reloader"]

log = structlog.get_logger("ssegate.reload")


#: Settings read once, when the process starts listening (the rest of the config applies on reload).
RESTART_SETTINGS = (("server", "host"), ("server", "port"), ("server", "workers"), ("server", "max_request_size"),
                    ("server", "config_watch_interval"), ("server", "gc_gen0_threshold"),
                    ("observability", "metrics_port"),
                    # CORS decides the app's middleware (and whether the API skips the router): set at start
                    ("cors", "allow_origins"), ("cors", "allow_credentials"), ("cors", "allow_headers"),
                    ("cors", "expose_headers"), ("cors", "max_age"))


def _needs_restart(old: Any, new: Any) -> list[str]:
    """The keys of :data:`RESTART_SETTINGS` that differ between two configs."""
    return [f"{section}.{key}" for section, key in RESTART_SETTINGS
            if getattr(getattr(old, section), key) != getattr(getattr(new, section), key)]


class Reloader:
    def __init__(self, holder: GatewayHolder, config_path: str | None, configure_logs: bool = True,
                 server_overrides: dict[str, Any] | None = None) -> None:
        self.holder = holder
        self.config_path = config_path
        self.configure_logs = configure_logs
        #: ``server`` settings given on the command line (``--host``, ``--port``, ``--workers``): they win over
        #: the file's on every reload, as they did at startup.
        self.server_overrides = dict(server_overrides or {})
        self._lock = asyncio.Lock()
        self._retiring: set[asyncio.Task[None]] = set()
        self.reloads = 0
        #: What the layer files looked like when they were last read (see :meth:`watch`).
        self.seen = self.fingerprint()

    def fingerprint(self) -> tuple[tuple[int, int, int] | None, ...]:
        """(mtime, size, inode) of each layer file, then of the TLS certificate and key, None for a missing one.
        ``os.stat`` follows symlinks, so the symlink swap of a Kubernetes ConfigMap or Secret volume update
        changes it."""
        if self.config_path is None:
            return ()
        marks: list[tuple[int, int, int] | None] = []
        server = self.holder.current.config.server
        tls_files = [f for f in (server.tls_cert_file, server.tls_key_file) if f]  # (a certificate renewed in place)
        for path in [*layer_files(self.config_path), *tls_files]:
            try:
                st = os.stat(path)
            except OSError:
                marks.append(None)
            else:
                marks.append((st.st_mtime_ns, st.st_size, st.st_ino))
        return tuple(marks)

    async def watch(self, interval: float) -> None:
        """Reload whenever the layer files change, checking every ``interval`` seconds (runs until cancelled).

        A change already loaded by ``SIGHUP`` or the admin API is not loaded twice; a refused config is not
        retried until the files change again; a missing base file is logged once and the config kept."""
        missing_logged = False
        while True:
            await asyncio.sleep(interval)
            seen = self.fingerprint()
            if seen == self.seen:
                continue
            if seen and seen[0] is None:
                if not missing_logged:
                    log.error("config_file_missing", path=self.config_path)
                    missing_logged = True
                continue
            missing_logged = False
            log.info("config_changed", path=self.config_path)
            try:
                await self.reload()
            except Exception as exc:  # a bug, not a bad config (reload refuses those): keep watching
                log.error("config_reload_failed", path=self.config_path, error=repr(exc), exc_info=exc)

    async def reload(self) -> tuple[bool, list[str]]:
        """Reload from the config file. Returns (applied, problems); a refused config changes nothing."""
        async with self._lock:
            self.seen = self.fingerprint()  # before reading: a change made while reading is seen next time
            old = self.holder.current
            try:
                config, origins = load_config_with_origins(self.config_path)
                if self.server_overrides:
                    config = attrs.evolve(config, server=attrs.evolve(config.server, **self.server_overrides))
                new = Gateway(config, origins, registry=old.registry, process_state=old.process_state)
            except ConfigError as exc:
                problems = [str(p) for p in exc.problems]
                log.error("config_reload_refused", path=self.config_path, problems=problems)
                return False, problems
            pending = _needs_restart(old.config, config)
            tls = self.holder.tls
            if (tls is None) != (not config.server.tls_cert_file):  # HTTPS on or off: the listener is made at start
                pending.append("server.tls_cert_file")
            if pending:
                log.warning("config_reload_needs_restart", keys=pending,
                            detail="these settings apply at the next start; the rest of the config applies now")
            # Logging first: plugins take their loggers' levels (and the access log its line writer) at startup.
            if self.configure_logs:
                configure_logging(config.logging)
            try:
                await new.start()
            except Exception as exc:  # a plugin or provider that cannot start: keep the old config
                if self.configure_logs:
                    configure_logging(old.config.logging)
                log.error("config_reload_refused", path=self.config_path, error=str(exc))
                return False, [str(exc)]  # new.start() closed what it had opened
            self.holder.current = new
            self.reloads += 1
            if tls is not None and config.server.tls_cert_file:
                self._load_certificate(tls, config.server.tls_cert_file, config.server.tls_key_file)  # type: ignore[arg-type]
            task = asyncio.get_running_loop().create_task(self._retire(old))
            self._retiring.add(task)
            task.add_done_callback(self._retiring.discard)
            log.info("config_reloaded", path=self.config_path, providers=len(config.providers),
                     plugins=[p.name for p in new.plugins], in_flight_on_old=old.in_flight)
            return True, []

    @staticmethod
    def _load_certificate(tls: Any, cert_file: str, key_file: str) -> None:
        """The certificate for the connections made from now on (the config check loaded it already: this fails
        only if the files changed again since)."""
        try:
            load_into(tls, cert_file, key_file)
        except (OSError, ValueError) as exc:
            log.error("tls_certificate_reload_failed", cert_file=cert_file, key_file=key_file, error=str(exc))
        else:
            log.info("tls_certificate_loaded", cert_file=cert_file)

    async def _retire(self, gateway: Gateway) -> None:
        await gateway.wait_idle()
        await gateway.close()

    async def close(self, timeout: float = 5.0) -> None:
        """Wait for retiring gateways (at shutdown)."""
        if self._retiring:
            await asyncio.wait(self._retiring, timeout=timeout)

"""Config reload without restart: validate the new config, start a new Gateway, swap it in, and retire the
old one once its in-flight requests (streams included) have finished on the config they started with."""
from __future__ import annotations

import asyncio
from typing import Any

import structlog

from .app_keys import GatewayHolder
from .config import ConfigError, load_config_with_origins
from .gateway import Gateway
from .log import configure_logging

__all__ = ["Reloader"]

log = structlog.get_logger("ssegate.reload")


class Reloader:
    def __init__(self, holder: GatewayHolder, config_path: str | None, configure_logs: bool = True) -> None:
        self.holder = holder
        self.config_path = config_path
        self.configure_logs = configure_logs
        self._lock = asyncio.Lock()
        self._retiring: set[asyncio.Task[None]] = set()
        self.reloads = 0

    async def reload(self) -> tuple[bool, list[str]]:
        """Reload from the config file. Returns (applied, problems); a refused config changes nothing."""
        async with self._lock:
            old = self.holder.current
            try:
                config, origins = load_config_with_origins(self.config_path)
                new = Gateway(config, origins, registry=old.registry, process_state=old.process_state)
            except ConfigError as exc:
                problems = [str(p) for p in exc.problems]
                log.error("config_reload_refused", path=self.config_path, problems=problems)
                return False, problems
            if config.server != old.config.server:
                log.warning("config_reload_server_unchanged",
                            detail="the server section (bind address, workers, body limit) needs a restart")
            try:
                await new.start()
            except Exception as exc:  # a plugin or provider that cannot start: keep the old config
                log.error("config_reload_refused", path=self.config_path, error=str(exc))
                return False, [str(exc)]  # new.start() closed what it had opened
            self.holder.current = new
            self.reloads += 1
            if self.configure_logs:
                configure_logging(config.logging)
            task = asyncio.get_running_loop().create_task(self._retire(old))
            self._retiring.add(task)
            task.add_done_callback(self._retiring.discard)
            log.info("config_reloaded", path=self.config_path, providers=len(config.providers),
                     plugins=[p.name for p in new.plugins], in_flight_on_old=old.in_flight)
            return True, []

    async def _retire(self, gateway: Gateway) -> None:
        await gateway.wait_idle()
        await gateway.close()

    async def close(self, timeout: float = 5.0) -> None:
        """Wait for retiring gateways (at shutdown)."""
        if self._retiring:
            await asyncio.wait(self._retiring, timeout=timeout)

    def status(self) -> dict[str, Any]:
        return {"reloads": self.reloads, "retiring": len(self._retiring)}

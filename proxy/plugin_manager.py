"""Finding, configuring and registering plugins, in the order of the config's ``pipeline:`` list.

A pipeline entry names a plugin three ways: a built-in name (``router``), a name registered by an installed
package in the ``ssegate`` entry-point group, or a dotted path ``package.module:Object`` (or ``package.module``).
The object is a module of hook functions or a class; a class is instantiated with its config, a frozen attrs
class named in its ``Config`` attribute, structured from the entry's config block with the same strict
converter as the main config (so a typo is a startup error naming file, line and key).
"""
from __future__ import annotations

import importlib
import inspect
from importlib.metadata import entry_points
from typing import Any

import pluggy

from . import hookspecs
from .config.load import ConfigError, ConfigProblem, Origins, structure
from .config.schema import PipelineEntry

__all__ = ["LoadedPlugin", "PluginLoadError", "load_plugins", "instantiate", "entry_problem", "check_hook_api",
           "new_plugin_manager", "BUILTIN_PLUGINS"]

#: Built-in plugin names -> import path. Third-party plugins are peers: they use the same hooks.
BUILTIN_PLUGINS = {
    "router": "plugins.router:RouterPlugin",
    "metrics": "plugins.metrics:MetricsPlugin",
    "access_log": "plugins.access_log:AccessLogPlugin",
    "auth": "plugins.auth:AuthPlugin",
    "ratelimit": "plugins.ratelimit:RateLimitPlugin",
    "cache": "plugins.cache:CachePlugin",
    "moderation": "plugins.moderation:ModerationPlugin",
    "provider_limits": "plugins.provider_limits:ProviderLimitsPlugin",
}

ENTRY_POINT_GROUP = "ssegate"


class PluginLoadError(ConfigError):
    """A plugin could not be found, configured or registered; the message says which and what to do."""


class LoadedPlugin:
    __slots__ = ("name", "obj", "config")

    def __init__(self, name: str, obj: Any, config: Any) -> None:
        self.name, self.obj, self.config = name, obj, config


def new_plugin_manager() -> pluggy.PluginManager:
    pm = pluggy.PluginManager("ssegate")
    pm.add_hookspecs(hookspecs)
    return pm


def _resolve(name: str) -> Any:
    target = BUILTIN_PLUGINS.get(name)
    if target is None and ":" not in name and "." not in name:
        for ep in entry_points(group=ENTRY_POINT_GROUP):
            if ep.name == name:
                try:
                    return ep.load()
                except Exception as exc:  # a broken installed package: a config problem, not a traceback
                    raise LookupError(f"cannot load plugin {name!r} of the {ENTRY_POINT_GROUP!r} entry-point group "
                                      f"({ep.value}): {type(exc).__name__}: {exc}") from exc
        raise LookupError(
            f"no plugin named {name!r}: not a built-in ({', '.join(sorted(BUILTIN_PLUGINS))}), "
            f"not in the {ENTRY_POINT_GROUP!r} entry-point group of an installed package, "
            "and not a dotted path like 'package.module:Plugin'"
        )
    module_name, _, attr = (target or name).partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise LookupError(f"cannot import plugin module {module_name!r}: {exc}") from exc
    if not attr:
        return module
    try:
        obj: Any = module
        for part in attr.split("."):
            obj = getattr(obj, part)
        return obj
    except AttributeError as exc:
        raise LookupError(f"module {module_name!r} has no attribute {attr!r}") from exc


def entry_problem(index: int, entry: PipelineEntry, origins: Origins, message: str) -> ConfigProblem:
    """A problem with pipeline entry ``index``, located at its file and line."""
    path = ("pipeline", index)
    file, line = origins.locate(path)
    return ConfigProblem(file=file, line=line, key=f"pipeline[{index}].{entry.name}", message=message)


def check_hook_api(target: Any) -> None:
    """Refuse a plugin whose ``requires_hook_api`` (``"MAJOR.MINOR"``) this ssegate's hook API does not meet.

    A plugin states the oldest hook API it works with; it loads when the majors are equal and ours is at least
    as new. A malformed requirement is refused too: a security plugin must not load by accident.
    """
    required = getattr(target, "requires_hook_api", None)
    if required is None:
        return
    ours = _parse_version(hookspecs.HOOK_API_VERSION)
    try:
        wanted = _parse_version(str(required))
    except ValueError:
        raise ValueError(f"requires_hook_api = {required!r} is not a version like '1.0'") from None
    if wanted[0] != ours[0] or wanted[1] > ours[1]:
        raise ValueError(
            f"needs hook API {required}, but this ssegate provides hook API {hookspecs.HOOK_API_VERSION}: "
            + ("upgrade ssegate (pip install -U ssegate) or use a release of the plugin made for "
               f"hook API {hookspecs.HOOK_API_VERSION}" if wanted > ours else
               f"use a release of the plugin made for hook API {ours[0]}.x"))


def _parse_version(text: str) -> tuple[int, int]:
    major, dot, minor = text.strip().partition(".")
    if not dot or not major.isdigit() or not minor.isdigit():
        raise ValueError(text)
    return int(major), int(minor)


def instantiate(index: int, entry: PipelineEntry, target: Any, origins: Origins) -> tuple[Any, Any]:
    """Check the hook API requirement of ``target``, structure the entry's settings into its ``Config`` and
    instantiate it (a class) or take it as it is (a module or object); returns ``(plugin, config)``."""
    check_hook_api(target)
    config_cls = getattr(target, "Config", None)
    if config_cls is None:
        if entry.config not in (None, {}):
            raise PluginLoadError([entry_problem(index, entry, origins,
                                            "this plugin takes no settings (it declares no Config class)")])
        return (target() if inspect.isclass(target) else target), None
    config = structure(entry.config or {}, config_cls, origins, base_path=("pipeline", index, entry.name))
    if inspect.isclass(target):
        return target(config), config
    return target, config


def load_plugins(entries: tuple[PipelineEntry, ...], pm: pluggy.PluginManager,
                 origins: Origins | None = None, objects: dict[str, Any] | None = None) -> list[LoadedPlugin]:
    """Import, configure and register every pipeline entry; raise PluginLoadError listing every problem.

    ``objects`` maps entry names to ready plugin objects, registered as they are (tests, embedding).
    """
    origins = origins or Origins()
    loaded: list[LoadedPlugin] = []
    problems: list[ConfigProblem] = []
    for index, entry in enumerate(entries):
        try:
            if objects and entry.name in objects:
                obj, config = objects[entry.name], getattr(objects[entry.name], "config", None)
                check_hook_api(obj)
            else:
                obj, config = instantiate(index, entry, _resolve(entry.name), origins)
            if pm.is_registered(obj) or pm.get_plugin(entry.name) is not None:
                raise LookupError("listed twice in the pipeline")
            pm.register(obj, name=entry.name)
        except ConfigError as exc:
            problems.extend(exc.problems)
            continue
        except pluggy.PluginValidationError as exc:
            problems.append(entry_problem(index, entry, origins, f"invalid hook implementation: {exc}. "
                                     "Check the hook's name and arguments against proxy/hookspecs.py"))
            continue
        except (LookupError, TypeError, ValueError) as exc:
            problems.append(entry_problem(index, entry, origins, str(exc)))
            continue
        loaded.append(LoadedPlugin(entry.name, obj, config))
    for hook_name, impls in _unknown_hooks(pm).items():
        for impl in impls:
            idx = next(i for i, e in enumerate(entries) if e.name == impl.plugin_name)
            problems.append(entry_problem(idx, entries[idx], origins,
                                     f"implements {hook_name!r}, which is not a ssegate hook "
                                     f"(known hooks: {', '.join(_hook_names())})"))
    for caller in _callers(pm):
        for impl in caller.get_hookimpls():
            if impl.hookwrapper or impl.wrapper or impl.tryfirst or impl.trylast:
                idx = next(i for i, e in enumerate(entries) if e.name == impl.plugin_name)
                what = "hook wrappers are not supported" if impl.hookwrapper or impl.wrapper else \
                    "tryfirst/trylast have no effect here"
                problems.append(entry_problem(idx, entries[idx], origins,
                                         f"{caller.name}: {what}; the order of the config's pipeline: list is the "
                                         "call order (list the plugin earlier or later instead)"))
    for impl in pm.hook.on_chunk.get_hookimpls():
        if inspect.iscoroutinefunction(impl.function) or inspect.isasyncgenfunction(impl.function):
            idx = next(i for i, e in enumerate(entries) if e.name == impl.plugin_name)
            problems.append(entry_problem(idx, entries[idx], origins,
                                          "on_chunk must be synchronous: it runs for every event of every stream "
                                          "(do I/O in check_request, upstream_request or exchange_done)"))
    if problems:
        raise PluginLoadError(problems)
    return loaded


def _hook_names() -> list[str]:
    return sorted(n for n, v in vars(hookspecs).items() if callable(v) and hasattr(v, "ssegate_spec"))


def _callers(pm: pluggy.PluginManager) -> list[pluggy.HookCaller]:
    callers = (getattr(pm.hook, name) for name in dir(pm.hook) if not name.startswith("_"))
    return [c for c in callers if isinstance(c, pluggy.HookCaller)]


def _unknown_hooks(pm: pluggy.PluginManager) -> dict[str, list[Any]]:
    unknown: dict[str, list[Any]] = {}
    for caller in _callers(pm):
        if caller.spec is None:
            impls = [i for i in caller.get_hookimpls() if not i.optionalhook]
            if impls:
                unknown[caller.name] = impls
    return unknown

"""Layered, line-aware configuration loading.

Layers, lowest first:

1. the base YAML file (or, without one, the built-in default);
2. ``<stem>.<environment>.yaml`` beside it, when ``environment=`` or ``SSEGATE_ENVIRONMENT`` names one;
3. ``SSEGATE_<SECTION>__<KEY>[__<KEY>...]`` environment variables, parsed as YAML scalars;

then ``${VAR}`` / ``${VAR:-default}`` references in string values are filled in from the environment.
Mappings merge key by key; lists and scalars replace. The merged data is structured into the frozen attrs
schema by a strict cattrs converter, and every problem found is reported with its file, line and key.
"""
from __future__ import annotations

import difflib
import os
import re
from collections.abc import Callable, Collection, Iterator, Mapping
from typing import Any, TypeVar, Union, get_args, get_origin

import attrs
import cattrs
from cattrs.cols import homogenous_tuple_structure_factory, list_structure_factory, mapping_structure_factory
from cattrs.errors import (
    AttributeValidationNote,
    BaseValidationError,
    ForbiddenExtraKeysError,
    IterableValidationNote,
)
from cattrs.gen import make_dict_structure_fn
from ruamel.yaml import YAML
from ruamel.yaml.error import MarkedYAMLError, YAMLError
from ruamel.yaml.scalarbool import ScalarBoolean

from .schema import (
    Config,
    CorsConfig,
    LoggingConfig,
    PipelineEntry,
    ProviderConfig,
    ServerConfig,
    SimulationConfig,
    StreamingConfig,
)

__all__ = [
    "ConfigProblem",
    "ConfigError",
    "Origins",
    "converter",
    "load_layers",
    "layer_files",
    "structure",
    "load_config",
    "check_config",
    "default_config_data",
    "format_key",
    "PROVIDER_TYPES",
    "PROVIDER_TYPES_WITHOUT_URL",
]

T = TypeVar("T")
KeyPath = tuple[Union[str, int], ...]
Origin = tuple[Union[str, None], Union[int, None]]

ENV_PREFIX = "SSEGATE_"
RESERVED_ENV = frozenset({"SSEGATE_ENVIRONMENT", "SSEGATE_CONFIG"})
CONFIG_SECTIONS = tuple(field.name for field in attrs.fields(Config))
DEFAULT_ORIGIN = "<built-in default>"

#: Provider ``type`` values accepted by :func:`load_config`; provider adapters may add theirs.
PROVIDER_TYPES: set[str] = {"openai", "azure_openai", "anthropic", "simulated"}
#: Provider types that need no ``base_url``.
PROVIDER_TYPES_WITHOUT_URL: set[str] = {"simulated"}
LOG_FORMATS = ("auto", "json", "console")
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")


# --- problems ----------------------------------------------------------------------------------------------


def format_key(path: KeyPath) -> str:
    """Render a key path as ``providers[0].timeout`` (keys joined by dots, list indexes in brackets)."""
    text = ""
    for segment in path:
        if isinstance(segment, int) and not isinstance(segment, bool):
            text += f"[{segment}]"
        else:
            text += f".{segment}" if text else str(segment)
    return text


@attrs.frozen
class ConfigProblem:
    """One thing wrong with the configuration, and where it is."""

    file: str | None
    line: int | None  # 1-based
    key: str
    message: str

    def __str__(self) -> str:
        parts = []
        if self.file:
            parts.append(f"{self.file}:{self.line}" if self.line is not None else self.file)
        elif self.line is not None:
            parts.append(f"line {self.line}")
        if self.key:
            parts.append(self.key)
        parts.append(self.message)
        return ": ".join(parts)


class ConfigError(Exception):
    """The configuration is invalid; ``problems`` lists everything found, ``str()`` one problem a line."""

    def __init__(self, problems: Collection[ConfigProblem]) -> None:
        self.problems = list(problems)
        super().__init__(self.problems)

    def __str__(self) -> str:
        return "\n".join(str(problem) for problem in self.problems)


class Origins:
    """Where each value of the merged data came from: key path -> ``(file, 1-based line or None)``."""

    def __init__(self, entries: Mapping[KeyPath, Origin] | None = None) -> None:
        self._entries: dict[KeyPath, Origin] = dict(entries or {})

    def __repr__(self) -> str:
        return f"Origins({self._entries!r})"

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, path: object) -> bool:
        return path in self._entries

    def set(self, path: KeyPath, file: str | None, line: int | None) -> None:
        """Record the origin of the value at ``path``."""
        self._entries[tuple(path)] = (file, line)

    def get(self, path: KeyPath) -> Origin | None:
        """The origin recorded for exactly ``path``, or None."""
        return self._entries.get(tuple(path))

    def locate(self, path: KeyPath) -> Origin:
        """The origin of the longest recorded prefix of ``path`` (``(None, None)`` when nothing matches)."""
        path = tuple(path)
        for end in range(len(path), -1, -1):
            found = self._entries.get(path[:end])
            if found is not None:
                return found
        return (None, None)

    def graft(self, path: KeyPath, other: Origins) -> None:
        """Replace what is recorded at and under ``path`` by what ``other`` knows there."""
        path = tuple(path)
        size = len(path)
        self._entries = {p: o for p, o in self._entries.items() if p[:size] != path}
        self._entries.update({p: o for p, o in other._entries.items() if p[:size] == path})
        self._entries[path] = other.locate(path)

    def problem(self, path: KeyPath, message: str) -> ConfigProblem:
        """A :class:`ConfigProblem` for ``path``, located by :meth:`locate`."""
        file, line = self.locate(path)
        return ConfigProblem(file, line, format_key(path), message)


def _in_file_order(problems: Collection[ConfigProblem]) -> list[ConfigProblem]:
    """Problems grouped by file (in order of first appearance), by line within a file."""
    files: dict[str | None, int] = {}
    for problem in problems:
        files.setdefault(problem.file, len(files))
    return sorted(problems, key=lambda p: (files[p.file], p.line is None, p.line or 0))


def _describe(value: Any) -> str:
    """A value as a YAML user would name it, for messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, (list, tuple)):
        return "a list"
    return repr(value)


# --- layers ------------------------------------------------------------------------------------------------


def _scalar(value: Any) -> Any:
    """Turn ruamel's scalar subclasses (ScalarFloat, HexInt, ...) into plain Python values."""
    if isinstance(value, ScalarBoolean):
        return bool(value)
    for kind in (bool, int, float, str):
        if isinstance(value, kind):
            return kind(value)
    return value


def _position(node: Any, kind: str, index: Any) -> int | None:
    """1-based line of a mapping key (``kind="key"``) or a sequence item (``"item"``), if ruamel knows it."""
    try:
        return getattr(node.lc, kind)(index)[0] + 1
    except (AttributeError, KeyError, IndexError, TypeError):
        return None


def _plain(node: Any, path: KeyPath = (), file: str | None = None, origins: Origins | None = None) -> Any:
    """Convert ruamel's round-trip nodes to dicts/lists/scalars, recording the line of every key and item."""
    if isinstance(node, Mapping):
        items = [(_scalar(key), value, _position(node, "key", key)) for key, value in node.items()]
    elif isinstance(node, (list, tuple)):
        items = [(index, value, _position(node, "item", index)) for index, value in enumerate(node)]
    else:
        return _scalar(node)
    out = {}
    for key, value, line in items:
        if origins is not None and line is not None:
            origins.set(path + (key,), file, line)
        out[key] = _plain(value, path + (key,), file, origins)
    return out if isinstance(node, Mapping) else list(out.values())


def _read_yaml(file: str) -> tuple[dict[str, Any], Origins]:
    """Read one YAML layer; raises ConfigError for unreadable files, bad syntax or a non-mapping top level."""
    origins = Origins({(): (file, None)})

    def fail(message: str, line: int | None = None) -> ConfigError:
        return ConfigError([ConfigProblem(file, line, "", message)])

    try:
        with open(file, encoding="utf-8") as stream:
            text = stream.read()
    except FileNotFoundError:
        raise fail("file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise fail(f"cannot read the file: {exc}") from None
    try:
        node = YAML(typ="rt").load(text)
    except MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        message = f"YAML syntax error: {exc.problem or exc.context}"
        if exc.problem and exc.context and exc.context_mark and mark and exc.context_mark.line != mark.line:
            message += f" ({exc.context}, which starts on line {exc.context_mark.line + 1})"
        # a mark at the end of the stream lies one past the last line; report the last line instead
        raise fail(message, min(mark.line + 1, len(text.splitlines()) or 1) if mark else None) from None
    except YAMLError as exc:
        raise fail(f"YAML error: {exc}") from None
    if node is None:
        return {}, origins
    if not isinstance(node, Mapping):
        line = getattr(getattr(node, "lc", None), "line", None)
        raise fail(
            f"the top level must be a mapping of sections, got {_describe(_plain(node))}",
            line + 1 if line is not None else None,
        )
    return _plain(node, (), file, origins), origins


def _merge(base: dict[str, Any], overlay: Mapping[str, Any], origins: Origins, overlay_origins: Origins,
           path: KeyPath = ()) -> None:
    """Deep-merge ``overlay`` into ``base``: mappings key by key, everything else replaces (with its origins)."""
    for key, value in overlay.items():
        sub = path + (key,)
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value, origins, overlay_origins, sub)
        else:
            base[key] = value
            origins.graft(sub, overlay_origins)


def _overlay_path(path: str, environment: str) -> str:
    """``conf/ssegate.yaml`` + ``production`` -> ``conf/ssegate.production.yaml``."""
    directory, name = os.path.split(path)
    stem, suffix = os.path.splitext(name)
    return os.path.join(directory, f"{stem}.{environment}{suffix or '.yaml'}")


def _parse_env_value(raw: str) -> Any:
    """An environment value as a YAML scalar (``8080`` -> int, ``[a, b]`` -> list); unparsable stays text."""
    try:
        return _plain(YAML(typ="safe", pure=True).load(raw))
    except YAMLError:
        return raw


def _set_env_value(data: dict[str, Any], origins: Origins, segments: tuple[str, ...], value: Any,
                   origin: Origins) -> str | None:
    """Put ``value`` at ``segments`` (digits index into lists); returns an error message if it cannot."""
    container: Any = data
    path: KeyPath = ()
    for position, segment in enumerate(segments):
        key: str | int = segment
        if isinstance(container, list):
            if not segment.isdigit() or int(segment) >= len(container):
                return f"{format_key(path)} is a list of {len(container)} items; '{segment}' is not one of its indexes"
            key = int(segment)
        path += (key,)
        current = container[key] if isinstance(container, list) else container.get(key)
        if position == len(segments) - 1:
            if isinstance(current, dict) and isinstance(value, dict):
                _merge(current, value, origins, origin, path)
            else:
                container[key] = value
                origins.graft(path, origin)
        elif isinstance(current, (dict, list)):
            container = current
        else:
            container[key] = container = {}
            origins.graft(path, origin)
    return None


def _apply_env(data: dict[str, Any], origins: Origins, env: Mapping[str, str],
               sections: Collection[str] | None) -> list[ConfigProblem]:
    """Apply ``SSEGATE_<SECTION>__<KEY>...`` overrides, least specific first."""
    allowed = None if sections is None else {section.lower() for section in sections}
    overrides = []
    for name, raw in env.items():
        if not name.startswith(ENV_PREFIX) or name in RESERVED_ENV:
            continue
        segments = tuple(part.lower() for part in name[len(ENV_PREFIX):].split("__"))
        if allowed is None or segments[0] in allowed:
            overrides.append((len(segments), name, segments, raw))
    problems = []
    for _, name, segments, raw in sorted(overrides):
        label = f"environment {name}"
        if not all(segments):
            problems.append(ConfigProblem(label, None, "", "empty key in the variable name (doubled '__'?)"))
            continue
        error = _set_env_value(data, origins, segments, _parse_env_value(raw), Origins({(): (label, None)}))
        if error:
            key = format_key(tuple(int(s) if s.isdigit() else s for s in segments))
            problems.append(ConfigProblem(label, None, key, error))
    return problems


_REFERENCE = re.compile(r"\$\$\{|\$\{(?:(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?P<default>:-[^}]*)?\})?")


def _interpolate(value: Any, path: KeyPath, env: Mapping[str, str], origins: Origins,
                 problems: list[ConfigProblem]) -> Any:
    """Fill ``${VAR}`` / ``${VAR:-default}`` in every string (``$${`` is a literal ``${``)."""
    if isinstance(value, dict):
        return {key: _interpolate(item, path + (key,), env, origins, problems) for key, item in value.items()}
    if isinstance(value, list):
        return [_interpolate(item, path + (index,), env, origins, problems) for index, item in enumerate(value)]
    if not isinstance(value, str) or "${" not in value:
        return value

    def substitute(match: re.Match[str]) -> str:
        if match.group(0) == "$${":
            return "${"
        name, default = match.group("name"), match.group("default")
        if name is None:
            problems.append(origins.problem(
                path, "malformed ${...} reference: write ${VAR} or ${VAR:-default}, or $${ for a literal ${"))
            return match.group(0)
        found = env.get(name)
        if default is not None and not found:
            return default[2:]
        if found is None:
            problems.append(origins.problem(path, f"environment variable {name} is not set"))
            return match.group(0)
        return found

    result = _REFERENCE.sub(substitute, value)
    return Interpolated(result) if result != value else result


class Interpolated(str):
    """A string that came from ``${VAR}`` interpolation. Typed fields read it as their type, so
    ``port: ${PORT:-8000}`` is an integer; without a reference, quoted numbers stay errors."""


def _load_layers(path: str | os.PathLike[str] | None, environment: str | None, env: Mapping[str, str],
                 sections: Collection[str] | None,
                 default: Mapping[str, Any] | None) -> tuple[dict[str, Any], Origins, list[ConfigProblem]]:
    if path is None:
        data = _plain(dict(default or {}))
        origins = Origins({(): (DEFAULT_ORIGIN, None)})
    else:
        path = os.fspath(path)
        data, origins = _read_yaml(path)
        if environment is None:
            environment = env.get("SSEGATE_ENVIRONMENT") or None
        if environment:
            overlay = _overlay_path(path, environment)
            if os.path.exists(overlay):
                overlay_data, overlay_origins = _read_yaml(overlay)
                _merge(data, overlay_data, origins, overlay_origins)
    problems = _apply_env(data, origins, env, sections)
    data = _interpolate(data, (), env, origins, problems)
    return data, origins, problems


def layer_files(path: str | os.PathLike[str], environment: str | None = None,
                env: Mapping[str, str] = os.environ) -> tuple[str, ...]:
    """The files a load of ``path`` reads: the base file, then the environment layer when one is named (whether
    it exists yet or not: a watcher must see it appear)."""
    path = os.fspath(path)
    if environment is None:
        environment = env.get("SSEGATE_ENVIRONMENT") or None
    return (path, _overlay_path(path, environment)) if environment else (path,)


def environment_notes(path: str | os.PathLike[str] | None, env: Mapping[str, str] = os.environ) -> list[str]:
    """What in the environment a load of ``path`` silently leaves aside, said once at startup (warnings, not
    errors: each may be intended):

    - ``SSEGATE_ENVIRONMENT`` names a layer whose file does not exist (a typo runs the base config);
    - an ``SSEGATE_*`` variable that is not a setting but looks like one with ``_`` for ``__``
      (``SSEGATE_SERVER_PORT``): it may be a variable the config interpolates (``${SSEGATE_REDIS_URL}``).
    """
    notes = []
    environment = env.get("SSEGATE_ENVIRONMENT") or None
    if environment and path is not None:
        overlay = _overlay_path(os.fspath(path), environment)
        if not os.path.exists(overlay):
            notes.append(f"SSEGATE_ENVIRONMENT={environment}: no layer file {overlay}; the base config applies "
                         "alone")
    for name in sorted(env):
        if not name.startswith(ENV_PREFIX) or name in RESERVED_ENV or "__" in name:
            continue
        tail = name[len(ENV_PREFIX):].lower()
        section = next((s for s in CONFIG_SECTIONS if tail.startswith(s + "_")), None)
        if section is not None:
            suggestion = f"{ENV_PREFIX}{section.upper()}__{name[len(ENV_PREFIX) + len(section) + 1:]}"
            notes.append(f"{name} is not a setting (settings are {ENV_PREFIX}<SECTION>__<KEY>): did you mean "
                         f"{suggestion}? (Not if the config uses it as ${{{name}}}.)")
    return notes


def load_layers(
    path: str | os.PathLike[str] | None,
    environment: str | None = None,
    env: Mapping[str, str] = os.environ,
    sections: Collection[str] | None = None,
    *,
    default: Mapping[str, Any] | None = None,
) -> tuple[dict[str, Any], Origins]:
    """Read and merge the configuration layers into plain data, plus the origin of every key.

    :param path: the base YAML file; None starts from ``default`` (no file, no environment layer).
    :param environment: layer name (``production`` reads ``<stem>.production.yaml`` beside ``path`` if it
        exists); None takes it from ``env["SSEGATE_ENVIRONMENT"]``.
    :param env: environment for ``SSEGATE_*`` overrides and ``${VAR}`` interpolation.
    :param sections: top-level keys ``SSEGATE_<SECTION>__...`` variables may set; None allows any.
    :param default: the data to start from when ``path`` is None (default: empty).
    :raises ConfigError: unreadable file, YAML syntax error, non-mapping top level, bad override or
        unset ``${VAR}``.
    """
    data, origins, problems = _load_layers(path, environment, env, sections, default)
    if problems:
        raise ConfigError(problems)
    return data, origins


# --- structuring -------------------------------------------------------------------------------------------


class _Invalid(ValueError):
    """A value of the wrong type or shape; its message is shown to the user as it is."""


def _expected(what: str, value: Any, hint: str = "") -> _Invalid:
    return _Invalid(f"expected {what}, got {_describe(value)}{hint}")


def _looks_numeric(value: Any) -> bool:
    try:
        float(value)
    except (TypeError, ValueError):
        return False
    return isinstance(value, str)


def _structure_str(value: Any, _: type) -> str:
    if isinstance(value, str):
        return value
    hint = " (strings only: put the value in quotes)" if isinstance(value, (int, float)) else ""
    raise _expected("a string", value, hint)


def _from_interpolated(value: Any, parse: Callable[[str], Any], what: str) -> Any:
    try:
        return parse(value.strip())
    except ValueError:
        raise _expected(what, value, " (from an environment variable)") from None


def _parse_bool(text: str) -> bool:
    lowered = text.lower()
    if lowered in ("true", "yes", "on", "1"):
        return True
    if lowered in ("false", "no", "off", "0"):
        return False
    raise ValueError(text)


def _structure_int(value: Any, _: type) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, Interpolated):
        return _from_interpolated(value, int, "an integer")  # type: ignore[no-any-return]
    raise _expected("an integer", value, " (remove the quotes)" if _looks_numeric(value) else "")


def _structure_float(value: Any, _: type) -> float:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, Interpolated):
        return _from_interpolated(value, float, "a number")  # type: ignore[no-any-return]
    raise _expected("a number", value, " (remove the quotes)" if _looks_numeric(value) else "")


def _structure_bool(value: Any, _: type) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, Interpolated):
        return _from_interpolated(value, _parse_bool, "a boolean (true or false)")  # type: ignore[no-any-return]
    raise _expected("a boolean (true or false)", value)


def _is_list_type(cls: Any) -> bool:
    args = get_args(cls)
    return (get_origin(cls) is list and len(args) == 1) or (get_origin(cls) is tuple and args[1:] == (Ellipsis,))


def _list_hook_factory(cls: Any, conv: cattrs.Converter) -> Callable[[Any, Any], Any]:
    factory = list_structure_factory if get_origin(cls) is list else homogenous_tuple_structure_factory
    inner = factory(cls, conv)

    def structure_list(value: Any, cls_: Any) -> Any:
        if not isinstance(value, (list, tuple)):
            hint = ""
            if isinstance(value, str) and value.lstrip().startswith("["):  # a flow list that did not parse
                hint = " (it starts like a list but is not a valid one: check its brackets and quotes)"
            elif isinstance(value, (str, int, float)):
                hint = f" (write [{value}] for a list of one)"
            raise _expected("a list", value, hint)
        return inner(value, cls_)

    return structure_list


def _is_dict_type(cls: Any) -> bool:
    return get_origin(cls) in (dict, Mapping) and len(get_args(cls)) == 2


def _mapping_hook_factory(cls: Any, conv: cattrs.Converter) -> Callable[[Any, Any], Any]:
    inner = mapping_structure_factory(cls, conv, structure_to=dict)

    def structure_mapping(value: Any, cls_: Any) -> Any:
        if value is None:  # an empty section (`headers:` with nothing under it)
            return {}
        if not isinstance(value, Mapping):
            raise _expected("a mapping", value)
        return inner(value, cls_)

    return structure_mapping


def _attrs_hook_factory(cls: Any, conv: cattrs.Converter) -> Callable[[Any, Any], Any]:
    attrs.resolve_types(cls)
    inner = make_dict_structure_fn(cls, conv)

    def structure_attrs(value: Any, cls_: Any) -> Any:
        if value is None:  # an empty section means all defaults
            value = {}
        if not isinstance(value, Mapping):
            raise _expected("a mapping", value)
        return inner(value, cls_)

    return structure_attrs


def _structure_pipeline_entry(value: Any, _: type) -> PipelineEntry:
    """``router`` -> PipelineEntry("router"); ``{"pkg.mod:Obj": {...}}`` -> PipelineEntry with that config."""
    if isinstance(value, str):
        if not value.strip():
            raise _Invalid("the plugin name is empty")
        return PipelineEntry(value)
    if isinstance(value, Mapping) and len(value) == 1:
        ((name, config),) = value.items()
        if not isinstance(name, str) or not name.strip():
            raise _Invalid(f"the plugin name must be a non-empty string, got {_describe(name)}")
        if config is not None and not isinstance(config, Mapping):
            raise _Invalid(f"the configuration of plugin '{name}' must be a mapping, got {_describe(config)}")
        return PipelineEntry(name, None if config is None else dict(config))
    hint = ""
    if isinstance(value, Mapping):
        hint = f" with {len(value)} keys (indent the plugin's configuration under its name)"
    raise _Invalid(
        f"expected a plugin name or a one-key mapping {{plugin name: {{configuration}}}}, got {_describe(value)}{hint}"
    )


def _make_converter(forbid_extra_keys: bool = True) -> cattrs.Converter:
    conv = cattrs.Converter(forbid_extra_keys=forbid_extra_keys)
    conv.register_structure_hook(str, _structure_str)
    conv.register_structure_hook(int, _structure_int)
    conv.register_structure_hook(float, _structure_float)
    conv.register_structure_hook(bool, _structure_bool)
    conv.register_structure_hook_factory(_is_list_type, _list_hook_factory)
    conv.register_structure_hook_factory(_is_dict_type, _mapping_hook_factory)
    conv.register_structure_hook_factory(attrs.has, _attrs_hook_factory)
    conv.register_structure_hook(PipelineEntry, _structure_pipeline_entry)
    return conv


#: The strict converter: no string-to-number, number-to-string or anything-to-bool coercion, no unknown keys.
converter = _make_converter()


def _unknown_key_message(key: Any, cls: type) -> str:
    names = [field.name for field in attrs.fields(cls)]
    close = difflib.get_close_matches(str(key), names, n=1, cutoff=0.5)
    if close:
        return f"unknown key {str(key)!r} (did you mean {close[0]!r}?)"
    return f"unknown key {str(key)!r} (valid keys: {', '.join(names)})"


def _note_segment(exc: BaseException) -> str | int | None:
    for note in getattr(exc, "__notes__", ()):
        if isinstance(note, AttributeValidationNote):
            return note.name
        if isinstance(note, IterableValidationNote):
            return note.index
    return None


def _failures(exc: BaseException, path: KeyPath) -> Iterator[tuple[KeyPath, str]]:
    """Flatten a cattrs error (group) into ``(key path, message)`` pairs."""
    if isinstance(exc, ForbiddenExtraKeysError):
        for key in sorted(exc.extra_fields, key=str):
            yield path + (key,), _unknown_key_message(key, exc.cl)
    elif isinstance(exc, BaseValidationError):
        for sub in exc.exceptions:
            segment = _note_segment(sub)
            yield from _failures(sub, path if segment is None else path + (segment,))
    elif isinstance(exc, KeyError) and path and exc.args == (path[-1],):
        yield path, f"missing required key {path[-1]!r}"
    elif isinstance(exc, ValueError):
        yield path, str(exc)
    else:
        yield path, f"{type(exc).__name__}: {exc}"


def structure(data: Any, cls: type[T], origins: Origins, base_path: KeyPath = ()) -> T:
    """Build ``cls`` (an attrs class) from plain data with the strict :data:`converter`.

    :param origins: where each key came from (from :func:`load_layers`), to locate problems.
    :param base_path: the key path of ``data`` inside the whole configuration, e.g.
        ``("pipeline", 1, "mypkg.plugins:Audit")`` for a plugin's configuration.
    :raises ConfigError: with one problem per wrong value, unknown key or missing key.
    """
    try:
        return converter.structure(data, cls)
    except Exception as exc:  # every cattrs failure becomes located problems
        problems = [origins.problem(tuple(base_path) + path, message) for path, message in _failures(exc, ())]
        raise ConfigError(_in_file_order(problems)) from None


# --- semantic checks ---------------------------------------------------------------------------------------

Rule = tuple[Callable[[Any], bool], str]
_POSITIVE: Rule = (lambda v: v > 0, "must be positive")
#: The largest ``rate_limit``: the bound of the rate-limit buckets' exact arithmetic (``plugins/_keys.MAX_LIMIT``).
MAX_RATE_LIMIT = 10_000_000_000
_NOT_NEGATIVE: Rule = (lambda v: v >= 0, "must not be negative")
_PERCENT: Rule = (lambda v: 0 <= v <= 100, "must be between 0 and 100")

#: A ``cors.allow_headers`` entry: a header name (an HTTP token), optionally ending in ``*``, or ``*`` alone.
_CORS_HEADER = re.compile(r"[!#$%&'+.^_`|~0-9A-Za-z-]*[!#$%&'+.^_`|~0-9A-Za-z*-]")

_RULES: dict[type, dict[str, Rule]] = {
    ServerConfig: {
        "port": (lambda v: 0 <= v <= 65535, "must be between 0 and 65535"),
        "workers": _POSITIVE,
        "max_request_size": _POSITIVE,
        "request_body_timeout": _NOT_NEGATIVE,
        "shutdown_grace_seconds": _NOT_NEGATIVE,
        "config_watch_interval": _NOT_NEGATIVE,
    },
    StreamingConfig: {"keepalive_interval": _POSITIVE},
    CorsConfig: {
        "allow_headers": (lambda v: all(_CORS_HEADER.fullmatch(name) for name in v),
                          "must be header names, patterns ending in `*` (`x-stainless-*`) or `*`"),
    },
    LoggingConfig: {
        "level": (lambda v: v.lower() in LOG_LEVELS, f"must be one of {', '.join(LOG_LEVELS)}"),
        "format": (lambda v: v in LOG_FORMATS, f"must be one of {', '.join(LOG_FORMATS)}"),
    },
    ProviderConfig: {
        "priority": _POSITIVE,
        "timeout": _POSITIVE,
        "connect_timeout": _POSITIVE,
        "first_token_timeout": _POSITIVE,
        "idle_timeout": _POSITIVE,
        "retry_attempts": _NOT_NEGATIVE,
        "rate_limit": (lambda v: 1 <= v <= MAX_RATE_LIMIT, f"must be between 1 and {MAX_RATE_LIMIT:,}"),
        "weight": _NOT_NEGATIVE,
        "max_connections": _POSITIVE,
        "max_keepalive_connections": _NOT_NEGATIVE,
        "keepalive_expiry": _NOT_NEGATIVE,
    },
    SimulationConfig: {
        "ttft_ms": _NOT_NEGATIVE,
        "ttft_variance_percent": _PERCENT,
        "itl_ms": _NOT_NEGATIVE,
        "itl_variance_percent": _PERCENT,
        "response_tokens": _POSITIVE,
        "error_rate": (lambda v: 0 <= v <= 1, "must be between 0 and 1"),
        "error_status": (lambda v: 400 <= v <= 599, "must be an HTTP error status (400-599)"),
    },
}


def _check_rules(obj: Any, path: KeyPath, origins: Origins) -> Iterator[ConfigProblem]:
    rules = _RULES.get(type(obj), {})
    for field in attrs.fields(type(obj)):
        value = getattr(obj, field.name)
        sub = path + (field.name,)
        rule = rules.get(field.name)
        if rule is not None and value is not None and not rule[0](value):
            yield origins.problem(sub, f"{rule[1]}, got {_describe(value)}")
        items = enumerate(value) if isinstance(value, tuple) else [(None, value)]
        for index, item in items:
            if attrs.has(type(item)):
                yield from _check_rules(item, sub if index is None else sub + (index,), origins)


def _check_providers(providers: tuple[ProviderConfig, ...], origins: Origins) -> Iterator[ConfigProblem]:
    first_use: dict[str, int] = {}
    for index, provider in enumerate(providers):
        path: KeyPath = ("providers", index)
        if not provider.name.strip():
            yield origins.problem(path + ("name",), "the provider name is empty")
        elif provider.name in first_use:
            yield origins.problem(
                path + ("name",),
                f"duplicate provider name {provider.name!r} (also used by providers[{first_use[provider.name]}])",
            )
        else:
            first_use[provider.name] = index
        if provider.type not in PROVIDER_TYPES:
            known = sorted(PROVIDER_TYPES)
            close = difflib.get_close_matches(provider.type, known, n=1)
            hint = f"did you mean {close[0]!r}?" if close else f"known types: {', '.join(known)}"
            yield origins.problem(path + ("type",), f"unknown provider type {provider.type!r} ({hint})")
        elif provider.type not in PROVIDER_TYPES_WITHOUT_URL:
            if not provider.base_url:
                yield origins.problem(path + ("base_url",), f"required for providers of type {provider.type!r}")
            elif not provider.base_url.startswith(("http://", "https://")):
                yield origins.problem(
                    path + ("base_url",), f"must start with http:// or https://, got {provider.base_url!r}"
                )


def check_config(config: Config, origins: Origins) -> list[ConfigProblem]:
    """Semantic checks a type check cannot make (ranges, unique names, known provider types)."""
    problems = list(_check_rules(config, (), origins))
    problems += _check_providers(config.providers, origins)
    for logger, level in config.logging.levels.items():
        if level.lower() not in LOG_LEVELS:
            problems.append(origins.problem(
                ("logging", "levels", logger), f"must be one of {', '.join(LOG_LEVELS)}, got {level!r}"))
    if config.cors.allow_credentials and "*" in config.cors.allow_origins:
        # The gateway answers a credentialed request with the caller's own origin, so "*" with credentials would
        # let every web site send requests with the user's cookies or HTTP auth: refused, not guessed at.
        problems.append(origins.problem(
            ("cors", "allow_credentials"),
            "cannot be true while cors.allow_origins contains '*' (any site could send credentialed requests); "
            "list the allowed origins instead"))
    return problems


_lenient: list[cattrs.Converter] = []


def _checks_past_unknown_keys(data: Any, origins: Origins) -> list[ConfigProblem]:
    """When the strict structuring failed, the semantic checks of a structure that ignores unknown keys: a file
    with a misspelt key and a bad value gets both reported at once. Nothing when other problems (a wrong type)
    keep even that structure from being built: they were reported already."""
    if not _lenient:
        _lenient.append(_make_converter(forbid_extra_keys=False))
    try:
        config = _lenient[0].structure(data, Config)
    except Exception:  # a problem structure() has reported, with its file and line
        return []
    return check_config(config, origins)


def default_config_data() -> dict[str, Any]:
    """The configuration used without a file: one in-process simulated provider, every model routed to it; its
    simulator answers the models it simulates (``simulation.models``) and 404 ``model_not_found`` for others."""
    return {"providers": [{"name": "simulated", "type": "simulated", "models": ["*"]}]}


def load_config(
    path: str | os.PathLike[str] | None = None,
    *,
    environment: str | None = None,
    env: Mapping[str, str] = os.environ,
) -> Config:
    """Load, merge, structure and check the gateway configuration (see :func:`load_config_with_origins`)."""
    return load_config_with_origins(path, environment=environment, env=env)[0]


def load_config_with_origins(
    path: str | os.PathLike[str] | None = None,
    *,
    environment: str | None = None,
    env: Mapping[str, str] = os.environ,
) -> tuple[Config, Origins]:
    """Load, merge, structure and check the gateway configuration.

    :param path: the base YAML file; None uses :func:`default_config_data` (``SSEGATE_*`` overrides still
        apply).
    :param environment: layer name, default ``env["SSEGATE_ENVIRONMENT"]``; see :func:`load_layers`.
    :raises ConfigError: listing every problem found, each with its file, line and key.
    """
    default = default_config_data() if path is None else None
    data, origins, problems = _load_layers(path, environment, env, CONFIG_SECTIONS, default)
    try:
        config = structure(data, Config, origins)
    except ConfigError as exc:
        problems += exc.problems
        problems += _checks_past_unknown_keys(data, origins)
        raise ConfigError(_in_file_order(problems)) from None
    problems += check_config(config, origins)
    if problems:
        raise ConfigError(_in_file_order(problems))
    return config, origins

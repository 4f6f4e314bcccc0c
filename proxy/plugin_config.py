"""Typed plugin settings: a plugin's ``Config`` is a frozen attrs class; these two helpers make one short.

    @plugin_config
    class Config:
        mask: str = setting("[redacted]", doc="What replaces a match.")

The gateway structures the plugin's block of the ``pipeline:`` entry into it (unknown keys and wrong types are
startup errors naming file, line and key), and the configuration reference is generated from each ``doc``.
"""
from __future__ import annotations

from typing import Any, Callable, TypeVar, overload

import attrs

__all__ = ["plugin_config", "setting"]

C = TypeVar("C", bound=type)
T = TypeVar("T")


def plugin_config(cls: C) -> C:
    """Make ``cls`` a frozen, keyword-only attrs class: the shape the gateway structures a config block into."""
    return attrs.frozen(kw_only=True)(cls)


# The overloads only tell type checkers that ``x: T = setting(default, ...)`` needs a ``T`` default (or a
# factory of ``T``), as ``attrs.field`` does; at runtime the returned attrs field is consumed by ``plugin_config``.
@overload
def setting(default: T, *, doc: str, validator: Any = None) -> T: ...
@overload
def setting(*, doc: str, factory: Callable[[], T], validator: Any = None) -> T: ...
@overload
def setting(*, doc: str, validator: Any = None) -> Any: ...
def setting(default: Any = attrs.NOTHING, *, doc: str, factory: Callable[[], Any] | None = None,
            validator: Any = None) -> Any:
    """One documented key of a plugin config: its default (or ``factory``), its meaning, an optional validator.

    A key with neither a default nor a factory is required in the config block.
    """
    if factory is not None:
        return attrs.field(factory=factory, validator=validator, metadata={"doc": doc})
    return attrs.field(default=default, validator=validator, metadata={"doc": doc})

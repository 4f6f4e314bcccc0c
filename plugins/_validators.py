"""Validators the built-in plugins' config classes share."""
from __future__ import annotations

from typing import Any

import attrs

__all__ = ["one_of"]


def one_of(*choices: str, plugin: str | None = None) -> Any:
    """An attrs validator: the value is one of ``choices`` (the message names the plugin when given)."""
    def check(_: Any, attribute: "attrs.Attribute[str]", value: str) -> None:
        if value not in choices:
            where = f"{plugin}: " if plugin else ""
            raise ValueError(f"{where}{attribute.name} must be one of {', '.join(choices)}; got {value!r}")
    return check
